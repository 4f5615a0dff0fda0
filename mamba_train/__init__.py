"""mamba_train: pretraining for Mamba / Mamba-2 language models.

Public API::

    from mamba_train import MambaLMConfig, build_model, load_model

Heavy submodules (Lightning, Hydra, mamba_ssm) are imported only when used, so
``import mamba_train`` works on a machine without CUDA or mamba_ssm.
"""

from mamba_train.models.config import MambaLMConfig

__version__ = "0.1.0"
__all__ = ["MambaLMConfig", "build_model", "load_model", "__version__"]


def __getattr__(name):
    if name == "build_model":
        from mamba_train.models.build import build_model
        return build_model
    if name == "load_model":
        from mamba_train.formats.load import load_model
        return load_model
    raise AttributeError(f"module 'mamba_train' has no attribute {name!r}")
