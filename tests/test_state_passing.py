"""A sequence cut into slices, each mixer run slice after slice with the state carried
(``models/state_passing.StateCarry``), gives the whole-sequence outputs and gradients: the maths
under context parallelism, in one process (fp64, so any difference is a real one)."""

import pytest
import torch

from mamba_train.models.attention import CausalSelfAttention
from mamba_train.models.reference import Mamba, Mamba2, Mamba3
from mamba_train.models.state_passing import SliceError, StateCarry

D_MODEL = 16


def _mixers():
    return {
        "mamba1": lambda: Mamba(D_MODEL, d_state=4, d_conv=4, expand=2),
        "mamba2": lambda: Mamba2(D_MODEL, d_state=8, d_conv=4, expand=2, headdim=8, chunk_size=4),
        "mamba3": lambda: Mamba3(D_MODEL, d_state=8, expand=2, headdim=8, chunk_size=4),
        "attention": lambda: CausalSelfAttention(D_MODEL, num_heads=2, rotary_emb_dim=4),
        "attention-conv": lambda: CausalSelfAttention(D_MODEL, num_heads=2, rotary_emb_dim=4,
                                                      d_conv=4),
    }


def _seq_idx(batch, seqlen, cuts):
    """Document numbers with a new document at each position in ``cuts`` (row 1 shifted)."""
    rows = []
    for r in range(batch):
        doc = torch.zeros(seqlen, dtype=torch.int32)
        for c in cuts:
            doc[c + r:] += 1
        rows.append(doc)
    return torch.stack(rows)


def _run(mixer, x, seq_idx, bounds):
    """Outputs of the slices [bounds[i], bounds[i+1]) run in order with the state carried."""
    carry, outs = StateCarry(), []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sl = None if seq_idx is None else seq_idx[:, lo:hi]
        outs.append(mixer(x[:, lo:hi], seq_idx=sl, carry=carry))
        carry = carry.next(sl, hi - lo)
    return torch.cat(outs, dim=1)


def _grads(mixer, x, out, weight):
    mixer.zero_grad()
    x.grad = None
    (out * weight).sum().backward()
    return {"input": x.grad.clone(), **{n: p.grad.clone() for n, p in mixer.named_parameters()}}


PLAIN = ((0, 11, 24), None)                # two slices, no documents
PACKED = ((0, 7, 15, 24), (5, 7, 12))      # three slices; documents start inside and at a cut


# attention with a short conv takes no document boundaries at all (whole or sliced)
@pytest.mark.parametrize("kind,bounds,cuts", [
    *[(kind, *PLAIN) for kind in _mixers()],
    *[(kind, *PACKED) for kind in _mixers() if kind != "attention-conv"],
])
def test_sliced_run_matches_whole_sequence(kind, bounds, cuts):
    torch.manual_seed(0)
    mixer = _mixers()[kind]().double()
    with torch.no_grad():  # make the state matter: slow decays, non-trivial biases
        for name, p in mixer.named_parameters():
            if name in ("A_log", "dt_bias"):
                p.uniform_(-1.0, 0.5)
    batch, seqlen = 2, bounds[-1]
    x = torch.randn(batch, seqlen, D_MODEL, dtype=torch.float64, requires_grad=True)
    seq_idx = None if cuts is None else _seq_idx(batch, seqlen, cuts)
    weight = torch.randn(batch, seqlen, D_MODEL, dtype=torch.float64)

    whole = mixer(x, seq_idx=seq_idx)
    ref = _grads(mixer, x, whole, weight)
    sliced = _run(mixer, x, seq_idx, bounds)
    got = _grads(mixer, x, sliced, weight)

    torch.testing.assert_close(sliced, whole, rtol=1e-10, atol=1e-10)
    # the mixers cast A_log (and Mamba-1 D and the dt bias) to fp32, as mamba_ssm: those
    # gradients are fp32 sums, taken in another order when sliced (measured <= 1e-7 of the
    # largest entry); everything else agrees to fp64 rounding
    for name in ref:
        err = (got[name] - ref[name]).abs().max().item()
        assert err <= 1e-6 * ref[name].abs().max().item() + 1e-12, (name, err)
    # the carry really matters: the second slice alone (zero state) differs
    alone = mixer(x[:, bounds[1]:bounds[2]], seq_idx=None if seq_idx is None
                  else seq_idx[:, bounds[1]:bounds[2]])
    assert not torch.allclose(alone, whole[:, bounds[1]:bounds[2]], atol=1e-6)


def test_final_state_of_carry_equals_whole_sequence_state():
    """StateCarry's outgoing SSM state after two slices equals the one-slice run's."""
    torch.manual_seed(1)
    mixer = Mamba2(D_MODEL, d_state=8, expand=2, headdim=8, chunk_size=4).double()
    x = torch.randn(1, 20, D_MODEL, dtype=torch.float64)
    one = StateCarry()
    mixer(x, carry=one)
    first = StateCarry()
    mixer(x[:, :9], carry=first)
    second = first.next(None, 9)
    mixer(x[:, 9:], carry=second)
    torch.testing.assert_close(second.outgoing["ssm"], one.outgoing["ssm"])
    torch.testing.assert_close(second.outgoing["conv"], one.outgoing["conv"])


def test_slice_shorter_than_conv_window_is_refused():
    mixer = Mamba2(D_MODEL, d_state=8, d_conv=4, expand=2, headdim=8)
    with pytest.raises(SliceError, match="shorter than the conv window"):
        mixer(torch.randn(1, 2, D_MODEL), carry=StateCarry())
