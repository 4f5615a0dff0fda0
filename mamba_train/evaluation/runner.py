"""Run lm-eval tasks on a model and write the reports; shared by ``python -m mamba_train.eval``
and the eval-after-training callback.

What this adds to ``lm_eval.simple_evaluate``: task presets (``paper``, ``local``), the offline
task directory always on the include path, a ``TaskManager`` that skips indexing lm-eval's
~15k built-in task files (~15 s) when every requested task is local, a flat ``{task/metric:
value}`` view for loggers, and ``results.json`` + ``results.md`` (lm-eval's own ``make_table``).
"""

from __future__ import annotations

import json
import logging
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from mamba_train.errors import MambaTrainError

log = logging.getLogger(__name__)


class EvalError(MambaTrainError, ValueError):
    """An evaluation request that cannot run as given (tasks, tokenizer, dtype); says what to fix."""


TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASKS = ["local_mc", "local_lambada", "local_ppl", "local_gen"]
PRESETS: dict[str, list[str]] = {
    # The zero-shot suite of the Mamba and Mamba-2 papers (Gu & Dao 2023, Table 3; Dao & Gu 2024).
    "paper": ["lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande",
              "openbookqa"],
    # Offline tasks shipped with the package (mamba_train/evaluation/tasks), no download.
    "local": LOCAL_TASKS,
}


def resolve_tasks(tasks: str | Iterable[str]) -> list[str]:
    """A preset name, a comma-separated string, or a list (whose items may be presets)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for item in (str(t).strip() for t in items):
        if not item:
            continue
        for name in PRESETS.get(item, [item]):
            if name not in out:
                out.append(name)
    if not out:
        raise EvalError("no tasks given (tasks=<name,name,...> or a preset: "
                         f"{', '.join(PRESETS)})")
    return out


def include_paths(include_path: str | Path | Iterable[str | Path] | None) -> list[str]:
    extra = [] if include_path in (None, "") else \
        [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    return [str(TASKS_DIR), *(str(Path(p).expanduser()) for p in extra)]


def task_manager(tasks: list[str], include_path=None):
    """A TaskManager that knows ``tasks``; lm-eval's built-in index only when needed."""
    from lm_eval.tasks import TaskManager

    paths = include_paths(include_path)
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    return TaskManager(include_path=paths, include_defaults=True)


@contextmanager
def preserved_rng_state():
    """lm-eval seeds python/numpy/torch globally; a run evaluated mid-training must continue
    with the RNG streams it had (resumes are bit-exact only then)."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


@contextmanager
def no_fork_bootstrap():
    """lm-eval bootstraps some stderrs (perplexity, ...) in a forked ``multiprocessing.Pool``
    unless ``DISABLE_MULTIPROC`` is set. Forking a process that runs other threads (a training
    loop, tokenizer and logger threads, a CUDA context) can deadlock the children -- it did in
    this project's tests -- so evaluation here bootstraps in-process (a few ms for our sizes)."""
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old


def evaluate(lm, tasks: str | Iterable[str], include_path=None, limit: int | float | None = None,
             num_fewshot: int | None = None, bootstrap_iters: int = 1000,
             log_samples: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on an adapter instance; returns lm-eval's results dict."""
    import lm_eval

    names = resolve_tasks(tasks)
    manager = task_manager(names, include_path)
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(unknown)}: not an lm-eval task, group or tag "
                        f"(presets: {', '.join(PRESETS)}; extra task directories: include_path=)")
    with preserved_rng_state(), no_fork_bootstrap():
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, limit=limit,
            num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    if results is None:  # non-zero rank of a distributed lm-eval run
        return {}
    return results


def flat_metrics(results: dict[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{"eval/<task>/<metric>": value}`` for every numeric metric (and its stderr) of every
    task and group; lm-eval's ``"acc,none"`` keys lose the default filter name."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not filt:
                    continue
                name = metric if filt == "none" else f"{metric}_{filt}"
                out[f"{prefix}/{task}/{name}"] = float(value)
    return out


def write_reports(results: dict[str, Any], out_dir: str | Path, source: str | None = None,
                  name: str = "results") -> tuple[Path, Path]:
    """``<name>.json`` (lm-eval's results, samples left out) and ``<name>.md`` (its tables)."""
    from lm_eval.utils import handle_non_serializable, make_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {k: v for k, v in results.items() if k != "samples"}
    if source is not None:
        payload["mamba_train_source"] = source
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=handle_non_serializable,
                                    ensure_ascii=False) + "\n")
    lines = [f"# Evaluation: {source}\n" if source else "# Evaluation\n", make_table(results)]
    if results.get("groups"):
        lines += ["", make_table(results, "groups")]
    md_path = out / f"{name}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
