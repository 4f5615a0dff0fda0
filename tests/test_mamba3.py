"""Mamba-3 on the reference backend: the chunked scan against the per-token oracle (float64,
outputs and gradients), packed documents against separate runs, the flattened varlen layout the
fused backend uses, init and its guard, weight-decay groups, and mamba_ssm 2.3.2's names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mamba_train.config_checks import config_warnings
from mamba_train.models.build import build_model
from mamba_train.models.config import ConfigError, MambaLMConfig
from mamba_train.models.flops import flops_breakdown, ssm_flops_per_token
from mamba_train.models.init import SSMInitError, check_ssm_init
from mamba_train.models.reference import Mamba3, mamba3_siso_chunked, mamba3_siso_sequential
from mamba_train.models.reference.mamba3_ops import cu_seqlens_from_seq_idx
from mamba_train.training.step.optim import no_weight_decay

F64 = torch.float64
KEYS = json.loads((Path(__file__).parent / "data" / "mamba_ssm_keys_mamba3_layer.json").read_text())


def scan_inputs(b=2, l=37, g=2, h=4, n=16, p=8, s=4, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    dt = torch.rand(b, h, l, generator=gen, dtype=dtype) * 0.5 + 0.01
    return dict(Q=r(b, l, g, n), K=r(b, l, g, n), V=r(b, l, h, p),
                ADT=-torch.rand(b, h, l, generator=gen, dtype=dtype) * dt * 3, DT=dt,
                Trap=r(b, h, l), Q_bias=r(h, n), K_bias=r(h, n), Angles=3 * r(b, l, h, s),
                D=r(h), Z=r(b, l, h, p))


def docs(b, l, cuts):
    """seq_idx (b, l): row r gets a new document at each position in cuts[r]."""
    seq = torch.zeros(b, l, dtype=torch.int32)
    for row, starts in enumerate(cuts):
        for c in starts:
            seq[row, c:] += 1
    return seq


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("chunk", [8, 16, 64])
@pytest.mark.parametrize("packed", [False, True])
def test_chunked_matches_sequential_oracle(chunk, packed):
    x = scan_inputs()
    seq_idx = docs(2, 37, [[1, 16], [9, 30, 36]]) if packed else None  # one cut on a chunk edge
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    y = mamba3_siso_chunked(**leaves, chunk_size=chunk, seq_idx=seq_idx)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(leaves.values()), g)
    y0 = mamba3_siso_sequential(**leaves, seq_idx=seq_idx)
    grads0 = torch.autograd.grad(y0, list(leaves.values()), g)
    assert rel(y, y0) < 1e-12
    for name, a, b in zip(leaves, grads, grads0):
        assert rel(a, b) < 1e-10, name


def test_document_start_restarts_every_state():
    """Changing the first document must not change anything in the second."""
    x = scan_inputs(b=1, l=20)
    seq_idx = docs(1, 20, [[11]])
    y = mamba3_siso_chunked(**x, chunk_size=8, seq_idx=seq_idx)
    x2 = {k: v.clone() for k, v in x.items()}
    for k in ("Q", "K", "V", "Angles", "Z"):
        x2[k][:, :11] = torch.randn_like(x2[k][:, :11])
    for k in ("ADT", "DT", "Trap"):
        x2[k][:, :, :11] = x2[k][:, :, :11] * 0.5
    y2 = mamba3_siso_chunked(**x2, chunk_size=8, seq_idx=seq_idx)
    assert torch.allclose(y[:, 11:], y2[:, 11:], atol=1e-12)
    assert not torch.allclose(y[:, :11], y2[:, :11])
    alone = {k: (v[:, :, 11:] if k in ("ADT", "DT", "Trap") else v[:, 11:]) if v.dim() > 2 else v
             for k, v in x.items()}
    assert rel(mamba3_siso_chunked(**alone, chunk_size=8), y[:, 11:]) < 1e-12


def test_flattened_varlen_layout_equals_batched():
    """The fused backend's layout: the micro-batch as one sequence cut by cu_seqlens."""
    x = scan_inputs(b=3, l=24)
    seq_idx = docs(3, 24, [[], [5], [10, 17]])
    y = mamba3_siso_chunked(**x, chunk_size=8, seq_idx=seq_idx)
    cu = cu_seqlens_from_seq_idx(seq_idx)
    assert cu.tolist() == [0, 24, 29, 48, 58, 65, 72]
    flat_idx = torch.zeros(1, 72, dtype=torch.int32)
    for i, start in enumerate(cu[1:-1].tolist()):
        flat_idx[0, start:] = i + 1
    flat = {k: (v.permute(1, 0, 2).reshape(1, v.shape[1], -1) if k in ("ADT", "DT", "Trap")
                else v.reshape(1, -1, *v.shape[2:])) if v.dim() > 2 else v for k, v in x.items()}
    y_flat = mamba3_siso_chunked(**flat, chunk_size=8, seq_idx=flat_idx)
    assert rel(y_flat.reshape(y.shape), y) < 1e-12


