"""The fused Mamba-2 mixer body (causal conv1d -> SSD -> gated RMSNorm -> out_proj) as one autograd
Function whose SSD backward uses the forward's kept tensors (``models/ssd.py``).

mamba_ssm's Mamba-2 training path (``use_mem_eff_path=True``) calls
``mamba_split_conv1d_scan_combined``: one Function from the ``in_proj`` output ``zxbcdt`` to the
mixer output, whose backward recomputes the conv1d and then the whole SSD forward. This Function
takes the same arguments and makes the same kernel calls in the same order, with two differences:
the SSD forward's cumsum, CB, chunk states and passed states are saved (``ssd_forward``) and the
SSD backward starts from them (``ssd_backward``). The conv1d output is still recomputed (keeping
it would cost another (batch, len, d_ssm + 2·ngroups·d_state) activation per layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from mamba_train.models.ssd import NO_DT_LIMIT, ForwardKept, ssd_backward, ssd_forward
from mamba_train.models.ssd_upstream import upstream


def _split_sizes(zxbcdt, conv_channels, nheads, headdim, ngroups):
    dim = nheads * headdim
    d_state = (conv_channels - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * d_state - nheads) // 2
    assert d_nonssm >= 0 and nheads % ngroups == 0
    return dim, d_state, d_nonssm


def _conv(up, xBC, weight, bias, seq_idx, activation):
    """causal conv1d (+ SiLU) over (batch, len, channels), as mamba_ssm's Function calls it."""
    out = up.causal_conv1d_fwd_function(rearrange(up.ensure_stride(xBC), "b s d -> b d s"),
                                        weight, bias, seq_idx, None, None,
                                        activation in ("silu", "swish"))
    return rearrange(out, "b d s -> b s d")


def _heads(xBC_conv, dim, d_state, nheads, ngroups):
    x, B, C = torch.split(xBC_conv, [dim, ngroups * d_state, ngroups * d_state], dim=-1)
    return (rearrange(x, "b l (h p) -> b l h p", h=nheads),
            rearrange(B, "b l (g n) -> b l g n", g=ngroups),
            rearrange(C, "b l (g n) -> b l g n", g=ngroups))


