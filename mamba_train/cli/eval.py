"""``mamba-train-eval ckpt=<path> tasks=<preset|a,b,...> [key=value ...]``: zero-shot
lm-eval on a checkpoint, with reports next to it.

    python -m mamba_train.eval ckpt=outputs/mamba-130m/checkpoints/last.ckpt tasks=paper
    python -m mamba_train.eval ckpt=outputs/debug/checkpoints/last.ckpt tasks=local limit=20

Writes ``<ckpt dir>/eval/<name>.json`` (lm-eval's full results) and ``<name>.md`` (its tables)
and prints the table. ``<name>`` is the checkpoint's file name without ``.ckpt`` (``last``,
``step=000100``...), so the checkpoints of one directory keep their own reports, or ``results``
for a model directory; ``<ckpt dir>`` is the directory holding the ``.ckpt`` file, or the model
directory itself, unless ``out=<dir>`` is given. Needs the ``eval`` extra
(``pip install "mamba_train[eval]"``).

Arguments (OmegaConf ``key=value``; lists as ``tasks=[a,b]`` or ``tasks=a,b``):
  ckpt          a Lightning .ckpt, a mamba_ssm directory or a transformers directory (required)
  tasks         a preset (``paper``: lambada_openai, hellaswag, piqa, arc_easy, arc_challenge,
                winogrande, openbookqa; ``local``: the offline tasks) or task names (required)
  include_path  extra lm-eval task directories (the offline tasks are always included)
  limit         examples per task (int, or a fraction < 1); for smoke tests
  batch_size    sequences per forward (default 16)
  num_fewshot   few-shot examples (default: the task's, i.e. zero-shot for the presets)
  dtype         float32 | bfloat16 | auto (bf16 autocast on CUDA)
  backend       auto | fused | reference
  device        cuda | cpu | cuda:1 ... (default: cuda if available)
  tokenizer     default: the checkpoint's training tokenizer
  max_length    context window in tokens (default: max(2048, training seq_len))
  out           output directory

Exit status 0 on success, 2 for bad arguments (the message says which).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mamba_train.cli.args import UsageError, parse_key_values, wants_help
from mamba_train.errors import MambaTrainError

USAGE = "usage: mamba-train-eval (or python -m mamba_train.eval) ckpt=<path> tasks=<preset|task,...> [key=value ...] (--help)"


@dataclass
class EvalArgs:
    ckpt: Optional[str] = None
    tasks: Any = None
    include_path: Any = None
    limit: Optional[float] = None
    batch_size: int = 16
    num_fewshot: Optional[int] = None
    dtype: str = "auto"
    backend: str = "auto"
    device: Optional[str] = None
    tokenizer: Optional[str] = None
    max_length: Optional[int] = None
    out: Optional[str] = None
    bootstrap_iters: int = 1000


def parse_args(argv: list[str]) -> EvalArgs:
    args = parse_key_values(argv, EvalArgs, required=("ckpt", "tasks"), usage=USAGE)
    if not Path(args.ckpt).exists():
        raise UsageError(f"ckpt={args.ckpt} does not exist")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"limit must be > 0 (examples per task, or a fraction < 1), got {args.limit}")
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    return args


def output_dir(args: EvalArgs) -> Path:
    if args.out:
        return Path(args.out)
    ckpt = Path(args.ckpt)
    return (ckpt.parent if ckpt.is_file() else ckpt) / "eval"


def report_name(args: EvalArgs) -> str:
    """One report per checkpoint: ``last.ckpt`` -> ``last``; a model directory -> ``results``."""
    ckpt = Path(args.ckpt)
    return ckpt.stem if ckpt.is_file() else "results"


def run(args: EvalArgs) -> dict:
    from mamba_train.evaluation.lm_eval_adapter import MambaTrainLM
    from mamba_train.evaluation.runner import evaluate, resolve_tasks, write_reports
    from mamba_train.cli.console import quiet_third_party

    quiet_third_party()  # after the imports above (Lightning's console handler)

    tasks = resolve_tasks(args.tasks)
    lm = MambaTrainLM(pretrained=args.ckpt, tokenizer=args.tokenizer, batch_size=args.batch_size,
                      dtype=args.dtype, backend=args.backend, max_length=args.max_length,
                      device=args.device)
    results = evaluate(lm, tasks, include_path=args.include_path, limit=args.limit,
                       num_fewshot=args.num_fewshot, bootstrap_iters=args.bootstrap_iters)
    json_path, md_path = write_reports(results, output_dir(args), source=str(args.ckpt),
                                       name=report_name(args))
    print(md_path.read_text())
    print(f"results: {json_path}\ntable:   {md_path}")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or wants_help(argv):
        print(USAGE)
        print(__doc__)
        return 0 if argv else 2
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("error: mamba-train-eval needs lm-eval, which is not installed: "
              "pip install \"mamba_train[eval]\"", file=sys.stderr)
        return 1
    try:
        run(args)
    except MambaTrainError as e:  # a checkpoint that cannot be loaded, unknown tasks, ...
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
