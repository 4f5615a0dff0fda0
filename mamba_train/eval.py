"""``python -m mamba_train.eval``: the ``mamba-train-eval`` command, :mod:`mamba_train.cli.eval`."""

import sys

from mamba_train.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
