"""``python -m mamba_train recipe=<name> [overrides]``: compose the Hydra config and train.

Known configuration/data errors end the run with a one-line message (exit code 2) instead of
a traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from mamba_train.errors import user_errors

log = logging.getLogger("mamba_train")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from mamba_train.train import train  # heavy imports after argument parsing (--help is fast)

    log.info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        train(cfg)
    except user_errors() as e:  # evaluated only when something was raised
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
