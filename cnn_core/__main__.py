"""``python -m cnn_core``: the cnn-core command line (see cnn_core.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
