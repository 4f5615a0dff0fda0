"""The embedding's pad row against transformers: BambaForCausalLM, FalconH1ForCausalLM,
JambaForCausalLM and GraniteMoeHybridForCausalLM build ``nn.Embedding(vocab, d,
padding_idx=pad_token_id)`` (that row gets no gradient and starts at zero), NemotronHForCausalLM
trains every row. One training step on the same weights and batch on
both sides: the pad row's gradient and update match transformers', and every exported tensor
equals transformers' after the step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from test_hf_hybrids import VOCAB, bamba, falcon_h1, make_hf, nemotron_h  # noqa: E402
from test_hf_jamba import jamba  # noqa: E402
from test_moe_hf import granite  # noqa: E402

from mamba_train.formats.hf import to_hf_state_dict  # noqa: E402
from mamba_train.formats.load import load_model  # noqa: E402
from mamba_train.models.build import build_model  # noqa: E402
from mamba_train.models.config import ConfigError, MambaLMConfig  # noqa: E402

PAD = 5
FAMILIES = {  # (transformers config, whether transformers freezes the pad row)
    "bamba-untied": (bamba([1], False, pad_token_id=PAD), True),
    "bamba-tied": (bamba([0], True, pad_token_id=PAD), True),
    "falcon_h1": (falcon_h1(False, pad_token_id=PAD), True),
    "nemotron_h": (nemotron_h("M-*-", False, pad_token_id=PAD), False),
    # no balancing term: transformers leaves it out of the loss unless asked for router logits
    "jamba": (jamba(4, (2, 1), (2, 0), False, pad_token_id=PAD, router_aux_loss_coef=0.0), True),
    "granite-moe-tied": (granite(["mamba", "attention"], pad_token_id=PAD, router_aux_loss_coef=0.0,
                                 tie_word_embeddings=True), True),
}


def _batch() -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    ids[:, ::3] = PAD  # the pad id is in the input: its row would get a gradient
    return ids


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_one_step_updates_the_pad_row_as_transformers_does(tmp_path, case):
    spec, frozen = FAMILIES[case]
    hf, src = make_hf(tmp_path, spec)
    ours = load_model(src, backend="reference", device="cpu")
    assert ours.config.padding_idx == (PAD if frozen else None)
    hf.train()
    ids = _batch()
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    before = hf.get_input_embeddings().weight.detach().clone()

    hf_logits = hf(ids).logits
    F.cross_entropy(hf_logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    ours(ids, labels=labels).loss.backward()

    tied = hf.lm_head.weight is hf.get_input_embeddings().weight
    for model, emb in ((hf, hf.get_input_embeddings()), (ours, ours.backbone.embedding)):
        grad_row = emb.weight.grad[PAD]
        if frozen and not tied:  # a tied head still sends the pad token's logit gradient
            assert torch.count_nonzero(grad_row) == 0, type(model).__name__
        else:
            assert torch.count_nonzero(grad_row) > 0, type(model).__name__
    torch.testing.assert_close(ours.backbone.embedding.weight.grad[:VOCAB],
                               hf.get_input_embeddings().weight.grad, atol=1e-6, rtol=1e-4)

    for model in (hf, ours):  # a real learning rate
        torch.optim.SGD(model.parameters(), lr=0.5).step()
    after_hf = hf.get_input_embeddings().weight.detach()
    assert torch.equal(after_hf[PAD], before[PAD]) == (frozen and not tied)
    assert not torch.equal(after_hf[PAD + 1], before[PAD + 1])
    exported = to_hf_state_dict(ours.config, ours.state_dict())
    for key, want in hf.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        torch.testing.assert_close(exported[key], want, atol=2e-6, rtol=1e-4, msg=key)


def test_a_configured_pad_row_starts_at_zero_and_is_checked():
    cfg = MambaLMConfig(d_model=32, n_layer=2, vocab_size=VOCAB, layer_pattern="M-*-",
                        d_intermediate=48, ssm_cfg=dict(layer="Mamba2", d_state=8, headdim=16,
                                                        chunk_size=8),
                        attn_cfg=dict(num_heads=4, num_heads_kv=2, rotary_emb_dim=4, causal=True),
                        padding_idx=PAD)
    model = build_model(cfg, backend="reference")
    emb = model.backbone.embedding.weight
    assert torch.count_nonzero(emb[PAD]) == 0 and torch.count_nonzero(emb[PAD + 1]) > 0
    assert MambaLMConfig.from_dict(cfg.to_dict()).padding_idx == PAD
    with pytest.raises(ConfigError, match="model.padding_idx must be a token id"):
        MambaLMConfig(d_model=32, n_layer=1, vocab_size=VOCAB, padding_idx=VOCAB)
