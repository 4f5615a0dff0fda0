"""The command-line entry points, one module per command, each with its ``main``:
``train`` (``mamba-train``, ``python -m mamba_train``), ``prepare`` (``mamba-train-prepare``),
``eval`` (``mamba-train-eval``), ``lm_eval`` (``mamba-train-lm-eval``) and ``export``
(``mamba-train-export``). Beside them: ``args`` (the ``key=value`` parsing of the small
commands), ``console`` (what the terminal shows) and ``resume_overrides`` (the command line a
resume runs with). The documented ``python -m mamba_train.<command>`` forms are the few-line
modules of those names, which call these."""
