"""``trainer.deterministic=true``: bit-reproducible GPU runs (a killed-and-resumed run follows the
uninterrupted loss trajectory exactly).

Lightning's flag calls ``torch.use_deterministic_algorithms(True)``; the Mamba kernels need more,
and before they are imported: mamba_ssm (>= 2.2.6) picks deterministic autotune configs and a
backward without atomic adds when ``MAMBA_DETERMINISTIC=1`` is set, and cuBLAS needs a fixed
workspace (``CUBLAS_WORKSPACE_CONFIG``). The cost:
benchmarks/results/2026-11-23-fused-training-eval-determinism.md.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def enable_deterministic_kernels() -> None:
    os.environ["MAMBA_DETERMINISTIC"] = "1"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if "mamba_ssm" in sys.modules:
        from mamba_ssm.utils import determinism
        determinism.set_deterministic_mode(True)
        log.warning("mamba_ssm was imported before deterministic mode was switched on; kernels "
                    "autotuned before this point may still use non-deterministic configurations")