# ------------------------------------------------------------------------------- the mixer / LM
def tiny_config(**ssm):
    cfg = {"layer": "Mamba3", "d_state": 16, "headdim": 16, "chunk_size": 16, **ssm}
    return MambaLMConfig(d_model=32, n_layer=2, vocab_size=97, ssm_cfg=cfg)


@pytest.mark.parametrize("ssm", [{}, {"is_outproj_norm": True, "ngroups": 2, "rope_fraction": 1.0},
                                 {"A_activation": "heavy_tail"}])
def test_lm_packed_equals_separate(ssm):
    torch.manual_seed(0)
    model = build_model(tiny_config(**ssm), backend="reference").double()
    ids = torch.randint(0, 97, (2, 24))
    seq_idx = docs(2, 24, [[7], [13, 20]])
    out = model(ids, seq_idx=seq_idx).logits
    out.square().sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0
    for row, cuts in enumerate([[0, 7, 24], [0, 13, 20, 24]]):
        for a, b in zip(cuts[:-1], cuts[1:]):
            piece = model(ids[row:row + 1, a:b]).logits
            assert rel(piece, out[row:row + 1, a:b]) < 1e-11
            total = total + piece.square().sum()
    total.backward()
    for n, p in model.named_parameters():
        assert rel(p.grad, packed_grads[n]) < 1e-9, n


def test_mixer_trains_under_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    model = build_model(tiny_config(), backend="reference")
    ids = torch.randint(0, 97, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("case", sorted(KEYS))
def test_parameter_names_shapes_dtypes_match_mamba_ssm_232(case):
    kw = dict(KEYS[case]["kwargs"])
    mixer = Mamba3(**kw)
    got = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in mixer.state_dict().items()}
    assert got == KEYS[case]["params"]


