"""The transformers arms of ``train_throughput.py`` (``--hf-peer``, ``--moe-arms``).

* ``hf_model``: transformers' own model class for one of our recipes (``NemotronHForCausalLM``
  for ``hybrid-370m`` and, with its MoE layers, ``hybrid-moe-1b-a200m``; ``Mamba2ForCausalLM`` /
  ``MambaForCausalLM`` for the Mamba recipes), built with random weights from the transformers
  config our exporter writes (``mamba_train.formats.hf.to_hf_config``), so the shapes are the
  recipe's by the same mapping a checkpoint export uses; ``tests/test_hf_peer.py`` checks that
  the parameter counts agree.
* ``hf_peer_loop``: that model in ``harness.timed_loop``, the plain loop of arm (a):
  bf16 autocast over fp32 parameters, fused AdamW over the same decay groups, clip 1.0, the same
  micro-batch, seq_len and timing windows, the loss on an fp32 copy of the logits, no
  torch.compile, ``use_cache=False``.
* ``kernel_paths`` / ``describe``: which implementation transformers resolved for its
  kernel-backed functions. Its Mamba-2 mixer calls ``mamba_ssm``'s fused
  ``mamba_split_conv1d_scan_combined`` (and ``causal_conv1d``) where those packages are
  installed and falls back to PyTorch otherwise; the experts run through
  ``config._experts_implementation`` (``grouped_mm`` by default, which autocast does not
  reach: it casts the tokens to the weights' dtype, so in this loop over fp32 parameters the
  expert GEMMs run in fp32, as they would in any such loop) and attention through
  ``config._attn_implementation``. Each PEER/MOE line names them, so a ratio is never read
  against a PyTorch fallback by mistake.
* ``moe_arms``: mamba_train's MoE backends (``model.moe_cfg.impl``: ``grouped``, one
  ``torch._grouped_mm`` per projection with device-side offsets, captured; ``loop``, one matmul
  per expert on host-side index sets, which a CUDA graph cannot capture, so eager) and the
  grouped backend eager, to split the backend's gain from the graph's. MFU on active FLOPs
  (``mamba_train.models.flops``: the router, shared expert and ``top_k`` routed experts).
"""

from __future__ import annotations

import inspect
import sys

MOE_IMPL_KEY = "++model.moe_cfg.impl"


def hf_model(cfg, attn: str = "sdpa", experts: str | None = None):
    """transformers' model for our ``MambaLMConfig``, random weights, fp32, on the current
    default device (``with torch.device("cuda"):`` builds it on the GPU); ``experts`` an
    ``experts_implementation`` (None: transformers' default)."""
    import transformers

    from mamba_train.formats.hf import to_hf_config

    hf_cfg = to_hf_config(cfg)
    cls = getattr(transformers, hf_cfg.architectures[0])
    kwargs = {"attn_implementation": attn} if attn and cfg.n_attention_layers else {}
    if experts and cfg.n_moe_layers:
        kwargs["experts_implementation"] = experts
    model = cls._from_config(hf_cfg, **kwargs)
    emb = model.get_input_embeddings().weight
    if cfg.tie_embeddings and model.lm_head.weight is not emb:
        # NemotronHForCausalLM never ties its head (empty _tied_weights_keys); tied by assignment
        # so the peer trains the recipe's parameters, not 51M more
        model.lm_head.weight = emb
    return model


def num_parameters(model) -> int:
    """Parameters counted once (tied weights once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _resolved(obj, depth: int = 4):
    """The implementation transformers picked for a kernel-backed function: the ``implementation``
    its fallback wrapper closes over (``integrations/hub_kernels.py``), found through the
    ``kernels`` package's function-module wrapper where that is installed; None if not one."""
    import torch

    if depth == 0:
        return None
    if isinstance(obj, torch.nn.Module):  # kernels' Func(): forward closes over the function
        return _resolved(type(obj).forward, depth - 1)
    if not inspect.isfunction(obj):
        return None
    try:
        nonlocals = inspect.getclosurevars(obj).nonlocals
    except (TypeError, ValueError):
        return None
    if "implementation" in nonlocals and "torch_function" in nonlocals:
        return nonlocals["implementation"]
    for value in nonlocals.values():
        if callable(value) and value is not obj:
            found = _resolved(value, depth - 1)
            if found is not None:
                return found
    return None


