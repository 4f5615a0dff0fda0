"""Regenerate ``mamba_ssm_keys_{mamba,mamba2}_130m.json``: the state-dict keys and shapes that
``mamba_ssm.MambaLMHeadModel(config).state_dict()`` (mamba_ssm 2.3.x) has for the released
``state-spaces/mamba-130m`` and ``state-spaces/mamba2-130m`` configs.

The lists are derived *independently of mamba_train*: nothing here imports our model. Every
key and shape is written out from the module definitions in mamba_ssm's source (which needs
CUDA to import, hence formulas instead of instantiating it):

* ``models/mixer_seq_simple.py``: ``MambaLMHeadModel`` pads ``vocab_size`` up to a multiple of
  ``pad_vocab_size_multiple``; ``MixerModel`` registers ``embedding`` (nn.Embedding), ``layers``,
  ``norm_f`` (RMSNorm when ``rms_norm``); ``lm_head`` is ``nn.Linear(d_model, vocab, bias=False)``,
  tied to the embedding (both keys still appear in ``state_dict()``).
* ``modules/block.py``: ``Block`` registers ``norm`` then ``mixer`` (``norm2``/``mlp`` only
  when ``d_intermediate > 0``).
* ``ops/triton/layer_norm.py`` / ``layernorm_gated.py``: ``RMSNorm`` has ``weight`` only
  (``register_parameter("bias", None)``).
* ``modules/mamba_simple.py`` (Mamba-1): ``d_inner = expand*d_model``,
  ``dt_rank = ceil(d_model/16)``; ``in_proj`` (2*d_inner, d_model), depthwise ``conv1d``
  (d_inner, 1, d_conv) + bias, ``x_proj`` (dt_rank + 2*d_state, d_inner), ``dt_proj``
  (d_inner, dt_rank) + bias, ``A_log`` (d_inner, d_state), ``D`` (d_inner,), ``out_proj``
  (d_model, d_inner); ``bias=False`` so no in/out_proj biases.
* ``modules/mamba2.py`` (Mamba-2): ``d_ssm = d_inner``, ``nheads = d_ssm/headdim``,
  ``in_proj`` (2*d_inner + 2*ngroups*d_state + nheads, d_model), ``conv1d`` over
  ``conv_dim = d_ssm + 2*ngroups*d_state`` channels + bias, ``dt_bias``/``A_log``/``D``
  (nheads,), gated ``norm.weight`` (d_ssm,), ``out_proj`` (d_model, d_inner).

Run ``python tests/data/make_key_lists.py`` to rewrite the JSON files next to this script.
"""

import json
import math
from pathlib import Path

HERE = Path(__file__).parent

CONFIGS = {
    # state-spaces/mamba-130m/config.json
    "mamba": dict(d_model=768, d_intermediate=0, n_layer=24, vocab_size=50277, ssm_cfg={},
                  attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True,
                  fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True),
    # state-spaces/mamba2-130m/config.json
    "mamba2": dict(d_model=768, d_intermediate=0, n_layer=24, vocab_size=50277,
                   ssm_cfg={"layer": "Mamba2"}, attn_layer_idx=[], attn_cfg={}, rms_norm=True,
                   residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
                   tie_embeddings=True),
}


def mamba1_mixer(d_model, d_state=16, d_conv=4, expand=2):
    d_inner = expand * d_model
    dt_rank = math.ceil(d_model / 16)
    return [
        ("in_proj.weight", [2 * d_inner, d_model]),
        ("conv1d.weight", [d_inner, 1, d_conv]),
        ("conv1d.bias", [d_inner]),
        ("x_proj.weight", [dt_rank + 2 * d_state, d_inner]),
        ("dt_proj.weight", [d_inner, dt_rank]),
        ("dt_proj.bias", [d_inner]),
        ("A_log", [d_inner, d_state]),
        ("D", [d_inner]),
        ("out_proj.weight", [d_model, d_inner]),
    ]


def mamba2_mixer(d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1):
    d_inner = expand * d_model
    d_ssm = d_inner
    nheads = d_ssm // headdim
    d_in_proj = 2 * d_inner + 2 * ngroups * d_state + nheads
    conv_dim = d_ssm + 2 * ngroups * d_state
    return [
        ("in_proj.weight", [d_in_proj, d_model]),
        ("conv1d.weight", [conv_dim, 1, d_conv]),
        ("conv1d.bias", [conv_dim]),
        ("dt_bias", [nheads]),
        ("A_log", [nheads]),
        ("D", [nheads]),
        ("norm.weight", [d_ssm]),
        ("out_proj.weight", [d_model, d_inner]),
    ]


def key_list(cfg):
    m = cfg["pad_vocab_size_multiple"]
    vocab = cfg["vocab_size"] + (-cfg["vocab_size"]) % m
    d = cfg["d_model"]
    mixer = mamba2_mixer(d) if cfg["ssm_cfg"].get("layer") == "Mamba2" else mamba1_mixer(d)
    keys = [("backbone.embedding.weight", [vocab, d])]
    for i in range(cfg["n_layer"]):
        keys.append((f"backbone.layers.{i}.norm.weight", [d]))
        keys += [(f"backbone.layers.{i}.mixer.{name}", shape) for name, shape in mixer]
    keys.append(("backbone.norm_f.weight", [d]))
    keys.append(("lm_head.weight", [vocab, d]))
    return keys


def main():
    for name, cfg in CONFIGS.items():
        out = HERE / f"mamba_ssm_keys_{name}_130m.json"
        doc = {"source": "mamba_ssm 2.3.x MambaLMHeadModel.state_dict(), derived by "
                         "tests/data/make_key_lists.py from mamba_ssm's module definitions",
               "config": cfg, "keys": [[k, s] for k, s in key_list(cfg)]}
        out.write_text(json.dumps(doc, indent=1) + "\n")
        n = sum(math.prod(s) for k, s in key_list(cfg) if k != "lm_head.weight")
        print(f"wrote {out} ({len(doc['keys'])} keys, {n:,} parameters)")


if __name__ == "__main__":
    main()
