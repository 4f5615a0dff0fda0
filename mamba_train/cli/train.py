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
_RESTORED: str | None = None  # what restore_run_overrides restored, logged once logging is set up


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
    log); both set to different places is refused. A multirun job runs in its own directory,
    ``hydra.sweep.dir/hydra.sweep.subdir`` (``<output dir>/multirun/<run name>/<job number>``),
    as in lightning-hydra-template, unless ``run_dir`` is set.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mamba_train.from_data import task_overrides

    hc = HydraConfig.get()
    run_dir_set = _overridden(task_overrides(), "run_dir") is not None
    hydra_dir = Path(hc.runtime.output_dir).resolve()
    if hc.mode == RunMode.MULTIRUN:  # one directory per job (sweep dir / job number)
        if not run_dir_set:
            cfg.run_dir = str(hydra_dir)
        return
    if _overridden(list(hc.overrides.hydra), "hydra.run.dir") is None:
        return
    if run_dir_set and Path(cfg.run_dir).resolve() != hydra_dir:
        raise RunDirConflict(f"run_dir={cfg.run_dir} and hydra.run.dir={hc.run.dir} name two "
                             "directories; set one of them (run_dir=... is enough: Hydra's "
                             "directory follows it)")
    cfg.run_dir = str(hydra_dir)


@hydra.main(config_path="pkg://mamba_train.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from mamba_train.cli.console import console_errors_only, quiet_third_party
    from mamba_train.train import train  # heavy imports after argument parsing (--help is fast)
    from mamba_train.config_checks import check_interpolations
    from mamba_train.training.run.run_lock import launching_rank_zero

    quiet_third_party()  # after `import lightning` (its console handler) and Hydra's log setup
    if not launching_rank_zero():
        console_errors_only()
    # the resolved config goes to <run dir>/config.resolved.yaml (train), not above the errors
    try:
        check_interpolations(cfg)  # before anything below reads a value: one line naming the key
        unify_run_dir(cfg)
        _take_from_data(cfg)
        _report_resume(cfg)
        result = train(cfg)
    except MambaTrainError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result.get("exit_code"):  # stopped by a signal after saving: 128 + signal number
        sys.exit(result["exit_code"])


def _take_from_data(cfg: DictConfig) -> None:
    """data.tokenizer / model.vocab_size from the prepared data unless the command line set them."""
    from mamba_train.from_data import adopt_data_tokenizer, explicit_keys, task_overrides
    from mamba_train.training.run.run_lock import launching_rank_zero

    note = adopt_data_tokenizer(cfg, explicit_keys(task_overrides()))
    if note and launching_rank_zero():
        log.info(note)


def _report_resume(cfg: DictConfig) -> None:
    """Say (once) what a resume restored, and what the LR does past the saved schedule."""
    from mamba_train.cli.resume_overrides import schedule_extension_note
    from mamba_train.config_checks import max_steps
    from mamba_train.training.run.run_lock import launching_rank_zero

    if cfg.ckpt_path is None or not launching_rank_zero():
        return
    if _RESTORED:
        log.info(_RESTORED)
    try:
        steps = max_steps(cfg)
    except ValueError:  # neither max_steps nor total_tokens: check_config says so in train()
        return
    note = schedule_extension_note(Path(cfg.run_dir), steps)
    if note:
        log.warning(note)


def main() -> None:
    from mamba_train.cli.console import default_kernel_caches

    global _RESTORED
    from mamba_train.cli.resume_overrides import restore_run_overrides

    from mamba_train.cli.compose import preflight

    try:  # before Hydra composes (and writes .hydra/ into the run directory)
        argv, _RESTORED = restore_run_overrides(sys.argv[1:])
        preflight(argv)  # a bad override or value: one line, nothing written yet
    except MambaTrainError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # Hydra reads sys.argv, and so do Lightning's launchers that start the other ranks
    sys.argv[1:] = argv
    default_kernel_caches()  # before anything imports triton
    _hydra_main()


if __name__ == "__main__":
    main()
