"""Check the composed config's values before anything is built, all at once, in one line.

Hydra checks the keys (a typo is "Could not override ..."), not the values: a zero batch size
or sequence length surfaces as a ``ZeroDivisionError`` deep in the batch arithmetic, a
negative learning rate as a traceback from the optimizer, ``seq_len=abc`` without the key's
name. Here every bad value is named with its key and what to set instead, before the run
directory is touched; the resolved config goes to ``<run dir>/config.resolved.yaml`` instead
of the terminal, so the error line is not buried under it.
"""

from __future__ import annotations

import math
import numbers
import re
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from mamba_train.errors import MambaTrainError
from mamba_train.models.backend import BACKENDS
from mamba_train.models.kernels import SSD_KERNELS
from mamba_train.models.mixer_tables import MAMBA3_DEFAULTS
from mamba_train.models.norm_backward import CHOICES as NORM_BACKWARDS
from mamba_train.training.step.batch import ACCELERATORS
from mamba_train.training.step.cuda_graph import ALLREDUCE_PLACES, GRAPH_MODES
from mamba_train.training.step.nonfinite import NAN_POLICIES

RESOLVED_CONFIG = "config.resolved.yaml"
# Lightning's precision strings (lightning/fabric/connector.py, _PRECISION_INPUT_STR) and auto
PRECISION = re.compile(r"auto|(16|bf16|32|64)(-true|-mixed)?|transformer-engine(-float16)?")


class ConfigValueError(MambaTrainError, ValueError):
    """A config value of the right key but an impossible value."""


