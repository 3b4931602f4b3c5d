"""The method benchmark as a script: same as ``cmkd bench`` (e.g. ``--quick``)."""

import sys

from flows.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
