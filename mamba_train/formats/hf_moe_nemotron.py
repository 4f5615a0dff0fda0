"""Nemotron 3 mixture-of-experts sublayers (transformers' ``NemotronHMoE``, a ``moe`` entry of
``layers_block_type``, ``E`` in the pattern) <-> our ``E`` sublayer (``models/moe.py``).

The maths read in transformers 5.x ``models/nemotron_h/modeling_nemotron_h.py``: a sigmoid router
(``NemotronHTopkRouter``: fp32 logits, ``e_score_correction_bias`` added for the choice only,
``n_group``/``topk_group`` grouped top-k ranking a group by its two best scores, optional
normalisation, ``routed_scaling_factor``), squared-ReLU experts without a gate stored as
``experts.up_proj`` (E, I, D) and ``experts.down_proj`` (E, D, I) -- our ``experts.fc1``/``fc2``
layout exactly -- and an always-present shared expert ``shared_experts.{up,down}_proj``.
``moe_latent_size`` (a latent projection around the experts) has no counterpart here.
"""

from __future__ import annotations

from typing import Any

from mamba_train.formats.hf_family import ExportError
from mamba_train.formats.hf_hybrids import SUBLAYER_CONVERTERS

FAMILY = "NemotronHForCausalLM"
# our name under <block>.mlp -> transformers' under <layer>.mixer
NAMES = (("router.weight", "gate.weight"),
         ("router.e_score_correction_bias", "gate.e_score_correction_bias"),
         ("experts.fc1.weight", "experts.up_proj"), ("experts.fc2.weight", "experts.down_proj"),
         ("shared.fc1.weight", "shared_experts.up_proj.weight"),
         ("shared.fc2.weight", "shared_experts.down_proj.weight"))


def moe_cfg_from(c) -> dict[str, Any]:
    """Our ``moe_cfg`` of a NemotronHConfig with ``moe`` layers."""
    if getattr(c, "moe_latent_size", None) is not None:
        raise ExportError(f"config.json moe_latent_size={c.moe_latent_size}: Nemotron-H's latent "
                          "expert projection is not implemented")
    if c.mlp_bias:
        raise ExportError("config.json mlp_bias=true with moe layers: it gives Nemotron-H's "
                          "shared experts biases, and mamba_train's shared expert has none")
    return dict(n_experts=c.n_routed_experts, top_k=c.num_experts_per_tok,
                d_expert=c.moe_intermediate_size, d_shared=c.moe_shared_expert_intermediate_size,
                act="relu2", router="sigmoid", n_group=c.n_group, topk_group=c.topk_group,
                norm_topk_prob=bool(c.norm_topk_prob),
                routed_scaling_factor=float(c.routed_scaling_factor), score_correction_bias=True)


def moe_fields(cfg) -> dict[str, Any]:
    """The NemotronHConfig fields of our ``moe_cfg`` (ExportError naming what does not fit)."""
    m = cfg.moe_kwargs()
    refuse = []
    if m["router"] != "sigmoid":
        refuse.append(("router", "its router is sigmoid scores"))
    if m["act"] != "relu2":
        refuse.append(("act", "its experts are squared-ReLU without a gate"))
    if not m["d_shared"]:
        refuse.append(("d_shared", "every MoE layer has a shared expert"))
    if cfg.mlp_kwargs()["bias"]:
        raise ExportError(f"model.mlp_cfg.bias=true: its mlp_bias would give the shared "
                          f"experts biases; transformers' {FAMILY} cannot represent it")
    if refuse:
        key, why = refuse[0]
        raise ExportError(f"model.moe_cfg.{key}={m.get(key, True)}: {why}; transformers' "
                          f"{FAMILY} cannot represent it")
    return dict(n_routed_experts=m["n_experts"], num_experts_per_tok=m["top_k"],
                moe_intermediate_size=m["d_expert"],
                moe_shared_expert_intermediate_size=m["d_shared"], n_group=m["n_group"],
                topk_group=m["topk_group"], norm_topk_prob=bool(m["norm_topk_prob"]),
                routed_scaling_factor=float(m["routed_scaling_factor"]), moe_latent_size=None)


def convert(ours: str, theirs: str, state, out, to_hf: bool, cfg) -> None:
    """One MoE sublayer's tensors, ours <-> transformers' names. Export writes the stacked form
    of transformers' modules (``experts.up_proj`` (E, I, D)), which ``from_pretrained`` loads
    as is; reading also takes one matrix per expert (``experts.{j}.up_proj.weight``, what
    ``save_pretrained`` writes and NVIDIA's checkpoints hold). A model without a correction
    bias exports zeros, which is the same router."""
    import torch

    n = cfg.moe_kwargs()["n_experts"]
    for a, b in NAMES:
        src, dst = (f"{ours}.{a}", f"{theirs}.{b}") if to_hf else (f"{theirs}.{b}", f"{ours}.{a}")
        per_expert = b.startswith("experts.")
        if src in state:
            out[dst] = state[src]
        elif not to_hf and per_expert:
            proj = b.split(".")[1]
            names = [f"{theirs}.experts.{j}.{proj}.weight" for j in range(n)]
            if all(k in state for k in names):
                out[dst] = torch.stack([state[k] for k in names])
        elif to_hf and a == "router.e_score_correction_bias":
            out[dst] = torch.zeros(n, dtype=torch.float32)


SUBLAYER_CONVERTERS["moe_nemotron"] = convert
