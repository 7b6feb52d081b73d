"""`python -m holysheep`: the `holysheep` command, for environments without the script."""

import sys

from holysheep._cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