def kernel_paths(model) -> dict[str, str]:
    """Kernel-backed function of the model's module -> the module implementing it
    (``mamba_ssm...`` / ``causal_conv1d...``, or ``transformers...`` for the PyTorch fallback)."""
    module = sys.modules.get(type(model).__module__)
    out = {}
    for name, obj in sorted(vars(module).items() if module else ()):
        if name.startswith("_") or inspect.isclass(obj) or inspect.ismodule(obj):
            continue
        impl = _resolved(obj)
        if impl is not None:
            out[name] = getattr(impl, "__module__", None) or "?"
    return out


def describe(model) -> str:
    """One phrase: the class, the mamba kernels path, attention and experts implementations."""
    paths = kernel_paths(model)
    fused = [n for n, m in paths.items() if not m.startswith("transformers")]
    fallback = [n for n in paths if n not in fused]
    parts = [type(model).__name__]
    if paths:
        packages = sorted({paths[n].split(".")[0] for n in fused})
        parts.append(f"kernels: {'+'.join(packages) or 'none'}"
                     + (f" (PyTorch fallback: {', '.join(fallback)})" if fallback else ""))
    cfg = model.config
    parts.append(f"attention {getattr(cfg, '_attn_implementation', '?')}")
    if getattr(cfg, "n_routed_experts", None):
        # transformers' grouped_mm is outside autocast: it casts the tokens to the weights'
        # dtype (integrations/moe.py), so fp32 parameters give fp32 expert GEMMs
        w = next((p for n, p in model.named_parameters() if ".experts." in n), None)
        dtype = str(w.dtype).removeprefix("torch.") if w is not None else "?"
        parts.append(f"experts {getattr(cfg, '_experts_implementation', '?')} on {dtype} weights")
    return ", ".join(parts)


