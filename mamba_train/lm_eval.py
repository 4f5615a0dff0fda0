"""``python -m mamba_train.lm_eval``: the ``mamba-train-lm-eval`` command, :mod:`mamba_train.cli.lm_eval`."""

import sys

from mamba_train.cli.lm_eval import main

if __name__ == "__main__":
    sys.exit(main())
