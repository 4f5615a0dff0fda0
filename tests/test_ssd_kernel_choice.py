"""``model.ssm_cfg.ssd_kernel``: validated, left out of saved configs, ignored by the reference
backend; the fla forward's Mamba-2 -> simple-GLA mapping (q=C, k=B, v=Δx, g=AΔ, D skip, gate,
group broadcast) checked on CPU with the kernels swapped for plain PyTorch."""

import pytest
import torch

from mamba_train import MambaLMConfig
from mamba_train.models.config import ConfigError
from mamba_train.models.lm import MambaLM
from mamba_train.models.reference.common import causal_conv1d
from mamba_train.models.ssd_fla import _per_group, _per_head, mamba2_forward_fla

SSM = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 16}


def tiny(**ssm) -> MambaLMConfig:
    return MambaLMConfig(d_model=32, n_layer=1, vocab_size=64, ssm_cfg={**SSM, **ssm})


def test_ssd_kernel_validated():
    with pytest.raises(ConfigError, match="ssd_kernel must be one of"):
        tiny(ssd_kernel="triton")
    tiny(ssd_kernel="fla")


@pytest.mark.parametrize("kernel", ["mamba_train", "fla"])
def test_ssd_kernel_not_saved_and_ignored_by_reference(kernel):
    cfg = tiny(ssd_kernel=kernel)
    assert "ssd_kernel" not in cfg.to_dict()["ssm_cfg"]
    assert MambaLMConfig.from_dict(cfg.to_dict()).ssm_cfg == tiny().ssm_cfg
    torch.manual_seed(0)
    a = MambaLM(cfg, backend="reference")
    b = MambaLM(tiny(), backend="reference")
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 64, (1, 20))
    torch.testing.assert_close(a(x).logits, b(x).logits, rtol=0, atol=0)


def test_resume_across_ssd_kernels_but_not_across_models(make_config):
    from hydra.utils import instantiate

    from mamba_train.formats.checkpoint import CKPT_CONFIG_KEY

    # the module group's settings, with this model config in place of the model group's
    module = instantiate(make_config().module, model_config=tiny(ssd_kernel="fla"))
    module.on_load_checkpoint({CKPT_CONFIG_KEY: tiny().to_dict()})  # same model, other kernel
    other = MambaLMConfig(d_model=48, n_layer=1, vocab_size=64, ssm_cfg=SSM)
    with pytest.raises(ValueError, match="different model config"):
        module.on_load_checkpoint({CKPT_CONFIG_KEY: other.to_dict()})


def test_group_broadcast_and_its_gradient_are_adjoint():
    a, b = torch.randn(2, 5, 2, 3), torch.randn(2, 5, 6, 3)
    # <expand(a), b> == <a, sum_over_group(b)>
    torch.testing.assert_close((_per_head(a, 6) * b).sum(), (a * _per_group(b, 2)).sum())
    assert torch.equal(_per_head(a, 6)[:, :, 3], a[:, :, 1])  # heads 3-5 are group 1


def gla_recurrence(v, g, B, C):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t with q = C, k = B per head's group."""
    b, l, h, p = v.shape
    k, q = _per_head(B, h).double(), _per_head(C, h).double()
    S = torch.zeros(b, h, B.shape[-1], p, dtype=torch.float64)
    out = []
    for t in range(l):
        S = S * g[:, t].double().exp()[..., None, None] + k[:, t, :, :, None] * v[:, t, :, None, :].double()
        out.append(torch.einsum("bhn,bhnp->bhp", q[:, t], S))
    return torch.stack(out, 1).to(v.dtype)


@pytest.mark.parametrize("ssm", [{}, {"ngroups": 2}, {"rmsnorm": False}, {"D_has_hdim": True},
                                 {"d_ssm": 32}])
def test_fla_forward_maps_onto_the_mamba2_recurrence(ssm):
    torch.manual_seed(0)
    mixer = MambaLM(tiny(**ssm), backend="reference").backbone.layers[0].mixer
    with torch.no_grad():
        mixer.D.normal_()  # a non-trivial skip
    u = torch.randn(2, 37, 32)

    def conv(x, m):
        return causal_conv1d(x, m.conv1d.weight, m.conv1d.bias, activation=m.activation)

    got = mamba2_forward_fla(mixer, u, ssd=gla_recurrence, conv=conv)
    torch.testing.assert_close(got, mixer(u), rtol=1e-4, atol=1e-5)
