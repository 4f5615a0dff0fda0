"""The flash-linear-attention arms of ``train_throughput.py``.

* ``fla_peer_loop``: the same model through ``fla.models`` (``Mamba2ForCausalLM`` /
  ``MambaForCausalLM``, the models the flame trainer trains) in the same plain loop as arm (a):
  bf16 autocast over fp32 parameters, fused AdamW over the same decay groups, clip 1.0, the same
  micro-batch. The loss is fla's own (``labels=`` -> its fused cross-entropy), as flame calls it.
  fla's Mamba layers call mamba_ssm's kernels where installed, so this arm measures fla's model
  code around the same scan kernels, plus fla's fused norms and loss.
* ``ssd_kernel_arm``: mamba_train's path with ``kernels.ssd=fla`` (Mamba-2's SSD on
  fla's simple-GLA chunk kernels, ``mamba_train/models/ssd_fla.py``).
"""

from __future__ import annotations


def fla_model(cfg):
    """An fla ``*ForCausalLM`` with the shapes of a ``MambaLMConfig`` (padded vocabulary, tied
    embeddings, fp32 residual as in our recipes)."""
    kw = cfg.mixer_kwargs()
    common = dict(vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model,
                  num_hidden_layers=cfg.n_layer, norm_eps=cfg.norm_epsilon,
                  residual_in_fp32=cfg.residual_in_fp32, tie_word_embeddings=cfg.tie_embeddings,
                  expand=kw["expand"], conv_kernel=kw["d_conv"], use_bias=kw["bias"],
                  use_conv_bias=kw["conv_bias"], dt_min=kw["dt_min"], dt_max=kw["dt_max"],
                  dt_init_floor=kw["dt_init_floor"], fuse_norm=True, fuse_cross_entropy=True)
    if cfg.layer == "Mamba2":
        from fla.models import Mamba2Config, Mamba2ForCausalLM
        return Mamba2ForCausalLM(Mamba2Config(
            **common, head_dim=kw["headdim"], state_size=kw["d_state"], n_groups=kw["ngroups"],
            chunk_size=kw["chunk_size"], rmsnorm=kw["rmsnorm"],
            norm_before_gate=kw["norm_before_gate"], D_has_hdim=kw["D_has_hdim"]))
    from fla.models import MambaConfig, MambaForCausalLM
    return MambaForCausalLM(MambaConfig(**common, state_size=kw["d_state"], dt_rank=kw["dt_rank"]))


def fla_peer_loop(name: str, micro_batch: int, warmup: int, windows: int, window: int) -> dict:
    from harness import model_config, timed_loop

    import torch

    cfg, run_cfg = model_config(name)
    torch.manual_seed(0)
    model = fla_model(cfg).cuda()
    return timed_loop(model, float(run_cfg.optim.lr), micro_batch, warmup, windows, window,
                      loss_of=lambda m, x: m(input_ids=x[:, :-1], labels=x[:, :-1]).loss)


def ssd_kernel_arm(name: str, micro_batch: int, timing: tuple, data, runs, overrides: list[str]):
    from harness import framework
    return framework(name, micro_batch, *timing, data, runs,
                     [*overrides, "kernels.ssd=fla"], tag="-ssd-fla")
