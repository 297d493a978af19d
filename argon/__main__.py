"""``python -m argon`` runs the argon command."""

import sys

from argon.cli import main

if __name__ == "__main__":
    sys.exit(main())