class SplitConv1dScanKept(torch.autograd.Function):
    """Same arguments and outputs as mamba_ssm's ``MambaSplitConv1dScanCombinedFn``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                initial_states=None, seq_idx=None, dt_limit=NO_DT_LIMIT, return_final_states=False,
                activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True):
        up = upstream()
        assert activation in (None, "silu", "swish")
        nheads, headdim = (D.shape[0], headdim) if D.dim() == 1 else D.shape
        dim, d_state, d_nonssm = _split_sizes(zxbcdt, conv1d_weight.shape[0], nheads, headdim,
                                              ngroups)
        batch, seqlen, _ = zxbcdt.shape
        zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * d_state,
                                               nheads], dim=-1)
        seq_idx = seq_idx.contiguous() if seq_idx is not None else None
        x, B, C = _heads(_conv(up, xBC, conv1d_weight, conv1d_bias, seq_idx, activation),
                         dim, d_state, nheads, ngroups)
        z = rearrange(z, "b l (h p) -> b l h p", h=nheads)
        common = dict(D=D, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
                      dt_softplus=True, dt_limit=dt_limit)
        rstd = None
        if rmsnorm_weight is None:
            out, out_x, final_states, kept = ssd_forward(x, dt, A, B, C, chunk_size, z=z, **common)
            out = rearrange(out, "b s h p -> b s (h p)")
            if d_nonssm > 0:
                out = torch.cat([up._swiglu_fwd(zx0), out], dim=-1)
        else:
            out_x, _, final_states, kept = ssd_forward(x, dt, A, B, C, chunk_size, **common)
            rmsnorm_weight = rmsnorm_weight.contiguous()
            out = None
            if d_nonssm > 0:  # SwiGLU part and norm output written side by side
                out01 = torch.empty(batch, seqlen, d_nonssm + dim, dtype=out_x.dtype,
                                    device=out_x.device)
                out = rearrange(out01[..., d_nonssm:], "b s d -> (b s) d")
                up._swiglu_fwd(zx0, out=out01[..., :d_nonssm])
            out, _, rstd = up._layer_norm_fwd(
                rearrange(out_x, "b s h p -> (b s) (h p)"), rmsnorm_weight, None, rmsnorm_eps,
                rearrange(z, "b s h p -> (b s) (h p)"), out=out, group_size=dim // ngroups,
                norm_before_gate=norm_before_gate, is_rms_norm=True)
            out = rearrange(out, "(b s) d -> b s d", b=batch) if d_nonssm == 0 else out01
        if outproj_weight is not None:
            if torch.is_autocast_enabled("cuda"):
                dtype = torch.get_autocast_dtype("cuda")
                out, outproj_weight = out.to(dtype), outproj_weight.to(dtype)
                outproj_bias = outproj_bias.to(dtype) if outproj_bias is not None else None
            out = F.linear(out, outproj_weight, outproj_bias)
        else:
            assert outproj_bias is None
        ctx.save_for_backward(zxbcdt, conv1d_weight, conv1d_bias, out_x, A, D, dt_bias,
                              initial_states, seq_idx, rmsnorm_weight, rstd, outproj_weight,
                              outproj_bias, *kept)
        ctx.settings = dict(dt_limit=dt_limit, return_final_states=return_final_states,
                            activation=activation, rmsnorm_eps=rmsnorm_eps,
                            norm_before_gate=norm_before_gate, chunk_size=chunk_size,
                            headdim=headdim, ngroups=ngroups)
        return (out, final_states) if return_final_states else out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dout, *rest):
        up = upstream()
        (zxbcdt, conv1d_weight, conv1d_bias, out, A, D, dt_bias, initial_states, seq_idx,
         rmsnorm_weight, rstd, outproj_weight, outproj_bias, *kept) = ctx.saved_tensors
        s = ctx.settings
        ngroups, headdim = s["ngroups"], s["headdim"]
        dfinal_states = rest[0] if s["return_final_states"] else None
        nheads = D.shape[0]
        dim, d_state, d_nonssm = _split_sizes(zxbcdt, conv1d_weight.shape[0], nheads, headdim,
                                              ngroups)
        splits = [2 * d_nonssm, dim, dim + 2 * ngroups * d_state, nheads]
        zx0, z, xBC, dt = torch.split(zxbcdt, splits, dim=-1)
        x, B, C = _heads(_conv(up, xBC, conv1d_weight, conv1d_bias, seq_idx, s["activation"]),
                         dim, d_state, nheads, ngroups)
        # every input gradient lands in one buffer shaped like zxbcdt; the conv1d input's
        # gradient is first gathered in dxBC (x, B, C side by side)
        dzxbcdt = torch.empty_like(zxbcdt)
        dzx0, dz, dxBC_given, ddt_given = torch.split(dzxbcdt, splits, dim=-1)
        dxBC = torch.empty_like(xBC)
        dx, dB, dC = _heads(dxBC, dim, d_state, nheads, ngroups)
        z = rearrange(z, "b l (h p) -> b l h p", h=nheads)
        recompute_output = outproj_weight is not None
        if recompute_output:  # the out_proj input, rebuilt for its weight gradient
            out_recompute = torch.empty(*out.shape[:2], d_nonssm + dim, device=out.device,
                                        dtype=out.dtype)
            out0_recompute, out1_recompute = out_recompute.split([d_nonssm, dim], dim=-1)
            dout_og = dout
            dout = F.linear(dout, outproj_weight.t())
        if d_nonssm > 0:
            dout0, dout = dout.split([d_nonssm, dim], dim=-1)
            up._swiglu_bwd(zx0, dout0, dxy=dzx0, recompute_output=True, out=out0_recompute)
        dout = rearrange(dout, "b s (h p) -> b s h p", p=headdim)
        common = dict(chunk_size=s["chunk_size"], D=D, dt_bias=dt_bias,
                      initial_states=initial_states, dfinal_states=dfinal_states, seq_idx=seq_idx,
                      dt_softplus=True, dt_limit=s["dt_limit"], dx=dx, ddt=ddt_given, dB=dB,
                      dC=dC)
        if rmsnorm_weight is None:
            dz = rearrange(dz, "b l (h p) -> b l h p", h=nheads)
            dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states, *outz = ssd_backward(
                dout, x, dt, A, B, C, out, ForwardKept(*kept), z=z, dz=dz,
                recompute_output=recompute_output, **common)
            out_for_linear = None
            if recompute_output:  # beside the SwiGLU part (mamba_ssm 2.3.2 drops that part here)
                out1_recompute.copy_(rearrange(outz[0], "b s h p -> b s (h p)"))
                out_for_linear = out_recompute
            drmsnorm_weight = None
        else:
            batch = dout.shape[0]
            dy_norm, drmsnorm_weight, _, dz, *_ = up._layer_norm_bwd(
                rearrange(dout, "b s h p -> (b s) (h p)"), rearrange(out, "b s h p -> (b s) (h p)"),
                rmsnorm_weight, None, s["rmsnorm_eps"], None, rstd,
                rearrange(z, "b s h p -> (b s) (h p)"), group_size=dim // ngroups,
                norm_before_gate=s["norm_before_gate"], is_rms_norm=True,
                recompute_output=recompute_output, dz=rearrange(dz, "b l d -> (b l) d"),
                out=rearrange(out1_recompute, "b s d -> (b s) d") if recompute_output else None)
            out_for_linear = out_recompute if recompute_output else None
            dout = rearrange(dy_norm, "(b s) (h p) -> b s h p", b=batch, p=headdim)
            dx, ddt, dA, dB, dC, dD, _, ddt_bias, dinitial_states = ssd_backward(
                dout, x, dt, A, B, C, out, ForwardKept(*kept), **common)
        if outproj_weight is not None:
            doutproj_weight = torch.einsum("bso,bsd->od", dout_og, out_for_linear)
            doutproj_bias = dout_og.sum(dim=(0, 1)) if outproj_bias is not None else None
        else:
            doutproj_weight = doutproj_bias = None
        dxBC_update, dweight, dbias, *_ = up.causal_conv1d_bwd_function(
            rearrange(up.ensure_stride(xBC), "b s d -> b d s"), conv1d_weight, conv1d_bias,
            rearrange(up.ensure_stride(dxBC), "b s d -> b d s"), seq_idx, None, None,
            rearrange(up.ensure_stride(dxBC_given), "b s d -> b d s"), False,
            s["activation"] in ("silu", "swish"))
        dxBC_update = rearrange(dxBC_update, "b d s -> b s d")
        if dxBC_given.stride() != dxBC_update.stride():
            dxBC_given.copy_(dxBC_update)
        return (dzxbcdt, dweight, dbias, ddt_bias, dA, dD, None, dinitial_states, None, None, None,
                None, drmsnorm_weight, None, doutproj_weight, doutproj_bias, None, None, None)


def split_conv1d_scan_kept(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                           initial_states=None, seq_idx=None, dt_limit=NO_DT_LIMIT,
                           return_final_states=False, activation="silu", rmsnorm_weight=None,
                           rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                           ngroups=1, norm_before_gate=True):
    """Drop-in for mamba_ssm's ``mamba_split_conv1d_scan_combined`` (same signature)."""
    return SplitConv1dScanKept.apply(
        zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx,
        dt_limit, return_final_states, activation, rmsnorm_weight, rmsnorm_eps, outproj_weight,
        outproj_bias, headdim, ngroups, norm_before_gate)


