"""Every private ``mamba_ssm`` name the SSD kernel choice ``mamba_train`` calls, in one place.

``models/ssd.py`` and ``models/ssd_split.py`` compose mamba_ssm's Triton SSD pieces (the chunk
cumsum, chunk state, state passing, CB product, chunk scan and their backward kernels) and
causal-conv1d / gated-norm / SwiGLU pieces into autograd Functions of their own. None of these
names is public API, so they are listed here with the mamba_ssm version they were checked with;
a mamba_ssm that lacks one fails once, with one line, when the model is built.

Names are looked up on their module at each call (not bound once): ``models/norm_backward.py``
replaces ``ssd_combined._layer_norm_bwd`` when ``kernels.norm_backward=mamba_train``, and the Functions
here must follow that switch exactly as mamba_ssm's own Function does.
"""

from __future__ import annotations

import functools
import importlib

from mamba_train.models.ssd_fla import SSDKernelError

TESTED_WITH = "2.3.2"
_PREFIX = "mamba_ssm.ops.triton."
# private name -> the mamba_ssm module it is read from (ssd_combined's own globals where it
# imports a piece, so a patch applied there reaches us too)
PRIVATE_NAMES: dict[str, str] = {
    "_chunk_cumsum_fwd": "ssd_chunk_state",
    "_chunk_cumsum_bwd": "ssd_chunk_state",
    "_chunk_state_fwd": "ssd_chunk_state",
    "_chunk_state_bwd_db": "ssd_chunk_state",
    "_state_passing_fwd": "ssd_state_passing",
    "_state_passing_bwd": "ssd_state_passing",
    "_bmm_chunk_fwd": "ssd_bmm",
    "_bmm_chunk_bwd": "ssd_bmm",
    "_chunk_scan_fwd": "ssd_chunk_scan",
    "_chunk_scan_bwd_dz": "ssd_chunk_scan",
    "_chunk_scan_bwd_dstates": "ssd_chunk_scan",
    "_chunk_scan_bwd_dC": "ssd_chunk_scan",
    "_chunk_scan_bwd_dcb": "ssd_chunk_scan",
    "_chunk_scan_bwd_ddAcs_stable": "ssd_chunk_scan",
    "_chunk_scan_chunk_state_bwd_dx": "ssd_combined",
    "ensure_stride": "ssd_combined",
    "causal_conv1d_fwd_function": "ssd_combined",
    "causal_conv1d_bwd_function": "ssd_combined",
    "_layer_norm_fwd": "ssd_combined",
    "_layer_norm_bwd": "ssd_combined",
    "_swiglu_fwd": "ssd_combined",
    "_swiglu_bwd": "ssd_combined",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("mamba_ssm")
    except PackageNotFoundError:
        return "(not installed)"


@functools.cache
def _modules() -> dict[str, object]:
    modules, missing = {}, []
    for name, module in PRIVATE_NAMES.items():
        try:
            modules[module] = modules.get(module) or importlib.import_module(_PREFIX + module)
        except ImportError as e:
            raise SSDKernelError(
                f"kernels.ssd=mamba_train needs mamba_ssm's Triton SSD kernels "
                f"({e}); install mamba-ssm=={TESTED_WITH} or set kernels.ssd=mamba_ssm") from e
        if not hasattr(modules[module], name):
            missing.append(f"{module}.{name}")
    if missing:
        raise SSDKernelError(
            f"kernels.ssd=mamba_train calls private mamba_ssm names that mamba_ssm "
            f"{_version()} does not have: {', '.join(missing)}; it was checked "
            f"with mamba-ssm=={TESTED_WITH}: install that, or set kernels.ssd=mamba_ssm")
    return modules


class _Upstream:
    """``upstream().<private name>``: the named mamba_ssm function, read at each access."""

    def __getattr__(self, name: str):
        module = PRIVATE_NAMES.get(name)
        if module is None:
            raise AttributeError(f"{name} is not in ssd_upstream.PRIVATE_NAMES")
        return getattr(_modules()[module], name)


_UPSTREAM = _Upstream()


def upstream() -> _Upstream:
    """The checked pieces (raises :class:`SSDKernelError` with one line if any is missing)."""
    _modules()
    return _UPSTREAM


def check() -> None:
    """Fail at model build time, not at the first step (the fused mixer also needs causal-conv1d,
    which mamba_ssm imports optionally and leaves as None when absent)."""
    up = upstream()
    if up.causal_conv1d_fwd_function is None or up.causal_conv1d_bwd_function is None:
        raise SSDKernelError(
            "kernels.ssd=mamba_train needs the causal-conv1d package (mamba_ssm "
            "imports it optionally): install causal-conv1d, or set kernels.ssd=mamba_ssm")
