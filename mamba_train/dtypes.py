"""The one map from dtype names in configs and command lines to ``torch.dtype``."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype | None, key: str, error: type[Exception] = ValueError,
                allow_none: bool = False) -> torch.dtype | None:
    """``"bf16"`` / ``"torch.bfloat16"`` / a ``torch.dtype`` -> ``torch.dtype``; ``error`` names ``key``."""
    if name is None and allow_none:
        return None
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower().removeprefix("torch.")]
    except KeyError:
        raise error(f"{key}={name!r}: expected one of {sorted(DTYPES)}") from None
