"""``kernels.ssd``: checked with the run's settings, refused as a model key, ignored by the
reference backend; the fla forward's Mamba-2 -> simple-GLA mapping (q=C, k=B, v=Δx, g=AΔ, D skip, gate,
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


def test_ssd_kernel_checked_with_the_run_settings(make_config):
    from mamba_train.config_checks import config_problems

    assert config_problems(make_config("kernels.ssd=fla")) == []
    assert config_problems(make_config("kernels.ssd=triton")) == [
        "kernels.ssd='triton' must be mamba_ssm, mamba_train, fla"]


def test_ssd_kernel_in_the_model_config_names_its_key():
    with pytest.raises(ConfigError) as e:
        tiny(ssd_kernel="fla")
    assert str(e.value) == ("model.ssm_cfg.ssd_kernel is a kernel choice, not a model key: "
                            "set kernels.ssd instead")


def test_reference_backend_records_no_ssd_kernel():
    from mamba_train.models.build import build_model

    kernels = {"ssd": "mamba_train", "mamba1_recompute": True, "norm_backward": "mamba_ssm"}
    model = build_model(tiny(), backend="reference", kernels=kernels)
    assert model.kernels == {"backend": "reference"}  # what summary.json records: what ran


def test_resume_across_ssd_kernels_but_not_across_models(make_config):
    from hydra.utils import instantiate

    from mamba_train.formats.checkpoint import CKPT_CONFIG_KEY
    from mamba_train.cli.resume_overrides import is_safe

    # the module group's settings (kernels.ssd=fla), with this model config in place of the
    # model group's
    module = instantiate(make_config("kernels.ssd=fla").module, model_config=tiny())
    assert module.kernels["ssd"] == "fla"
    module.on_load_checkpoint({CKPT_CONFIG_KEY: tiny().to_dict()})  # same model, other kernel
    assert is_safe("kernels.ssd")  # a resume may change it
    other = MambaLMConfig(d_model=48, n_layer=1, vocab_size=64, ssm_cfg=SSM)
    from mamba_train.errors import MambaTrainError

    # a MambaTrainError (one line from the CLI, not a traceback) naming what differs
    with pytest.raises(MambaTrainError, match="different model config .*model.d_model: 48 in the checkpoint"):
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
