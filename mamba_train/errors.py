"""The errors that mean "fix your input", reported as one line by the CLIs (no traceback)."""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
    from mamba_train.export.load import CheckpointError
    from mamba_train.models.backend import BackendError
    from mamba_train.models.config import ConfigError
    from mamba_train.models.init import SSMInitError
    from mamba_train.training.batch import BatchSizeError
    from mamba_train.training.callbacks.precision_guard import LowPrecisionParametersError
    from mamba_train.training.cuda_graph import CudaGraphError
    from mamba_train.training.module import NonFiniteLossError
    from mamba_train.training.parallel import ParallelConfigError

    errors: list[type[BaseException]] = [
        BackendError, BatchSizeError, CheckpointError, ConfigError, CudaGraphError,
        LowPrecisionParametersError,
        NonFiniteLossError, ParallelConfigError, SSMInitError,
    ]
    try:
        from mamba_train.data.shards import DataError
        errors.append(DataError)
    except ImportError:
        pass
    from mamba_train.train import RunDirError
    errors.append(RunDirError)
    return tuple(errors)
