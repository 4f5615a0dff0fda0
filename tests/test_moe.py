"""The mixture-of-experts sublayer (models/moe.py) against transformers' own MoE modules, the
grouped path against the reference loop, and the balancing machinery on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from mamba_train.models.config import ConfigError, MambaLMConfig
from mamba_train.models.lm import MambaLM
from mamba_train.models.moe import (
    MOE_DEFAULTS, MoE, MoEImplError, aux_loss, experts_grouped, experts_loop, moe_stats,
    update_router_bias)

transformers = pytest.importorskip("transformers")

D = 64


def _moe(**cfg) -> MoE:
    torch.manual_seed(0)
    return MoE(D, {**MOE_DEFAULTS, **cfg})


def _tokens(n=96, seed=1):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _nemotron_pair(norm_topk_prob=True):
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

    hf_cfg = transformers.NemotronHConfig(
        hidden_size=D, n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, n_group=4, topk_group=2,
        norm_topk_prob=norm_topk_prob, routed_scaling_factor=2.5, mlp_hidden_act="relu2")
    torch.manual_seed(0)
    theirs = NemotronHMoE(hf_cfg).float()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
        theirs.gate.e_score_correction_bias.normal_(0, 0.3)  # makes the choice differ from scores
    ours = _moe(n_experts=8, top_k=3, d_expert=32, d_shared=48, act="relu2", router="sigmoid",
                n_group=4, topk_group=2, norm_topk_prob=norm_topk_prob,
                routed_scaling_factor=2.5, score_correction_bias=True)
    with torch.no_grad():
        ours.router.weight.copy_(theirs.gate.weight)
        ours.router.e_score_correction_bias.copy_(theirs.gate.e_score_correction_bias)
        ours.experts.fc1.weight.copy_(theirs.experts.up_proj)
        ours.experts.fc2.weight.copy_(theirs.experts.down_proj)
        ours.shared.fc1.weight.copy_(theirs.shared_experts.up_proj.weight)
        ours.shared.fc2.weight.copy_(theirs.shared_experts.down_proj.weight)
    return ours, theirs


def _granite_pair():
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import (
        GraniteMoeHybridMLP, GraniteMoeHybridMoE)

    hf_cfg = transformers.GraniteMoeHybridConfig(
        hidden_size=D, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
        shared_intermediate_size=48, hidden_act="silu")
    torch.manual_seed(0)
    moe, shared = GraniteMoeHybridMoE(hf_cfg).float(), GraniteMoeHybridMLP(hf_cfg).float()
    with torch.no_grad():
        for p in [*moe.parameters(), *shared.parameters()]:
            p.normal_(0, 0.2)

    def theirs(x):
        return moe(x) + shared(x)

    def swap(w, dim):  # transformers' [gate, up] -> our [up, gate]
        gate, up = w.chunk(2, dim)
        return torch.cat([up, gate], dim)

    ours = _moe(n_experts=8, top_k=2, d_expert=32, d_shared=48, act="swiglu", router="softmax")
    with torch.no_grad():
        ours.router.weight.copy_(moe.router.weight)
        ours.experts.fc1.weight.copy_(swap(moe.experts.gate_up_proj, 1))
        ours.experts.fc2.weight.copy_(moe.experts.down_proj)
        ours.shared.fc1.weight.copy_(swap(shared.input_linear.weight, 0))
        ours.shared.fc2.weight.copy_(shared.output_linear.weight)
    return ours, theirs


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("norm", [True, False])
def test_sigmoid_grouped_router_equals_nemotron_h(impl, norm):
    ours, theirs = _nemotron_pair(norm)
    ours.cfg["impl"] = impl
    x = _tokens().view(2, 48, D)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    _, _, w, idx = ours.router(x.view(-1, D))
    _, w_hf, idx_hf = theirs.gate(x)
    order, order_hf = idx.sort(-1), idx_hf.sort(-1)
    torch.testing.assert_close(order.values, order_hf.values)
    torch.testing.assert_close(w.gather(1, order.indices), w_hf.gather(1, order_hf.indices))


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_softmax_router_and_shared_mlp_equal_granite(impl):
    ours, theirs = _granite_pair()
    ours.cfg["impl"] = impl
    x = _tokens().view(2, 48, D)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_aux_loss_equals_switch_loss_of_transformers():
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import (
        load_balancing_loss_func)

    ours = _moe(n_experts=8, top_k=2, d_expert=32, aux_loss_coef=0.01, z_loss_coef=0.0)
    x = _tokens()
    ours(x)
    logits = ours.router(x)[0]
    want = 0.01 * load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(ours.aux_loss, want)
    ours.cfg["z_loss_coef"] = 1e-3
    ours(x)
    torch.testing.assert_close(ours.aux_loss,
                               want + 1e-3 * torch.logsumexp(logits, -1).square().mean())


@pytest.mark.parametrize("cfg", [dict(router="softmax", act="swiglu", d_shared=16),
                                 dict(router="sigmoid", act="relu2", n_group=2, topk_group=1,
                                      score_correction_bias=True, routed_scaling_factor=2.0)])
def test_grouped_equals_loop_values_and_gradients(cfg):
    results = []
    for impl in ("loop", "grouped"):
        moe = _moe(n_experts=8, top_k=2, d_expert=32, impl=impl, aux_loss_coef=0.01, **cfg)
        x = _tokens().requires_grad_()
        y = moe(x)
        ((y * _tokens(seed=7)).sum() + moe.aux_loss).backward()
        results.append((y, x.grad, {n: p.grad for n, p in moe.named_parameters()}))
    (y0, gx0, g0), (y1, gx1, g1) = results
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)


def test_every_assignment_reaches_its_expert_dropless():
    moe = _moe(n_experts=4, top_k=2, d_expert=32)
    with torch.no_grad():  # a router that sends every token to experts 0 and 1
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
        moe.router.weight[1] = 0.5
    x = _tokens().abs()
    _, _, w, idx = moe.router(x)
    assert set(idx.flatten().tolist()) == {0, 1}
    torch.testing.assert_close(experts_grouped(x, w, idx, moe.experts),
                               experts_loop(x, w, idx, moe.experts), rtol=1e-5, atol=1e-6)
    moe(x)
    stats = moe_stats(moe)
    torch.testing.assert_close(stats[".load"], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert stats[".imbalance"].item() == pytest.approx(2.0)


def test_routing_is_deterministic_under_a_seed():
    def route(seed):
        torch.manual_seed(seed)
        moe = MoE(D, {**MOE_DEFAULTS, "n_experts": 16, "top_k": 4, "d_expert": 32})
        return moe.router(_tokens())[3]

    assert torch.equal(route(3), route(3))
    assert not torch.equal(route(3), route(4))


def test_loss_free_bias_update_matches_its_definition():
    moe = _moe(n_experts=4, top_k=1, d_expert=32, router="sigmoid", score_correction_bias=True,
               bias_update_rate=0.01)
    with torch.no_grad():
        moe.router.e_score_correction_bias.copy_(torch.tensor([0.1, 0.0, -0.2, 0.0]))
        moe.bias_load.copy_(torch.tensor([3.0, 1.0, 0.0, 4.0]))  # mean 2
    update_router_bias(moe)
    # bias += 0.01 * sign(2 - load) = 0.01 * [-1, +1, +1, -1]
    torch.testing.assert_close(moe.router.e_score_correction_bias,
                               torch.tensor([0.09, 0.01, -0.19, -0.01]))
    assert moe.bias_load.abs().sum() == 0
    # the load comes from the forward: one token per assignment, outside the gradient
    x = _tokens(10)
    moe(x)
    idx = moe.router(x)[3]
    torch.testing.assert_close(moe.bias_load, torch.bincount(idx.flatten(), minlength=4).float())
    assert not moe.router.e_score_correction_bias.requires_grad


def _model(**moe):
    cfg = MambaLMConfig(
        d_model=D, n_layer=3, vocab_size=101, layer_pattern="M-ME*E", d_intermediate=128,
        ssm_cfg=dict(layer="Mamba2", headdim=16, d_state=16, chunk_size=16),
        attn_cfg=dict(num_heads=4, causal=True),
        moe_cfg={**dict(n_experts=8, top_k=2, d_expert=32, d_shared=32), **moe})
    torch.manual_seed(0)
    model = MambaLM(cfg, backend="reference")
    model.reset_parameters()
    return model


def test_model_loss_carries_the_balancing_terms():
    model = _model(aux_loss_coef=0.01, z_loss_coef=1e-3)
    ids = torch.randint(0, 101, (2, 32), generator=torch.Generator().manual_seed(0))
    total = model(ids, labels=ids).loss
    balance = aux_loss(model)
    assert balance.item() > 0
    model.config.moe_cfg.update(aux_loss_coef=0.0, z_loss_coef=0.0)
    for block in model.backbone.layers:
        if isinstance(block.mlp, MoE):
            block.mlp.cfg.update(aux_loss_coef=0.0, z_loss_coef=0.0)
    torch.testing.assert_close(total, model(ids, labels=ids).loss + balance)
    names = [n for n, _ in model.named_parameters()]
    assert "backbone.layers.1.mlp.experts.fc1.weight" in names
    assert model.backbone.layers[1].mlp.experts.fc1.weight.shape == (8, 64, D)


def test_fp64_model_with_impl_auto_runs_the_loop():
    """torch._grouped_mm has no fp64 kernel: impl=auto on an fp64 model (the tests' exact mode)
    takes the loop (it crashed in the grouped GEMM), and impl=grouped is refused in one line."""
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    auto = _model(impl="auto").double()
    loop = _model(impl="loop").double()
    torch.testing.assert_close(auto(ids).logits, loop(ids).logits, rtol=0, atol=0)
    with pytest.raises(MoEImplError, match="impl=grouped"):
        _model(impl="grouped").double()(ids)


@pytest.mark.parametrize("moe, message", [
    (dict(top_k=9), "top_k"), (dict(router="topk"), "router"),
    (dict(n_group=3), "n_group"), (dict(router="softmax", score_correction_bias=True), "sigmoid"),
    (dict(bias_update_rate=0.1), "score_correction_bias"), (dict(capacity=1.0), "unknown")])
def test_bad_moe_cfg_names_the_field(moe, message):
    with pytest.raises(ConfigError, match=message):
        _model(**moe)


def test_moe_cfg_without_an_E_sublayer_is_refused():
    with pytest.raises(ConfigError, match="no E"):
        MambaLMConfig(d_model=D, n_layer=1, vocab_size=8, layer_pattern="M",
                      ssm_cfg=dict(layer="Mamba2", headdim=16), moe_cfg=dict(n_experts=4))


def test_flops_and_summary_count_active_parameters():
    from mamba_train.models.flops import matmul_params

    model = _model()
    dense = dict(model.config.moe_cfg, top_k=8)  # every expert active: all weights count
    full = MambaLMConfig.from_dict({**model.config.to_dict(), "moe_cfg": dense})
    routed = sum(b.mlp.experts.fc1.weight.numel() + b.mlp.experts.fc2.weight.numel()
                 for b in model.backbone.layers if isinstance(b.mlp, MoE))
    # top_k=2 of 8 experts: three quarters of the routed weights are inactive per token
    assert matmul_params(full) - matmul_params(model.config) == routed * 3 // 4
    assert model.num_parameters() - model.num_active_parameters() == routed * 3 // 4