def _int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    """A finite real number (inf/nan pass YAML as floats, never as a meaningful setting)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v): return _int(v) and v > 0
def non_negative_int(v): return _int(v) and v >= 0
def positive_number(v): return _num(v) and v > 0
def non_negative_number(v): return _num(v) and v >= 0


# key -> (accepts, what it must be); a missing key is not checked here (Hydra owns the keys)
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.micro_batch_size": (positive_int, "a positive integer (sequences per micro-batch), e.g. 8"),
    "data.seq_len": (positive_int, "a positive integer (tokens per sequence), e.g. 2048"),
    "data.num_workers": (non_negative_int, "an integer >= 0 (DataLoader workers)"),
    "data.val_windows": (lambda v: v is None or positive_int(v),
                         "null (all) or a positive integer (validation windows)"),
    "train.global_batch_tokens": (positive_int, "a positive integer (tokens per optimizer step), "
                                                "a multiple of micro_batch_size x seq_len x GPUs"),
    "train.total_tokens": (lambda v: v is None or positive_int(v), "null or a positive integer"),
    "train.val_every_n_steps": (positive_int, "a positive integer (optimizer steps)"),
    "train.checkpoint_every_n_steps": (positive_int, "a positive integer (optimizer steps)"),
    "train.keep_last_k_checkpoints": (lambda v: _int(v) and v >= -1,
                                      "-1 (keep all), 0 (only last.ckpt) or a positive integer"),
    "module.loss_chunk_size": (positive_int, "a positive integer (tokens per loss chunk)"),
    "module.nan_policy": (lambda v: v in NAN_POLICIES, " or ".join(NAN_POLICIES)),
    "module.max_consecutive_skips": (positive_int, "a positive integer (skipped steps in a row "
                                                  "before nan_policy=skip gives up)"),
    "module.cuda_graph": (lambda v: v in GRAPH_MODES, ", ".join(GRAPH_MODES)),
    "module.cuda_graph_allreduce": (lambda v: v in ALLREDUCE_PLACES, " or ".join(ALLREDUCE_PLACES)),
    "kernels.ssd": (lambda v: v in SSD_KERNELS, ", ".join(SSD_KERNELS)),
    "kernels.norm_backward": (lambda v: v in NORM_BACKWARDS, " or ".join(NORM_BACKWARDS)),
    "kernels.mamba1_recompute": (lambda v: isinstance(v, bool), "true or false"),
    "optim.lr": (positive_number, "a positive number, e.g. 3e-4"),
    "optim.weight_decay": (non_negative_number, "a number >= 0, e.g. 0.1"),
    "trainer.max_steps": (lambda v: v is None or v == -1 or positive_int(v),
                          "a positive integer, or null to derive it from train.total_tokens"),
    "trainer.log_every_n_steps": (positive_int, "a positive integer"),
    "trainer.gradient_clip_val": (lambda v: v is None or non_negative_number(v),
                                  "null or a number >= 0 (e.g. 1.0)"),
    "seed": (_int, "an integer"),
    "backend": (lambda v: v in BACKENDS, ", ".join(BACKENDS)),
    "trainer.accelerator": (lambda v: v in ACCELERATORS, ", ".join(ACCELERATORS)),
    "trainer.devices": (lambda v: _devices(v), "auto, -1 (all), a count >= 1 or a list of "
                                               "device indices, e.g. [0,1]"),
    "trainer.num_nodes": (positive_int, "a positive integer"),
    "trainer.limit_val_batches": (lambda v: non_negative_int(v) or (_num(v) and 0 <= v <= 1),
                                  "a batch count >= 0 or a fraction in [0, 1] (0: no validation)"),
    "trainer.precision": (lambda v: isinstance(v, str) and bool(PRECISION.fullmatch(v)),
                          "auto, 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true or 64-true"),
    "strategy.context_parallel_size": (positive_int, "a positive integer that divides the GPUs "
                                                     "(1: no context parallelism)"),
}


def _devices(v: Any) -> bool:
    if v == "auto" or v == -1 or positive_int(v):
        return True
    if isinstance(v, str):  # Lightning's "0,1" form
        return bool(re.fullmatch(r"\d+(,\d+)*,?", v.strip()))
    try:
        return len(v) > 0 and all(non_negative_int(i) for i in v)
    except TypeError:
        return False


def config_problems(cfg: DictConfig) -> list[str]:
    """One ``key=value: must be ...`` entry per bad value (empty: all good)."""
    problems = []
    for key, (accepts, must_be) in RULES.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True, default=_ABSENT)
        except Exception as e:  # noqa: BLE001 -- an interpolation that does not resolve
            problems.append(f"{key}: cannot be resolved ({e})".splitlines()[0])
            continue
        if value is _ABSENT:
            continue
        if not accepts(value):
            problems.append(f"{key}={value!r} must be {must_be}")
    max_steps = OmegaConf.select(cfg, "trainer.max_steps", default=None)
    if max_steps in (None, -1) and OmegaConf.select(cfg, "train.total_tokens", default=None) is None:
        problems.append("trainer.max_steps and train.total_tokens are both unset: set one of them")
    problems += [p for p in (_build_problem(cfg, "optim.optimizer"), _build_problem(cfg, "scheduler")) if p]
    ckpt = OmegaConf.select(cfg, "ckpt_path", default=None)
    if ckpt is not None and not isinstance(ckpt, str):
        problems.append(f"ckpt_path={ckpt!r} must be null, last or a path to a .ckpt file")
    return problems


_ABSENT = object()


def max_steps(cfg: DictConfig) -> int:
    if cfg.trainer.get("max_steps") not in (None, -1):
        return int(cfg.trainer.max_steps)
    if cfg.train.total_tokens is None:
        raise ValueError("set trainer.max_steps or train.total_tokens")
    return int(cfg.train.total_tokens) // int(cfg.train.global_batch_tokens)


def _build_problem(cfg: DictConfig, key: str) -> str | None:
    """The optimizer or LR schedule built now, on one parameter, as the run builds it inside
    ``fit()``: their own checks (torch's betas/eps, the schedule's lengths) name the key here,
    before the run directory is touched. None when fine, or when the values it needs are bad
    (their rules say so)."""
    import torch
    from hydra.utils import instantiate

    node, lr = OmegaConf.select(cfg, key, default=None), OmegaConf.select(cfg, "optim.lr", default=None)
    if not node or "_target_" not in node or not positive_number(lr):
        return None
    try:
        total = max_steps(cfg)
    except (ValueError, TypeError, ZeroDivisionError):  # the rules name these values
        return None
    if not positive_int(total):
        return None
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    try:
        if key == "scheduler":
            instantiate(node)(optimizer, total_steps=total)
        else:
            instantiate(node)([torch.zeros(1, requires_grad=True)])
    except MambaTrainError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 -- the target's own refusal of a value or a key
        cause = e.__cause__ or e
        return f"{key} ({node.get('_target_')}) cannot be built: {str(cause).splitlines()[0]}"
    return None

# A 37 x 768 Mamba-3 (softplus A) at peak LR 3e-3 collapsed to unigram loss within 30 steps on an
# H200 while 1e-3 trained (benchmarks/results/2026-12-02-mamba3-learning.md); at 4-8 x 256 on the
# CPU, 3e-3 trained. So warn from this width and LR on, not for the debug sizes.
MAMBA3_LR_WARN = 1.5e-3
MAMBA3_WIDTH_WARN = 512


def config_warnings(cfg: DictConfig, sm_count: int | None = None) -> list[str]:
    """Settings that run but were measured to train badly or slowly: one line each, logged at
    the start. ``sm_count``: the GPU's multiprocessors when the fused kernels will run, else None."""
    warnings = []
    ssm_cfg = OmegaConf.select(cfg, "model.ssm_cfg", default=None) or {}
    warnings += _mamba3_grid_warnings(cfg, ssm_cfg, sm_count)
    lr = OmegaConf.select(cfg, "optim.lr", default=None)
    d_model = OmegaConf.select(cfg, "model.d_model", default=0) or 0
    if (ssm_cfg.get("layer") == "Mamba3" and ssm_cfg.get("A_activation", "softplus") == "softplus"
            and _num(lr) and lr > MAMBA3_LR_WARN and _int(d_model) and d_model >= MAMBA3_WIDTH_WARN):
        warnings.append(
            f"optim.lr={lr:g} for a Mamba-3 of d_model {d_model}: a 37 x 768 Mamba-3 collapsed at "
            "3e-3 and trained at 1e-3 (docs/design.md, Mamba-3); consider optim.lr<=1e-3 or "
            "+model.ssm_cfg.A_activation=heavy_tail")
    return warnings


