"""``python -m mamba_train.lm_eval ...`` / ``mamba-train-lm-eval ...``: lm-eval's own CLI, every
flag unchanged, with ``--model mamba_train`` registered and the packaged offline tasks
(``mamba_train_local``, ``local_*``) found without an ``--include_path``::

    mamba-train-lm-eval --model mamba_train \\
        --model_args pretrained=outputs/debug/checkpoints/last.ckpt --batch_size 16 \\
        --tasks mamba_train_local --output_path outputs/debug/lm_eval

An explicit ``--include_path DIR`` replaces the packaged directory (lm-eval takes one); the
packaged one is ``python -c "from mamba_train.evaluation.runner import TASKS_DIR; print(TASKS_DIR)"``.
Needs the ``eval`` extra (``pip install "mamba_train[eval]"``).

Why a wrapper rather than ``lm_eval --model mamba_train``: lm-eval finds models through its own
registry, which only knows our adapter once its module is imported; importing it here and then
handing over to ``lm_eval.__main__.cli_evaluate`` keeps lm-eval's argument parsing, output files
and loggers exactly as upstream documents them. (The module is named like the library on
purpose; absolute imports make ``import lm_eval`` below the real package.)
"""

from __future__ import annotations

import sys

from mamba_train.errors import MambaTrainError

USAGE = "usage: mamba-train-lm-eval (or python -m mamba_train.lm_eval) --model mamba_train " \
        "--model_args pretrained=<ckpt> --tasks <tasks> [lm-eval flags ...]"
HELP_FLAGS = ("-h", "--help")
# lm-eval subcommands that take --include_path (``run`` is implied when none is named)
_TASK_COMMANDS = ("run", "ls", "validate")


def with_packaged_tasks(argv: list[str]) -> list[str]:
    """``argv`` plus ``--include_path <packaged tasks>`` unless it names a directory itself."""
    from mamba_train.evaluation.runner import TASKS_DIR

    if not argv or any(a in HELP_FLAGS for a in argv):
        return argv
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    command = argv[0] if not argv[0].startswith("-") else "run"
    if command not in _TASK_COMMANDS:
        return argv
    return [*argv, "--include_path", str(TASKS_DIR)]


def main(argv: list[str] | None = None) -> int | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        if not argv or any(a in HELP_FLAGS for a in argv):
            print(USAGE)
            print(__doc__)
            return 0
        print("error: mamba-train-lm-eval needs lm-eval, which is not installed: "
              "pip install \"mamba_train[eval]\"", file=sys.stderr)
        return 1
    import mamba_train.evaluation.lm_eval_adapter  # noqa: F401  (registers --model mamba_train)
    from mamba_train.cli.console import quiet_third_party

    quiet_third_party()  # after the imports above (Lightning's console handler)

    sys.argv = [sys.argv[0], *with_packaged_tasks(argv)]
    try:
        cli_evaluate()
    except MambaTrainError as e:  # a bad checkpoint or model argument: one line, no traceback
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except (ValueError, KeyError) as e:  # lm-eval's own refusals of its arguments (unknown tasks)
        print(f"error: lm-eval: {' '.join(str(e).strip(chr(34)).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