def mamba2_forward(mixer, u, seq_idx=None):
    """A mamba_ssm ``Mamba2`` module's training forward (``use_mem_eff_path``, no inference
    cache, no tensor parallelism) with :func:`split_conv1d_scan_kept` in place of
    ``mamba_split_conv1d_scan_combined``: the same arguments ``Mamba2.forward`` passes."""
    m = mixer
    dt_limit = {} if m.dt_limit == NO_DT_LIMIT else dict(dt_limit=m.dt_limit)
    return split_conv1d_scan_kept(
        m.in_proj(u), rearrange(m.conv1d.weight, "d 1 w -> d w"), m.conv1d.bias, m.dt_bias,
        -torch.exp(m.A_log.float()),
        D=rearrange(m.D, "(h p) -> h p", p=m.headdim) if m.D_has_hdim else m.D,
        chunk_size=m.chunk_size, seq_idx=seq_idx, activation=m.activation,
        rmsnorm_weight=m.norm.weight if m.rmsnorm else None,
        rmsnorm_eps=m.norm.eps if m.rmsnorm else 1e-6, outproj_weight=m.out_proj.weight,
        outproj_bias=m.out_proj.bias, headdim=None if m.D_has_hdim else m.headdim,
        ngroups=m.ngroups, norm_before_gate=m.norm_before_gate, **dt_limit)
