"""Alias kept for the seed's users: `python -m fusion.all_embeddings.train [key=value ...]`
is `python -m fusion.train model=all_embeddings [key=value ...]`."""
import sys

from fusion.train import main, parse_cli

if __name__ == "__main__":
    main(parse_cli(["model=all_embeddings", *sys.argv[1:]]))
