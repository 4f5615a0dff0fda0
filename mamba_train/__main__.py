"""``mamba-train recipe=<name> [overrides]`` (= ``python -m mamba_train ...``): compose the Hydra
config and train. ``mamba-train --help`` lists the recipes, groups and main keys.

Known configuration/data errors end the run with a one-line message (exit code 2) instead of
a traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback.

One run directory: ``run_dir`` (default ``paths.output_dir/run_name``) is where checkpoints and
metrics go, and Hydra's ``hydra.run.dir`` (``.hydra/``, the log) follows it. A user who sets
``hydra.run.dir=X`` instead gets ``run_dir=X`` (see :func:`unify_run_dir`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mamba_train.errors import MambaTrainError

log = logging.getLogger("mamba_train")


class RunDirConflict(MambaTrainError):
    pass


def _overridden(overrides: list[str], key: str) -> str | None:
    for item in overrides:
        name, sep, value = item.lstrip("+~").partition("=")
        if sep and name == key:
            return value
    return None


def unify_run_dir(cfg: DictConfig) -> None:
    """Make ``run_dir`` the directory Hydra runs in, whichever of the two keys the user set.

    ``hydra.run.dir`` defaults to ``${run_dir}``; when the command line sets ``hydra.run.dir``
    alone, ``run_dir`` becomes that directory (so checkpoints land beside ``.hydra/`` and the
    log); both set to different places is refused. Multirun jobs keep ``run_dir`` (each job's
    ``.hydra/`` and log go to the sweep directory, the run itself to ``run_dir``).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.RUN or _overridden(list(hc.overrides.hydra), "hydra.run.dir") is None:
        return
    hydra_dir = Path(hc.runtime.output_dir).resolve()
    if _overridden(list(hc.overrides.task), "run_dir") is not None and Path(cfg.run_dir).resolve() != hydra_dir:
        raise RunDirConflict(f"run_dir={cfg.run_dir} and hydra.run.dir={hc.run.dir} name two "
                             "directories; set one of them (run_dir=... is enough: Hydra's "
                             "directory follows it)")
    cfg.run_dir = str(hydra_dir)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from mamba_train.console import quiet_third_party
    from mamba_train.train import train  # heavy imports after argument parsing (--help is fast)

    quiet_third_party()  # after `import lightning` (its console handler) and Hydra's log setup
    # the resolved config goes to <run dir>/config.resolved.yaml (train), not above the errors
    try:
        unify_run_dir(cfg)
        result = train(cfg)
    except MambaTrainError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result.get("exit_code"):  # stopped by a signal after saving: 128 + signal number
        sys.exit(result["exit_code"])


def main() -> None:
    from mamba_train.console import default_kernel_caches

    default_kernel_caches()  # before anything imports triton
    _hydra_main()


if __name__ == "__main__":
    main()
