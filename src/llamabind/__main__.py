"""``python -m llamabind``: the command line (see ``llamabind.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
