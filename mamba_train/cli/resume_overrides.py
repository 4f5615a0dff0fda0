"""Resume a run by its name or directory alone: ``mamba-train run_name=X ckpt_path=last``
(or ``mamba-train resume=X``, X a run name or a run directory).

Before Hydra composes anything (and so before it writes ``.hydra/`` into the run directory),
:func:`restore_run_overrides` rewrites the command line: the run's saved overrides
(``<run dir>/.hydra/overrides.yaml``) come first, the new ones on top. The composed result is
compared with the run's ``config.resolved.yaml``; a new override that would change what the
checkpoint was trained as (the model, the data, the optimizer and schedule, the global batch,
the seed, ...) is refused in one line naming each key with its saved and new value, and nothing
of the run has been touched. Overrides under :data:`SAFE_PREFIXES` (more steps, logging and
checkpoint cadence, loggers, callbacks, evaluation, devices and strategy, data loading) are
taken as given. torchtitan resumes from its saved job config the same way, and LitGPT's
``--resume auto`` reads the run's hyper-parameters back.

Extending ``trainer.max_steps`` does not stretch the LR schedule: Lightning restores the
``LambdaLR`` multiplier (a callable object, so its fields are in the checkpoint) with the old
length. :func:`schedule_extension_note` says what the LR will be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mamba_train.cli.compose import compose
from mamba_train.errors import MambaTrainError

RESOLVED_CONFIG = "config.resolved.yaml"  # config_checks.RESOLVED_CONFIG (not imported: heavy)
SAVED_OVERRIDES = Path(".hydra") / "overrides.yaml"

# Keys a resumed run may change: where the run goes and how often it reports, saves and
# validates, what it logs to, how the same global batch is spread over devices, and which
# kernels compute the same model (the kernels block).
SAFE_PREFIXES = (
    "ckpt_path", "run_name", "run_dir", "paths", "hydra", "backend",
    "trainer.max_steps", "train.total_tokens",
    "trainer.log_every_n_steps", "train.val_every_n_steps", "train.checkpoint_every_n_steps",
    "train.keep_last_k_checkpoints",
    "trainer.limit_val_batches", "trainer.num_sanity_val_steps", "trainer.enable_model_summary",
    "trainer.enable_progress_bar", "trainer.devices", "trainer.num_nodes", "trainer.accelerator",
    "trainer.precision", "trainer.deterministic", "trainer.benchmark", "precision",
    "module.activation_checkpointing", "module.activation_checkpointing_k", "module.cuda_graph",
    "data.num_workers", "data.val_windows", "data.checksums", "data.pin_memory",
    "data.micro_batch_size", "data.val_seq_len", "kernels",
    "logger", "callbacks", "eval", "strategy", "cluster",
)
# Hydra flags that mean "do not run one job here": the command line is left as it is.
_NOT_A_SINGLE_RUN = {"-m", "--multirun", "-h", "--help", "--hydra-help", "-sc",
                     "--shell-completion", "-cn", "--config-name", "-cp", "--config-path",
                     "-cd", "--config-dir"}


class ResumeConfigError(MambaTrainError, ValueError):
    """A resume whose overrides would change what the checkpoint was trained as."""


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _value(overrides: list[str], key: str) -> str | None:
    for item in reversed(overrides):
        if "=" in item and _key(item) == key:
            return item.split("=", 1)[1]
    return None


def is_safe(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in SAFE_PREFIXES)


def merge_overrides(saved: list[str], new: list[str]) -> list[str]:
    """The saved overrides with each key the new ones set replaced in place (at its last saved
    place; the key's earlier saved settings dropped), then the rest of the new ones. A key given
    several times counts with its last value, as Hydra reads a command line."""
    new_by_key = {_key(o): o for o in new}
    last_saved = {_key(o): i for i, o in enumerate(saved)}
    merged = [new_by_key.pop(_key(o), o) for i, o in enumerate(saved)
              if _key(o) not in new_by_key or last_saved[_key(o)] == i]
    return merged + [o for o in new if new_by_key.get(_key(o)) is o]


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def changed_keys(saved_resolved: dict, cfg) -> list[tuple[str, Any, Any]]:
    """``(key, saved, new)`` for each value the composed ``cfg`` changes outside
    :data:`SAFE_PREFIXES` (keys only one side has are a code change, not the user's)."""
    from omegaconf import OmegaConf

    old, new = _leaves(saved_resolved), _leaves(OmegaConf.to_container(cfg, resolve=True))
    return [(k, old[k], new[k]) for k in old
            if k in new and _differ(k, old[k], new[k]) and not is_safe(k)]


def _differ(key: str, old: Any, new: Any) -> bool:
    # a ``_target_`` says where the code lives: a module moved between versions keeps the
    # object's name, and what the run trained with is the same
    if key.rsplit(".", 1)[-1] == "_target_" and isinstance(old, str) and isinstance(new, str):
        return old.rsplit(".", 1)[-1] != new.rsplit(".", 1)[-1]
    return old != new


def describe_changes(changes: list[tuple[str, Any, Any]], keys: list[str], limit: int = 8) -> str:
    """``key: saved -> new`` per command-line key that changes something (a group or a key
    whose copies elsewhere change too counts once); other changed values when none does."""
    def under(key: str) -> list[tuple[str, Any, Any]]:
        return [c for c in changes if c[0] == key or c[0].startswith(key + ".")]

    def one(key: str, found: list[tuple[str, Any, Any]]) -> str:
        leaf, old, new = next((c for c in found if c[0] == key), found[0])
        more = f" (and {len(found) - 1} more under {key})" if len(found) > 1 and leaf != key else ""
        return f"{leaf}: {old!r} -> {new!r}{more}"

    parts = [one(k, under(k)) for k in dict.fromkeys(keys) if under(k)]
    if not parts:
        parts = [f"{k}: {old!r} -> {new!r}" for k, old, new in changes]
    return "; ".join(parts[:limit]) + (f" (and {len(parts) - limit} more)" if len(parts) > limit else "")


def _run_dir(overrides: list[str]) -> Path:
    explicit = _value(overrides, "run_dir") or _value(overrides, "hydra.run.dir")
    return Path(explicit) if explicit else Path(str(compose(overrides).run_dir))


def _expand_resume(overrides: list[str]) -> list[str]:
    """``resume=X`` -> ``ckpt_path=last`` plus ``run_dir=X`` (a directory) or ``run_name=X``."""
    target = _value(overrides, "resume")
    if target is None:
        return overrides
    rest = [o for o in overrides if _key(o) not in ("resume", "ckpt_path")]
    where = f"run_dir={Path(target).resolve()}" if Path(target).is_dir() else f"run_name={target}"
    return [*rest, where, "ckpt_path=last"]


def restore_run_overrides(argv: list[str]) -> tuple[list[str], str | None]:
    """The command line to give Hydra, and a line saying what was restored (None: nothing).

    Raises :class:`ResumeConfigError` when a new override changes a key outside
    :data:`SAFE_PREFIXES`; the run directory is only read."""
    if any(a in _NOT_A_SINGLE_RUN for a in argv):
        return argv, None
    is_override = [not a.startswith("-") and "=" in a for a in argv]
    flags = [a for a, o in zip(argv, is_override) if not o]
    by_name = _value([a for a, o in zip(argv, is_override) if o], "resume")
    new = _expand_resume([a for a, o in zip(argv, is_override) if o])
    if _value(new, "ckpt_path") in (None, "null", "None", "none"):
        return argv, None
    try:
        run_dir = _run_dir(new)
    except Exception:  # noqa: BLE001 -- a bad override: Hydra itself reports it below
        return flags + new, None
    saved_path, resolved_path = run_dir / SAVED_OVERRIDES, run_dir / RESOLVED_CONFIG
    if not resolved_path.is_file():  # a new run (ckpt_path=last with nothing to resume)
        if by_name is not None:
            raise ResumeConfigError(f"resume={by_name}: {run_dir} holds no run (no "
                                    f"{RESOLVED_CONFIG}); give a run name under the output "
                                    "directory (paths.output_dir) or a run directory")
        return flags + new, None
    saved = yaml.safe_load(saved_path.read_text()) if saved_path.is_file() else []
    merged = merge_overrides(list(saved or []), new)
    try:
        cfg = compose(merged)
    except Exception:  # noqa: BLE001 -- e.g. a saved group option this version no longer has
        return flags + merged, None
    from mamba_train.from_data import adopt_data_tokenizer, explicit_keys

    adopt_data_tokenizer(cfg, explicit_keys(merged))  # as the run itself did (__main__)
    changes = changed_keys(yaml.safe_load(resolved_path.read_text()) or {}, cfg)
    if changes:
        raise ResumeConfigError(
            f"resuming {run_dir} would change what its checkpoint was trained as: "
            f"{describe_changes(changes, [_key(o) for o in new])}. Drop these overrides to "
            "resume (the run's own configuration is restored), or start a new run with them: "
            "run_name=<new name> init_from=<its checkpoint> (weights only)")
    given = [o for o in new if _key(o) not in ("ckpt_path", "run_name", "run_dir")
             and o not in saved]
    note = (f"resuming {run_dir} with its saved overrides ({len(saved or [])})"
            + (f"; changed on the command line: {' '.join(given)}" if given else ""))
    return flags + merged, note


def schedule_extension_note(run_dir: Path, new_max_steps: int) -> str | None:
    """What the LR does when a resume runs past the schedule saved in its newest checkpoint
    (None when it does not, or there is no schedule)."""
    import torch

    from mamba_train.training.run.resume import checkpoint_files, inspect_checkpoint
    from mamba_train.training.step.schedule import WarmupCosine, WarmupStableDecay

    good = [c for c in map(inspect_checkpoint, checkpoint_files(Path(run_dir) / "checkpoints"))
            if c.global_step is not None and c.path.is_file()]
    if not good:
        return None
    newest = max(good, key=lambda c: c.global_step)
    try:
        ckpt = torch.load(newest.path, map_location="cpu", mmap=True, weights_only=True)
        sched = ckpt["lr_schedulers"][0]
        fields, base_lr = dict(sched["lr_lambdas"][0]), float(sched["base_lrs"][0])
        schedule = (WarmupStableDecay if "decay_steps" in fields else WarmupCosine)(**fields)
    except Exception:  # noqa: BLE001 -- no schedule, not one of ours: nothing to say
        return None
    old_total, step = schedule.total_steps, newest.global_step
    if new_max_steps <= old_total:
        return None
    name = "wsd" if isinstance(schedule, WarmupStableDecay) else "warmup_cosine"
    end_lr = base_lr * schedule(old_total)
    now = f"lr {base_lr * schedule(step):.3g} at step {step}, " if step < old_total else ""
    return (f"trainer.max_steps={new_max_steps} runs past the LR schedule restored from "
            f"{newest.path.name} ({name} over {old_total} steps): {now}lr {end_lr:.3g} from step "
            f"{max(step, old_total)} to {new_max_steps - 1}. To decay over the longer run instead, "
            "start a new run from its weights (run_name=<new name> init_from=<checkpoint> "
            "scheduler=wsd, docs/continued_pretraining.md)")