def peer_loss(model, x):
    """The plain loop's loss for a transformers model: next-token cross-entropy of
    ``x[:, :-1]`` -> ``x[:, 1:]`` on an fp32 copy of the logits, no cache."""
    import torch.nn.functional as F

    logits = model(input_ids=x[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


def hf_peer_loop(name: str, micro_batch: int, warmup: int, windows: int, window: int,
                 attn: str = "sdpa", experts: str | None = None) -> dict:
    import torch

    from harness import model_config, timed_loop

    cfg, run_cfg = model_config(name)
    torch.manual_seed(0)
    with torch.device("cuda"):  # built on the GPU; .to() in case transformers built elsewhere
        model = hf_model(cfg, attn, experts).to("cuda")
    model.train()
    path = describe(model)

    result = timed_loop(model, float(run_cfg.optim.lr), micro_batch, warmup, windows, window,
                        peer_loss)
    result["path"] = path
    return result


def peer_line(name: str, mb: int, peer: dict, ours: dict, fmt) -> str:
    return (f"PEER {name} mb={mb}: transformers {fmt(peer)} [{peer['path']}] | mamba_train "
            f"{fmt(ours)} | ratio mamba_train/transformers {ours['tok_s'] / peer['tok_s']:.2f}")


def moe_arms(name: str, mb: int, timing: tuple, data, runs, overrides: list[str],
             grouped: dict, add_mfu) -> dict:
    """The loop backend (eager) and the grouped backend eager, against ``grouped`` (captured)."""
    from harness import framework

    arms = {"grouped": grouped}
    for label, extra in (("grouped_eager", [f"{MOE_IMPL_KEY}=grouped", "module.cuda_graph=off"]),
                         ("loop", [f"{MOE_IMPL_KEY}=loop", "module.cuda_graph=off"])):
        try:
            r = framework(name, mb, *timing, data, runs, [*overrides, *extra], tag=f"-{label}")
        except Exception as e:  # report and go on: the other arms' numbers still count
            print(f"MOE {name} mb={mb}: {label} failed: {type(e).__name__}: {e}"[:300], flush=True)
            continue
        add_mfu(r)
        arms[label] = r
    return arms


def moe_lines(name: str, mb: int, arms: dict, peer: dict | None, fpt: int, fmt) -> list[str]:
    g = arms["grouped"]
    lines = [f"MOE {name} mb={mb}: active FLOPs/token {fpt / 1e9:.2f} G (MFU on active FLOPs)"]
    for label, what in (("grouped", "impl=grouped, captured"),
                        ("grouped_eager", "impl=grouped, eager"), ("loop", "impl=loop, eager")):
        if label in arms:
            lines.append(f"MOE {name} mb={mb}: {label} ({what}) {fmt(arms[label])}")
    ratios = []
    if "loop" in arms:
        ratios.append(f"grouped/loop {g['tok_s'] / arms['loop']['tok_s']:.2f}")
    if "grouped_eager" in arms:
        ratios.append(f"graph gain {g['tok_s'] / arms['grouped_eager']['tok_s']:.2f}")
        if "loop" in arms:
            ratios.append(f"grouped/loop eager {arms['grouped_eager']['tok_s'] / arms['loop']['tok_s']:.2f}")
    if peer is not None:
        lines.append(f"MOE {name} mb={mb}: transformers {fmt(peer)} [{peer['path']}]")
        ratios.append(f"grouped/transformers {g['tok_s'] / peer['tok_s']:.2f}")
    if ratios:
        lines.append(f"MOE {name} mb={mb}: " + " | ".join(ratios))
    return lines


def _free() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_peer_arm(args, name: str, ours: dict, entry: dict, timing: tuple, add_mfu, fmt):
    """The transformers arm at the first micro-batch and its PEER line (None if it failed)."""
    from harness import model_config

    mb = args.micro_batches[0]
    # transformers' default experts first; where that fails (its grouped_mm over fp32 weights),
    # its per-expert loop, so the call still gives a number
    tries = [None, "eager"] if model_config(name)[0].n_moe_layers else [None]
    for experts in tries:
        try:
            peer = hf_peer_loop(name, mb, *timing, attn=args.hf_attn, experts=experts)
            break
        except Exception as e:  # a failed peer must not lose the other arms' lines
            print(f"PEER {name} mb={mb}: transformers (experts {experts or 'default'}) failed: "
                  f"{type(e).__name__}: {e}"[:300], flush=True)
        _free()  # after the except block: the traceback no longer holds the failed model
    else:
        return None
    add_mfu(peer)
    entry["hf_peer"] = peer
    print(peer_line(name, mb, peer, ours, fmt), flush=True)
    _free()
    return peer


def without_plain(args, name: str, fpt: int, timing: tuple, data, runs, add_mfu, fmt) -> dict:
    """A model arm (a) cannot build (the hybrids): mamba_train, then transformers' class
    (``--hf-peer``) and the MoE arms (``--moe-arms``), at the first micro-batch."""
    from harness import framework, model_config, plain_problem

    cfg = model_config(name)[0]
    mb, problem = args.micro_batches[0], plain_problem(cfg)
    moe = bool(args.moe_arms and cfg.n_moe_layers)
    print(f"PLAIN {name} mb={mb}: not run: {problem}", flush=True)
    # the MoE comparison names its backend rather than trusting impl=auto's choice
    b = framework(name, mb, *timing, data, runs,
                  [*args.override, *([f"{MOE_IMPL_KEY}=grouped"] if moe else [])])
    add_mfu(b)
    entry = {"flops_per_token": fpt, "plain_problem": problem, "mamba_train": b, "micro_batch": mb}
    print(f"THROUGHPUT {name} mb={mb}: plain not run | mamba_train {fmt(b)}", flush=True)
    peer = hf_peer_arm(args, name, b, entry, timing, add_mfu, fmt) if args.hf_peer else None
    if moe:
        arms = moe_arms(name, mb, timing, data, runs, args.override, b, add_mfu)
        entry["moe"] = arms
        for line in moe_lines(name, mb, arms, peer, fpt, fmt):
            print(line, flush=True)
    return entry
