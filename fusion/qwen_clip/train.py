"""Alias: `python -m fusion.qwen_clip.train` is `python -m fusion.train model=qwen_clip`."""
import sys

from core.errors import run_cli
from fusion.train import main, parse_cli

if __name__ == "__main__":
    run_cli(lambda: main(parse_cli(["model=qwen_clip", *sys.argv[1:]])))
