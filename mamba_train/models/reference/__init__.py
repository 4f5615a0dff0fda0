"""Pure-PyTorch reference mixers (exact re-implementations of mamba_ssm's Mamba, Mamba2 and Mamba3).

They run anywhere PyTorch runs (CPU training, tests) and are the oracle for the fused kernels.
"""

from mamba_train.models.reference.mamba1 import Mamba
from mamba_train.models.reference.mamba2 import GatedRMSNorm, Mamba2
from mamba_train.models.reference.mamba3 import Mamba3
from mamba_train.models.reference.mamba3_ops import mamba3_siso_chunked, mamba3_siso_sequential
from mamba_train.models.reference.common import causal_conv1d, gated_rms_norm
from mamba_train.models.reference.selective_scan import selective_scan, selective_scan_sequential
from mamba_train.models.reference.ssd import ssd_chunked, ssd_sequential

__all__ = [
    "Mamba",
    "Mamba2",
    "Mamba3",
    "mamba3_siso_chunked",
    "mamba3_siso_sequential",
    "GatedRMSNorm",
    "causal_conv1d",
    "gated_rms_norm",
    "selective_scan",
    "selective_scan_sequential",
    "ssd_chunked",
    "ssd_sequential",
]