def test_init_matches_mamba_ssm_and_is_guarded():
    torch.manual_seed(0)
    model = build_model(tiny_config(is_mimo=True, mimo_rank=2), backend="reference")
    assert check_ssm_init(model) == 2
    mixer = model.backbone.layers[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 and dt.max() / dt.min() > 1.5
    assert torch.all(mixer.B_bias == 1) and torch.all(mixer.C_bias == 1) and torch.all(mixer.D == 1)
    assert torch.allclose(mixer.mimo_x, torch.full_like(mixer.mimo_x, 0.5))
    assert torch.all(mixer.mimo_z == 1) and torch.allclose(mixer.mimo_o, mixer.mimo_x)
    with torch.no_grad():
        mixer.B_bias.zero_()  # what a generic "zero every bias" hook would do
    with pytest.raises(SSMInitError, match="B_bias"):
        check_ssm_init(model)
    model.reset_parameters()
    check_ssm_init(model)
    with torch.no_grad():
        mixer.dt_bias.zero_()
    with pytest.raises(SSMInitError, match="dt_bias"):
        check_ssm_init(model)


def test_mimo_reference_forward_says_what_to_do():
    model = build_model(tiny_config(is_mimo=True, mimo_rank=2), backend="reference")
    with pytest.raises(NotImplementedError, match="MIMO.*fused"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_no_weight_decay_on_mamba3_ssm_parameters():
    model = build_model(tiny_config(is_outproj_norm=True), backend="reference")
    names = {n for n, _ in model.named_parameters()}
    off = {n for n in names if no_weight_decay(n)}
    for suffix in ("dt_bias", "D", "B_bias", "C_bias", "B_norm.weight", "C_norm.weight", "norm.weight"):
        assert f"backbone.layers.0.mixer.{suffix}" in off, suffix
    assert "backbone.layers.0.mixer.in_proj.weight" not in off
    assert "backbone.layers.0.mixer.out_proj.weight" not in off


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="d_conv"):
        MambaLMConfig(d_model=32, n_layer=1, vocab_size=8, ssm_cfg={"layer": "Mamba3", "d_conv": 4})
    with pytest.raises(ConfigError, match="rope_fraction"):
        tiny_config(rope_fraction=0.25)
    with pytest.raises(ConfigError, match="A_activation"):
        tiny_config(A_activation="relu")
    cfg = tiny_config()
    assert MambaLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.to_dict()["ssm_cfg"]["layer"] == "Mamba3"  # as mamba_ssm's create_block reads it


def test_flops_count_the_mamba3_scan():
    cfg = tiny_config()
    d_inner, h, n, q = 64, 4, 16, 16
    assert ssm_flops_per_token(cfg, 128) == 2 * q * (n * h + d_inner) + 4 * n * d_inner + d_inner + 2 * n * h
    fb = flops_breakdown(cfg, 128)
    in_proj = 32 * (2 * 64 + 2 * 16 + 3 * 4 + 4)
    assert fb.matmul == 2 * (2 * (in_proj + 64 * 32) + 32 * 104)  # 2 layers + LM head (97 -> 104)


@pytest.mark.parametrize("recipe", ["debug-mamba3", "debug-mamba3-hybrid"])
def test_debug_mamba3_trains_through_the_cli_with_document_boundaries(recipe, tmp_path):
    """The CLI on the reference backend, packed documents on, a few tiny steps; the run's
    checkpoint holds mamba_ssm-named Mamba-3 weights and the loss is finite."""
    import subprocess
    import sys

    out = tmp_path / "outputs"
    cmd = [sys.executable, "-m", "mamba_train", f"recipe={recipe}", "backend=reference",
           "trainer.max_steps=3", "model.d_model=128", "data.seq_len=64", "data.micro_batch_size=2",
           "train.global_batch_tokens=128", "data.num_workers=0", "trainer.limit_val_batches=1",
           "train.val_every_n_steps=3", "train.checkpoint_every_n_steps=3",
           "data.document_boundaries=true", f"paths.output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / recipe / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    keys = set(ckpt["state_dict"])
    assert any(k.endswith("layers.0.mixer.B_bias") for k in keys), sorted(keys)[:10]
    summary = json.loads((out / recipe / "summary.json").read_text())
    assert all(torch.isfinite(torch.tensor(v)) for k, v in summary.items()
               if "loss" in k and isinstance(v, float))


def test_config_rejects_an_odd_number_of_rope_angles():
    with pytest.raises(ConfigError, match="multiple of 4"):
        tiny_config(d_state=12)  # 12 * 0.5 / 2 = 3 angles


def test_ssm_health_reports_mamba3_dt_and_bc_biases():
    from mamba_train.training.run.callbacks.ssm_health import SSMHealthMonitor

    model = build_model(tiny_config(), backend="reference")
    mixer = model.backbone.layers[1].mixer
    with torch.no_grad():
        mixer.C_bias.mul_(3.0)
    stats = SSMHealthMonitor(every_n_steps=1).health_stats(model)
    keys = {k.split("/")[-1] for k in stats if k.startswith("ssm/layer01/")}
    assert keys == {"dt_min", "dt_median", "dt_max", "B_bias_rms", "C_bias_rms", "param_norm"}
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert stats["ssm/layer01/dt_median"] == pytest.approx(dt.median().item())
    assert stats["ssm/layer01/B_bias_rms"] == pytest.approx(1.0)
    assert stats["ssm/layer01/C_bias_rms"] == pytest.approx(3.0)


def test_mamba_ssm_directory_round_trip(tmp_path):
    """save_pretrained writes mamba_ssm's config.json (ssm_cfg.layer = "Mamba3", as
    mixer_seq_simple.create_block reads it) and loads back to the same logits."""
    from mamba_train.formats.load import load_model

    torch.manual_seed(0)
    model = build_model(tiny_config(), backend="reference")
    path = model.save_pretrained(tmp_path / "m3")
    cfg = json.loads((Path(path) / "config.json").read_text())
    assert cfg["ssm_cfg"] == {"layer": "Mamba3", "d_state": 16, "headdim": 16, "chunk_size": 16}
    loaded = load_model(path, backend="reference")
    ids = torch.randint(0, 97, (1, 20))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_hf_export_refuses_mamba3_with_the_fix():
    from mamba_train.formats.hf import ExportError, check_hf_compatible

    with pytest.raises(ExportError, match="format=mamba_ssm"):
        check_hf_compatible(tiny_config())


def test_lm_eval_adapter_scores_a_trained_mamba3(tmp_path):
    """lm-eval through our adapter on a Mamba-3 checkpoint: batched scores equal the direct
    log-probabilities, and the model in it is a Mamba-3 stack."""
    import torch.nn.functional as F
    from lm_eval.api.instance import Instance

    from conftest import TINY, compose_config
    from mamba_train.data.tokenizer import load_tokenizer
    from mamba_train.evaluation.lm_eval_adapter import MambaTrainLM
    from mamba_train.train import train

    result = train(compose_config([*TINY, "recipe=debug-mamba3", "backend=reference", "logger=csv",
                                   "trainer.max_steps=2", "train.checkpoint_every_n_steps=2",
                                   "trainer.limit_val_batches=1", "train.val_every_n_steps=1000"],
                                  tmp_path))
    lm = MambaTrainLM(pretrained=str(result["last_checkpoint"]), batch_size=2, dtype="float32",
                      device="cpu")
    assert isinstance(lm.model.backbone.layers[0].mixer, Mamba3)
    tok = load_tokenizer("default")
    pairs = [("The primary must evaluate to", " an object"), ("which most", " objects do.")]
    scores = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=0)
                               for p in pairs])
    for (ctx, cont), (score, _) in zip(pairs, scores):
        ids = tok.encode(ctx + cont)
        n_ctx = len(tok.encode(ctx))
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0].float()
        lp = F.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert score == pytest.approx(lp[n_ctx - 1:].sum().item(), abs=1e-4)


