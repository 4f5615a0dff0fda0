"""Causal self-attention mixer for hybrid (Mamba-2-attention) and Transformer++ models.

Parameter names and shapes follow ``mamba_ssm.modules.mha.MHA`` (``in_proj``, optional
``conv1d``, ``out_proj``; the rotary embedding has no parameters), so checkpoints interchange.
It is used on both backends: mamba_ssm's own MHA computes training attention with
``F.scaled_dot_product_attention`` anyway, but its rotary path requires ``flash_attn`` (absent on
many machines, including ours), and it cannot mask across packed documents. This one implements
the rotary embedding (GPT-NeoX "rotate half" layout, as flash_attn's non-interleaved
``RotaryEmbedding``) in PyTorch and takes ``seq_idx``: on the GPU in 16 bits the documents go
through torch's variable-length flash attention (no mask, memory linear in the sequence); the
dense block-diagonal causal mask is the CPU reference.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn


# above this many tokens, a dense document mask (seq_len^2 booleans) is worth a warning
DENSE_MASK_WARN_LEN = 8192


def rotary_tables(seqlen: int, dim: int, base: float, device, dtype=torch.float32):
    """cos/sin tables (seqlen, dim/2) in ``dtype`` (fp32, or fp64 for fp64 models)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device, dtype=dtype) / dim))
    freqs = torch.outer(torch.arange(seqlen, device=device, dtype=dtype), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    """Rotate the first ``2*cos.shape[-1]`` features of x (B, L, H, D) by position."""
    rot_dim = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot_dim].to(cos.dtype), x[..., rot_dim:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((out.to(x.dtype), x_pass), dim=-1)


def varlen_eligible(q: torch.Tensor) -> bool:
    """Whether packed documents can go through torch's variable-length flash attention: a CUDA
    tensor in 16 bits (the flash kernel's dtypes) and a torch that has the op."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None


@functools.cache
def _varlen_attn():
    """torch's ``varlen_attn`` called as torch >= 2.13 takes it (``scale``, ``window_size``,
    ``enable_gqa``), or None where it lacks ``window_size`` (the causal flag of torch < 2.11
    would align unequal query/key lengths differently). torch 2.11-2.12 have no ``enable_gqa``:
    there the key/value heads are repeated up to the query heads first (memory stays linear)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params or "scale" not in params:
        return None
    if "enable_gqa" in params:
        return varlen_attn

    def repeated_kv_heads(q, k, v, *args, enable_gqa=False, **kwargs):
        if enable_gqa and k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return varlen_attn(q, k, v, *args, **kwargs)
    return repeated_kv_heads


def packed_varlen_attention(q, k, v, seq_idx, scale):
    """Causal attention within each document of a packed micro-batch, without a mask: the
    (batch, seqlen) windows flattened to one sequence cut at every window and document start,
    through ``torch.nn.attention.varlen.varlen_attn`` (flash attention; memory linear in the
    sequence). q (B, L, H, D), k/v (B, L, Hkv, D) -> (B*L, H, D). The window length bounds the
    longest document, so only the document count (``cu_seqlens``' length) is read on the host."""
    from mamba_train.models.reference.mamba3_ops import cu_seqlens_from_seq_idx

    batch, seqlen = seq_idx.shape
    cu = cu_seqlens_from_seq_idx(seq_idx)
    flat = [t.reshape(batch * seqlen, *t.shape[2:]) for t in (q, k, v)]
    return _varlen_attn()(*flat, cu, cu, seqlen, seqlen, scale=scale, window_size=(-1, 0),
                          enable_gqa=k.shape[2] != q.shape[2])


