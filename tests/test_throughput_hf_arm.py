"""``benchmarks/train_throughput.py``'s arm (a) for a layer-pattern recipe: transformers'
family built from our config (``benchmarks/hf_arms.py``) has exactly our parameters, tensor by
tensor through the export mapping, and the same weight-decay groups (built on the meta device:
no memory, no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from hf_arms import hf_model  # noqa: E402
from train_throughput import model_config  # noqa: E402

from mamba_train.formats.hf import family_for  # noqa: E402
from mamba_train.models.lm import MambaLM  # noqa: E402
from mamba_train.training.optim import param_groups  # noqa: E402


def test_hybrid_370m_arm_a_is_nemotron_h_with_our_parameters():
    cfg = model_config("hybrid-370m")[0]
    with torch.device("meta"):
        hf = hf_model(cfg)
    ours = MambaLM(cfg, backend="reference", device="meta")
    assert type(hf).__name__ == "NemotronHForCausalLM"
    assert hf.lm_head.weight is hf.get_input_embeddings().weight  # tied, as the recipe is
    want = {k: tuple(v.shape) for k, v in family_for(cfg)[0].to_hf(cfg, ours.state_dict()).items()}
    # named_parameters lists the tied head once, under the embedding's name
    assert {k: tuple(p.shape) for k, p in hf.named_parameters()} == {
        k: v for k, v in want.items() if k != "lm_head.weight"}
    sizes = [[sum(p.numel() for p in g["params"]) for g in param_groups(m, 0.1)] for m in (hf, ours)]
    assert sizes[0] == sizes[1]