def test_start_warns_of_the_measured_mamba3_lr_hazard(make_config):
    # the recipes' LRs pass; the Mamba-2 ladder's 3e-3 at the 180M width is named with the fix;
    # heavy-tail A, the debug width and Mamba-2 at 3e-3 are left alone
    assert config_warnings(make_config("recipe=mamba3-180m", tiny=False)) == []
    warned = config_warnings(make_config("recipe=mamba3-180m", "optim.lr=3e-3", tiny=False))
    assert len(warned) == 1 and "optim.lr<=1e-3" in warned[0] and "heavy_tail" in warned[0]
    assert config_warnings(make_config("recipe=mamba3-180m", "optim.lr=3e-3",
                                       "+model.ssm_cfg.A_activation=heavy_tail", tiny=False)) == []
    assert config_warnings(make_config("recipe=debug-mamba3", tiny=False)) == []
    assert config_warnings(make_config("recipe=mamba2-130m", tiny=False)) == []
    for size in ("440m", "820m", "1.5b"):
        assert config_warnings(make_config(f"recipe=mamba3-{size}", tiny=False)) == [], size


def test_start_warns_when_mamba3_kernels_would_leave_the_gpu_idle(make_config):
    # mamba3-440m: d_model 1024, so 32 heads of 64; one scan program per (head, sequence)
    long = ["recipe=mamba3-440m", "data.seq_len=65536", "train.global_batch_tokens=262144"]
    warned = config_warnings(make_config(*long, "data.micro_batch_size=1", tiny=False), sm_count=132)
    assert len(warned) == 1, warned
    assert "32 programs" in warned[0] and "132 multiprocessors" in warned[0]
    assert "76% of the GPU idles" in warned[0] and "data.micro_batch_size to 5" in warned[0]
    # 128 programs (micro-batch 4) measured within 6% of a full GPU: no warning; nor on the CPU
    # (no SM count), for Mamba-2, or for a GPU the micro-batch fills
    assert config_warnings(make_config(*long, "data.micro_batch_size=4", tiny=False), sm_count=132) == []
    assert config_warnings(make_config(*long, "data.micro_batch_size=1", tiny=False)) == []
    assert config_warnings(make_config(*long, "data.micro_batch_size=1", tiny=False), sm_count=24) == []
    assert config_warnings(make_config("recipe=mamba2-370m", "data.micro_batch_size=1", tiny=False),
                           sm_count=132) == []
