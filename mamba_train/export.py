"""``python -m mamba_train.export``: the ``mamba-train-export`` command, :mod:`mamba_train.cli.export`."""

import sys

from mamba_train.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
