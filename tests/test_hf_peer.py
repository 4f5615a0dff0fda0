"""benchmarks/hf_peer.py on CPU: the transformers peer built through our export mapping has the
recipe's parameters (full-size recipes on the meta device: the same tensors by name and shape,
the same weight-decay groups), computes our model's loss with our weights, names the kernel path
it resolved, and the MOE lines' ratios."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hf_peer  # noqa: E402
from harness import _fmt_arm, model_config, plain_problem  # noqa: E402

from mamba_train.formats.hf import family_for, to_hf_state_dict  # noqa: E402
from mamba_train.models.build import build_model  # noqa: E402
from mamba_train.training.step.optim import param_groups  # noqa: E402


@pytest.mark.parametrize("name", ["hybrid-370m", "hybrid-moe-1b-a200m", "mamba2-130m"])
def test_the_peer_has_the_recipes_parameters(name):
    cfg = model_config(name)[0]
    ours = build_model(cfg, device="meta")
    with torch.device("meta"):
        peer = hf_peer.hf_model(cfg)
    assert hf_peer.num_parameters(peer) == ours.num_parameters()
    if cfg.tie_embeddings:  # NemotronHForCausalLM would otherwise carry an untied head
        assert peer.lm_head.weight is peer.get_input_embeddings().weight


def test_the_hybrid_peer_trains_our_tensors_in_our_decay_groups():
    """Tensor by tensor through the export mapping, and the decay groups the plain loop builds
    (``harness.timed_loop``) hold the same number of weights on both sides."""
    cfg = model_config("hybrid-370m")[0]
    ours = build_model(cfg, backend="reference", device="meta")
    with torch.device("meta"):
        peer = hf_peer.hf_model(cfg)
    assert type(peer).__name__ == "NemotronHForCausalLM"
    want = {k: tuple(v.shape) for k, v in family_for(cfg)[0].to_hf(cfg, ours.state_dict()).items()}
    # named_parameters lists the tied head once, under the embedding's name
    assert {k: tuple(p.shape) for k, p in peer.named_parameters()} == {
        k: v for k, v in want.items() if k != "lm_head.weight"}
    sizes = [[sum(p.numel() for p in g["params"]) for g in param_groups(m, 0.1)] for m in (peer, ours)]
    assert sizes[0] == sizes[1] and len(sizes[0]) == 2


@pytest.mark.parametrize("name", ["debug-nemotron-moe", "debug-nemotron-h"])
def test_the_peer_computes_our_loss_with_our_weights(name):
    cfg = model_config(name)[0]
    torch.manual_seed(0)
    ours = build_model(cfg, backend="reference", device="cpu").eval()
    peer = hf_peer.hf_model(cfg, attn="eager").eval()
    missing, unexpected = peer.load_state_dict(to_hf_state_dict(cfg, ours.state_dict()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: the embedding
    x = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(x[:, :-1]).logits
        want = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        got = hf_peer.peer_loss(peer, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_hybrids_have_no_mamba_ssm_arm():
    assert plain_problem(model_config("hybrid-370m")[0])
    assert plain_problem(model_config("mamba2-130m")[0]) is None


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is not None,
                    reason="mamba_ssm installed: transformers takes its kernels")
def test_the_kernel_path_names_the_pytorch_fallback_without_mamba_ssm():
    with torch.device("meta"):
        peer = hf_peer.hf_model(model_config("hybrid-moe-1b-a200m")[0])
    paths = hf_peer.kernel_paths(peer)
    assert paths["mamba2_split_conv1d_scan_combined"].startswith("transformers.")
    text = hf_peer.describe(peer)
    assert "PyTorch fallback" in text and "mamba2_split_conv1d_scan_combined" in text
    assert "NemotronHForCausalLM" in text and "attention sdpa" in text
    assert "experts grouped_mm on float32 weights" in text


def _arm(tok_s):
    return {"tok_s": tok_s, "peak_mem_gib": 1.0, "mfu": 0.1}


def test_moe_lines_give_each_ratio():
    arms = {"grouped": _arm(300.0), "grouped_eager": _arm(200.0), "loop": _arm(100.0)}
    lines = hf_peer.moe_lines("m", 8, arms, {**_arm(150.0), "path": "P"}, 2_000_000_000, _fmt_arm)
    text = "\n".join(lines)
    assert all(line.startswith("MOE m mb=8: ") for line in lines)
    assert "grouped/loop 3.00" in text and "graph gain 1.50" in text
    assert "grouped/loop eager 2.00" in text and "grouped/transformers 2.00" in text
    assert "active FLOPs/token 2.00 G" in text
    only = hf_peer.moe_lines("m", 8, {"grouped": _arm(300.0)}, None, 1, _fmt_arm)
    assert len(only) == 2 and "grouped/" not in "\n".join(only)  # no ratio without a second arm


def test_a_hybrid_runs_ours_the_peer_and_the_moe_arms_with_named_backends(monkeypatch, capsys):
    """The control flow of a model arm (a) cannot build, with the GPU runs stood in: which
    overrides each mamba_train run gets, and the lines printed (a failed arm reported, not fatal)."""
    import argparse

    import harness

    calls = []

    def fake_framework(name, mb, warmup, windows, window, data, runs, extra, tag=""):
        calls.append((tag, list(extra)))
        if tag == "-grouped_eager":
            raise RuntimeError("out of memory")
        return _arm({"": 300.0, "-loop": 100.0}[tag])

    monkeypatch.setattr(harness, "framework", fake_framework)
    def fake_peer(*a, experts=None, **k):
        if experts is None:  # transformers' default experts fail: its loop is tried next
            raise RuntimeError("grouped_mm: expected bf16")
        return {**_arm(150.0), "path": f"experts {experts}"}

    monkeypatch.setattr(hf_peer, "hf_peer_loop", fake_peer)
    args = argparse.Namespace(micro_batches=[8], override=["x=1"], moe_arms=True, hf_peer=True,
                              hf_attn="sdpa")
    entry = hf_peer.without_plain(args, "hybrid-moe-1b-a200m", 10, (1, 1, 1), None, None,
                                  lambda r: r.update(mfu=0.1), _fmt_arm)
    assert calls[0] == ("", ["x=1", "++model.moe_cfg.impl=grouped"])
    assert calls[2] == ("-loop", ["x=1", "++model.moe_cfg.impl=loop", "module.cuda_graph=off"])
    out = capsys.readouterr().out
    assert "PLAIN hybrid-moe-1b-a200m mb=8: not run" in out
    assert "transformers (experts default) failed: RuntimeError: grouped_mm" in out
    assert "[experts eager] | mamba_train" in out and "ratio mamba_train/transformers 2.00" in out
    assert "grouped_eager failed: RuntimeError" in out and "grouped/loop 3.00" in out
    assert set(entry["moe"]) == {"grouped", "loop"} and entry["hf_peer"]["tok_s"] == 150.0
