"""`python scripts/train.py --config FILE [overrides]`: the same as `vidmoe train`."""

import sys

from vidmoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
