"""Small single-purpose Lightning callbacks (one concern per module)."""

from mamba_train.training.run.callbacks.init_guard import SSMInitGuard
from mamba_train.training.run.callbacks.precision_guard import FP32MasterWeightsGuard
from mamba_train.training.run.callbacks.run_summary import RunSummary

__all__ = ["FP32MasterWeightsGuard", "RunSummary", "SSMInitGuard"]
