"""``python -m mamba_train.lm_eval ...`` / ``mamba-train-lm-eval ...``: lm-eval's own CLI, every
flag unchanged, with ``--model mamba_train`` registered and the offline tasks one
``--include_path`` away::

    python -m mamba_train.lm_eval --model mamba_train \\
        --model_args pretrained=outputs/debug/checkpoints/last.ckpt --batch_size 16 \\
        --tasks mamba_train_local --include_path eval/ --output_path outputs/debug/lm_eval

(``eval/`` is a link to ``mamba_train/evaluation/tasks``; for an installed package,
``python -c "from mamba_train.evaluation.runner import TASKS_DIR; print(TASKS_DIR)"``.)

Why a wrapper rather than ``lm_eval --model mamba_train``: lm-eval finds models through its own
registry, which only knows our adapter once its module is imported; importing it here and then
handing over to ``lm_eval.__main__.cli_evaluate`` keeps lm-eval's argument parsing, output files
and loggers exactly as upstream documents them. (The module is named like the library on
purpose; absolute imports make ``import lm_eval`` below the real package.)
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import mamba_train.evaluation.lm_eval_adapter  # noqa: F401  (registers --model mamba_train)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
