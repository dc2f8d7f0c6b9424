"""`python scripts/generate.py --model DIR ...`: the same as `vidmoe generate`."""

import sys

from vidmoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
