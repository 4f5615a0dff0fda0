"""Makes mamba_ssm's Triton kernels run on CPU tensors under Triton's interpreter; import this
module first, before torch, triton or mamba_ssm (``TRITON_INTERPRET`` is read when triton is
imported). Needs mamba_ssm's Python sources importable; its CUDA extensions are not needed.

mamba_ssm's launchers assume a CUDA build of torch in places that do not touch the maths, so:
``torch.cuda.device(None)`` becomes a no-op, the SM count is a fixed 4, each autotuned kernel keeps
its first config (the interpreter has no benchmarker), CPU autocast is what its
``torch.is_autocast_enabled()`` / ``get_autocast_gpu_dtype()`` calls see, and causal_conv1d
(CUDA only) is replaced by the same PyTorch depthwise conv. fp32 only: Triton's interpreter (3.9)
computes tl.dot on bf16 operands wrongly."""

import contextlib
import os
import sys
import types

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.runtime import autotuner  # noqa: E402

sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
_cuda_device = torch.cuda.device
torch.cuda.device = lambda i: contextlib.nullcontext() if i is None else _cuda_device(i)
torch.cuda.get_device_properties = lambda d=None: types.SimpleNamespace(multi_processor_count=4)
_autocast_enabled = torch.is_autocast_enabled
torch.is_autocast_enabled = lambda *a: _autocast_enabled(*a) if a else _autocast_enabled("cpu")
torch.get_autocast_gpu_dtype = lambda: torch.get_autocast_dtype("cpu")
_autotuner_init = autotuner.Autotuner.__init__
autotuner.Autotuner.__init__ = lambda self, fn, names, configs, *a, **k: _autotuner_init(
    self, fn, names, configs[:1], *a, **k)

from mamba_ssm.ops.triton import ssd_combined  # noqa: E402


def _conv(x, w, b, silu):
    y = F.conv1d(F.pad(x.float(), (w.shape[1] - 1, 0)), w.float().unsqueeze(1),
                 None if b is None else b.float(), groups=w.shape[0])
    return F.silu(y) if silu else y


def conv_fwd(x, w, b, seq_idx, initial_states, final_states_out, silu):
    return _conv(x, w, b, silu).to(x.dtype)


def conv_bwd(x, w, b, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial, silu):
    leaves = [t.detach().float().requires_grad_() for t in (x, w, b) if t is not None]
    with torch.enable_grad():
        grads = torch.autograd.grad(_conv(*leaves[:2], leaves[2] if b is not None else None, silu),
                                    leaves, dout.float())
    dx = torch.empty_like(x) if dx is None else dx
    dx.copy_(grads[0])
    db = grads[2].to(b.dtype) if b is not None else None
    return dx, grads[1].to(w.dtype), db, None


ssd_combined.causal_conv1d_fwd_function = conv_fwd
ssd_combined.causal_conv1d_bwd_function = conv_bwd
