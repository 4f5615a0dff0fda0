"""``python -m mamba_train``: the ``mamba-train`` command, :mod:`mamba_train.cli.train`."""

from mamba_train.cli.train import main

if __name__ == "__main__":
    main()
