"""models/split_linear.py: the grouped-output in_proj equals ``torch.split(F.linear(...))``, values
and gradients, in fp32 and under bf16 autocast, with some outputs unused; each output is contiguous."""

import pytest
import torch
import torch.nn.functional as F

from mamba_train.models.split_linear import SplitOutputLinear

SIZES = [24, 24, 13]


def _pair():
    torch.manual_seed(0)
    split = SplitOutputLinear(16, SIZES)
    return split, split.weight.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("used", [(0, 1, 2), (1, 2), (0,)], ids=["all", "no-first", "first-only"])
def test_values_and_gradients_match_one_linear(used):
    split, weight = _pair()
    x = torch.randn(3, 5, 16, dtype=torch.float64).float().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    got = split(x)
    want = torch.split(F.linear(x_ref, weight), SIZES, -1)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert all(t.is_contiguous() for t in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    upstream = [torch.randn_like(w) for w in want]
    sum((got[i] * upstream[i]).sum() for i in used).backward()
    sum((want[i] * upstream[i]).sum() for i in used).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.weight.grad, weight.grad, rtol=1e-5, atol=1e-5)
    for i in set(range(len(SIZES))) - set(used):  # unused groups' rows get exactly zero
        rows = split.weight.grad.split(SIZES, 0)[i]
        assert torch.count_nonzero(rows) == 0


def test_autocast_casts_like_linear_and_returns_fp32_weight_grad():
    split, weight = _pair()
    x = torch.randn(4, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = split(x)
        want = torch.split(F.linear(x_ref, weight), SIZES, -1)
    assert all(g.dtype == torch.bfloat16 for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)  # the same bf16 products, rounded once
    sum(t.float().sum() for t in got).backward()
    sum(t.float().sum() for t in want).backward()
    assert split.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(split.weight.grad, weight.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2e-2, atol=2e-2)


def test_state_dict_is_a_plain_linear():
    split = SplitOutputLinear(16, SIZES)
    linear = torch.nn.Linear(16, sum(SIZES), bias=False)
    assert split.state_dict().keys() == linear.state_dict().keys()
    linear.load_state_dict(split.state_dict(), strict=True)
    assert isinstance(split, torch.nn.Linear)
