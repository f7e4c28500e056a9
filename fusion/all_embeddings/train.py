"""Alias kept for the seed's users: `python -m fusion.all_embeddings.train [key=value ...]`
is `python -m fusion.train model=all_embeddings [key=value ...]`."""
import sys

from core.errors import run_cli
from fusion.train import main, parse_cli

if __name__ == "__main__":
    run_cli(lambda: main(parse_cli(["model=all_embeddings", *sys.argv[1:]])))