def _mamba3_grid_warnings(cfg: DictConfig, ssm_cfg, sm_count: int | None) -> list[str]:
    # mamba_ssm 2.3.2 launches its Mamba-3 SISO forward and main backward kernels on a
    # (nheads, sequences) grid, each program walking a whole sequence. Below one program per SM
    # the GPU idles: mamba3-370m (32 heads) at 64k x 1 ran 28k tok/s against 74k at 4k x 16 on
    # an H200's 132 SMs (benchmarks/results/2026-12-02-long-context.md). Document boundaries add
    # programs (one per document), so with them this is an upper bound on the idle share.
    kw = {**MAMBA3_DEFAULTS, **ssm_cfg}
    if not sm_count or kw.get("layer") != "Mamba3" or kw["is_mimo"]:
        return []
    micro_batch = OmegaConf.select(cfg, "data.micro_batch_size", default=None)
    d_model = OmegaConf.select(cfg, "model.d_model", default=None)
    expand, headdim = kw["expand"], kw["headdim"]
    if not all(_int(v) and v > 0 for v in (micro_batch, d_model, expand, headdim)):
        return []
    nheads = expand * d_model // headdim
    programs = micro_batch * nheads
    if 4 * programs >= 3 * sm_count:  # 128 programs on 132 SMs measured within 6% of full
        return []
    return [f"data.micro_batch_size={micro_batch} x {nheads} Mamba-3 heads = {programs} programs "
            f"per scan kernel for this GPU's {sm_count} multiprocessors: mamba_ssm's Mamba-3 "
            "kernels run one program per (head, sequence), so about "
            f"{100 - 100 * programs // sm_count}% of the GPU idles in them; raise "
            f"data.micro_batch_size to {-(-sm_count // nheads)} (module.activation_checkpointing=all "
            "makes room at long context) or shorten data.seq_len (docs/long_context.md)"]


def check_interpolations(cfg) -> None:
    """Resolve every ``${...}`` of the config once, before anything uses it: an unset
    ``${oc.env:VAR}`` (or a reference to a missing key) is one line naming the key, instead of a
    traceback from wherever the value is first read. Hydra's own ``hydra.*`` node is skipped."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except (InterpolationResolutionError, MissingMandatoryValue) as e:
        cause = str(getattr(e, "msg", e)).strip().splitlines()[0]
        cause = cause.replace("KeyError raised while resolving interpolation: ", "").strip('"')
        raise ConfigValueError(f"{e.full_key}: {cause}; set it (export the variable, or override "
                               f"{e.full_key}=...)") from None


def check_config(cfg: DictConfig) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ConfigValueError("invalid config: " + "; ".join(problems)
                               + " (set them on the command line, e.g. data.seq_len=2048)")


def write_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    """The fully resolved config, for the record (also what a resume must match)."""
    path = Path(run_dir) / RESOLVED_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tmp.replace(path)
    return path