def slice_varlen_layout(seq_idx: torch.Tensor, keys_doc: torch.Tensor):
    """Packed documents when the queries are the last L of T keys per row (a context-parallel
    slice, ``keys_doc`` the document numbers of all T keys): the keys each row needs -- from the
    start of its first query's document on -- as flat indices into the (batch * T) keys, and the
    ``cu_seqlens`` of queries and keys, one segment per document piece. Each query segment ends
    where its key segment ends, so causal attention aligned bottom-right (flash attention's
    convention for unequal lengths) is exact. One host sync: the number of keys kept."""
    batch, seqlen = seq_idx.shape
    total = keys_doc.shape[1]
    offset = total - seqlen
    # keys before the slice in the document of its first token: a run ending at offset - 1
    same = keys_doc[:, :offset] == seq_idx[:, :1]
    before = same.flip(1).int().cumprod(1).sum(1)  # (batch,)
    lengths = seqlen + before
    row_start = torch.cumsum(lengths, 0) - lengths
    start = torch.ones(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    q_starts = torch.nonzero(start.flatten()).flatten()
    row, col = q_starts // seqlen, q_starts % seqlen
    k_starts = row_start[row] + torch.where(col == 0, torch.zeros_like(col), col + before[row])
    n_keys = int(lengths.sum())
    key_row = torch.repeat_interleave(torch.arange(batch, device=seq_idx.device), lengths,
                                      output_size=n_keys)
    pos = (torch.arange(n_keys, device=seq_idx.device) - row_start[key_row]
           + (offset - before)[key_row])
    cu_q = torch.cat([q_starts, q_starts.new_tensor([batch * seqlen])]).to(torch.int32)
    cu_k = torch.cat([k_starts, k_starts.new_tensor([n_keys])]).to(torch.int32)
    return key_row * total + pos, cu_q, cu_k


def sliced_varlen_attention(q, k, v, seq_idx, keys_doc, scale):
    """Causal attention of a slice's queries q (B, L, H, D) over the keys and values k/v
    (B, T, Hkv, D) of every token up to the slice end, within documents, through torch's
    variable-length flash attention (no mask): (B*L, H, D)."""
    batch, seqlen = seq_idx.shape
    index, cu_q, cu_k = slice_varlen_layout(seq_idx, keys_doc)
    k, v = (t.reshape(-1, *t.shape[2:])[index] for t in (k, v))
    return _varlen_attn()(q.reshape(batch * seqlen, *q.shape[2:]), k, v, cu_q, cu_k, seqlen,
                          keys_doc.shape[1], scale=scale, window_size=(-1, 0),
                          enable_gqa=k.shape[1] != q.shape[2])


class CausalSelfAttention(nn.Module):
    """``sequence_carry`` (or ``carry=`` in forward): the input is a slice of a longer sequence
    (``models/state_passing.py``); the queries attend to the keys and values of every token up to
    the slice end, with rotary positions counted from the sequence start."""

    sequence_carry = None
    # packed documents on the GPU go through varlen flash attention, whose cu_seqlens length is
    # read on the host (training/step/cuda_graph.py keeps such a step eager)
    varlen_needs_host_sync = True

    def __init__(self, embed_dim: int, num_heads: int, num_heads_kv: int | None = None,
                 head_dim: int | None = None, mlp_dim: int = 0, qkv_proj_bias: bool = True,
                 out_proj_bias: bool = True, softmax_scale: float | None = None,
                 causal: bool = True, d_conv: int = 0, rotary_emb_dim: int = 0,
                 rotary_emb_base: float = 10000.0, rotary_emb_interleaved: bool = False,
                 key_multiplier: float = 1.0, layer_idx: int | None = None, device=None,
                 dtype=None):
        super().__init__()
        if not causal:
            raise ValueError(
                "attn_cfg.causal must be true: a language model's attention may not see later "
                "tokens (mamba_ssm's MHA defaults to causal=False; set it in attn_cfg)"
            )
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv or num_heads
        self.head_dim = head_dim or embed_dim // num_heads
        self.softmax_scale = softmax_scale
        self.d_conv = d_conv
        self.rotary_emb_dim = rotary_emb_dim
        self.rotary_emb_base = rotary_emb_base
        self.rotary_emb_interleaved = rotary_emb_interleaved
        self.key_multiplier = key_multiplier  # Falcon-H1's µP constant on the keys
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256
        qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        factory = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(embed_dim, qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(qkv_dim, qkv_dim, kernel_size=d_conv, padding=d_conv - 1,
                                    groups=qkv_dim, **factory)
        out_dim = self.head_dim * self.num_heads + self.mlp_dim // 2
        self.out_proj = nn.Linear(out_dim, embed_dim, bias=out_proj_bias, **factory)

    def forward(self, x: torch.Tensor, seq_idx: torch.Tensor | None = None,
                carry=None) -> torch.Tensor:
        carry = carry if carry is not None else self.sequence_carry
        batch, seqlen, _ = x.shape
        qkv = self.in_proj(x)
        if self.mlp_dim > 0:
            qkv, x_mlp = qkv.split([qkv.shape[-1] - self.mlp_dim, self.mlp_dim], dim=-1)
            up, gate = x_mlp.chunk(2, dim=-1)
            x_mlp = up * F.silu(gate)
        if self.d_conv > 0:
            if seq_idx is not None:
                raise NotImplementedError("attention with d_conv > 0 does not support seq_idx")
            if carry is not None:  # the previous slice's last d_conv - 1 inputs go first
                from mamba_train.models.state_passing import carried_causal_conv1d
                qkv = carried_causal_conv1d(qkv.transpose(1, 2), self.conv1d.weight,
                                            self.conv1d.bias, None, None, carry).transpose(1, 2)
            else:
                qkv = self.conv1d(qkv.transpose(1, 2))[..., :seqlen].transpose(1, 2)
        q, k, v = qkv.split(
            [self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim,
             self.num_heads_kv * self.head_dim], dim=-1)
        q = q.view(batch, seqlen, self.num_heads, self.head_dim)
        k = k.view(batch, seqlen, self.num_heads_kv, self.head_dim)
        v = v.view(batch, seqlen, self.num_heads_kv, self.head_dim)
        if self.key_multiplier != 1:
            k = k * self.key_multiplier
        offset = 0 if carry is None else carry.offset
        if self.rotary_emb_dim > 0:
            cos, sin = rotary_tables(offset + seqlen, self.rotary_emb_dim, self.rotary_emb_base,
                                     x.device, torch.promote_types(q.dtype, torch.float32))
            cos, sin = cos[offset:], sin[offset:]
            q = apply_rotary(q, cos, sin, self.rotary_emb_interleaved)
            k = apply_rotary(k, cos, sin, self.rotary_emb_interleaved)
        if carry is not None:  # keys and values from the sequence start to the slice end
            k, v = carry.gather("k", k), carry.gather("v", v)
            if offset or seq_idx is not None:
                return self._attend_slice(q, k, v, x_mlp if self.mlp_dim > 0 else None,
                                          offset, seq_idx, carry)
        if carry is None and seq_idx is not None and varlen_eligible(q):
            ctx = packed_varlen_attention(q, k, v, seq_idx, self.softmax_scale)
            ctx = ctx.reshape(batch, seqlen, -1)
            if self.mlp_dim > 0:
                ctx = torch.cat([ctx, x_mlp], dim=-1)
            return self.out_proj(ctx)
        rep = self.num_heads // self.num_heads_kv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if seq_idx is None:
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:  # the CPU reference (and fp32 on GPU): a dense block-diagonal causal mask
            if seqlen > DENSE_MASK_WARN_LEN:  # Python shows a warning once per call site
                warnings.warn(
                    f"attention with document boundaries at seq_len={seqlen} builds a dense "
                    f"{seqlen}x{seqlen} mask per sequence ({batch * seqlen * seqlen / 2**30:.1f} "
                    "GiB): this is the CPU / fp32 reference; on a GPU under bf16 packed documents "
                    "take varlen flash attention without a mask (docs/long_context.md)",
                    stacklevel=2)
            pos = torch.arange(seqlen, device=x.device)
            causal = pos[:, None] >= pos[None, :]
            same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]
            mask = (causal[None] & same_doc)[:, None]  # (B, 1, L, L), True = attend
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return self._output(ctx, x_mlp if self.mlp_dim > 0 else None)

    def _output(self, ctx: torch.Tensor, x_mlp: torch.Tensor | None) -> torch.Tensor:
        ctx = ctx.transpose(1, 2).flatten(2)
        if x_mlp is not None:
            ctx = torch.cat([ctx, x_mlp], dim=-1)
        return self.out_proj(ctx)

    def _attend_slice(self, q, k, v, x_mlp, offset, seq_idx, carry):
        """Queries at positions offset.. attend keys 0..offset+L-1 (causal, same document)."""
        seqlen, total = q.shape[1], k.shape[1]
        if seq_idx is not None and varlen_eligible(q):  # the GPU in 16 bits: no dense mask
            ctx = sliced_varlen_attention(q, k, v, seq_idx, carry.seq_idx_up_to_here(seq_idx),
                                          self.softmax_scale)
            ctx = ctx.reshape(q.shape[0], seqlen, -1)
            if x_mlp is not None:
                ctx = torch.cat([ctx, x_mlp], dim=-1)
            return self.out_proj(ctx)
        rep = self.num_heads // self.num_heads_kv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if seq_idx is None:  # the queries are the last L of the keys: lower-right causal,
            from torch.nn.attention.bias import causal_lower_right  # which flash kernels take
            mask = causal_lower_right(seqlen, total)
        else:
            qpos = torch.arange(offset, offset + seqlen, device=q.device)
            mask = (qpos[:, None] >= torch.arange(total, device=q.device)[None, :])[None]
            keys_doc = carry.seq_idx_up_to_here(seq_idx)
            mask = (mask & (seq_idx[:, :, None] == keys_doc[:, None, :]))[:, None]
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return self._output(ctx, x_mlp)
