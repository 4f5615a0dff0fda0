"""``python -m mamba_train recipe=<name> [overrides]``: compose the Hydra config and train.

Known configuration/data errors end the run with a one-line message (exit code 2) instead of
a traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from mamba_train.errors import user_errors

log = logging.getLogger("mamba_train")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from mamba_train.train import train  # heavy imports after argument parsing (--help is fast)

    # the resolved config goes to <run dir>/config.resolved.yaml (train), not above the errors
    try:
        result = train(cfg)
    except user_errors() as e:  # evaluated only when something was raised
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result.get("exit_code"):  # stopped by a signal after saving: 128 + signal number
        sys.exit(result["exit_code"])


def _refuse_moved_overrides(argv: list[str]) -> None:
    """``trainer.cuda_graph=on`` would fail inside Hydra's composition with a long message; say
    in one line where the key went (train.check_moved_keys covers configs composed elsewhere)."""
    from mamba_train.conf import MOVED_KEYS

    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in MOVED_KEYS:
            print(f"error: {key} is now {MOVED_KEYS[key]} (the trainer group holds only "
                  f"lightning.Trainer arguments); use {MOVED_KEYS[key]}=...", file=sys.stderr)
            sys.exit(2)


def main() -> None:
    _refuse_moved_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
