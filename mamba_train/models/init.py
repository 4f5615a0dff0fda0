"""Initialisation of a Mamba LM as an explicit, re-runnable contract, and the check that guards it.

``mamba_ssm`` initialises the SSM parameters (Δ bias, A_log, D) inside each mixer's ``__init__``
and protects the Δ bias from its own weight init with a ``_no_reinit`` attribute. Every other
framework loses that: meta-device materialisation never runs ``__init__``, FSDP2 drops Parameter
attributes, generic ``model.apply(init_fn)`` hooks zero every ``nn.Linear`` bias (the Mamba-1 Δ
bias lives in one). So here:

* ``init_weights(model)`` is one idempotent routine that reproduces mamba_ssm's distributions for
  every parameter, callable after any materialisation; ``MambaLM.reset_parameters`` calls it.
* each mixer has a ``reset_parameters`` that re-runs its own SSM init, so a framework that calls
  ``reset_parameters`` module by module (FSDP's meta materialisation) gets the right values;
* the Mamba-1 Δ projection is a ``DeltaProjection`` -- same parameter names and maths as
  ``nn.Linear`` but *not* an ``nn.Linear`` -- so ``isinstance(m, nn.Linear)`` init hooks skip it,
  and its own ``reset_parameters`` draws the Δ range instead of PyTorch's default;
* ``check_ssm_init(model)`` verifies the distributions of a freshly initialised model and raises
  an ``SSMInitError`` naming the parameter when they are wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mamba_train.errors import MambaTrainError


class SSMInitError(MambaTrainError, RuntimeError):
    """A freshly initialised model whose SSM parameters do not have the S4/Mamba distribution."""


@dataclass(frozen=True)
class SSMInitSpec:
    """The mixer arguments that determine its SSM initialisation (mamba_ssm defaults)."""

    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_init: str = "random"  # Mamba-1 only: "random" | "constant" Δ-projection weight
    dt_scale: float = 1.0  # Mamba-1 only
    A_init_range: tuple = (1, 16)  # Mamba-2 only
    conv_init: float | None = None  # Mamba-2 only
    # Mamba-2 only, the transformers hybrids' own init: "arange" draws A_h = h (h = 1..nheads,
    # Nemotron-H, Bamba, Falcon-H1) instead of uniform in A_init_range; dt_bias_init a constant
    # Δ bias (Bamba and Falcon-H1: 1) instead of softplus⁻¹ of a log-uniform dt
    A_init: str = "uniform"
    dt_bias_init: float | None = None


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """y such that softplus(y) == x (stable form of log(exp(x) - 1))."""
    return x + torch.log(-torch.expm1(-x))


@torch.no_grad()
def init_delta_bias_(bias: torch.Tensor, spec: SSMInitSpec) -> None:
    """Δ bias = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max], floored at dt_init_floor."""
    log_lo, log_hi = math.log(spec.dt_min), math.log(spec.dt_max)
    dt = torch.exp(torch.rand(bias.shape, device=bias.device) * (log_hi - log_lo) + log_lo)
    dt = dt.clamp(min=spec.dt_init_floor)
    bias.copy_(inverse_softplus(dt))


class DeltaProjection(nn.Module):
    """Mamba-1's Δ projection (``dt_proj``): ``x @ weight.T + bias``, dt_rank -> d_inner.

    Deliberately not an ``nn.Linear`` (see module docstring): generic Linear init hooks cannot
    reach its bias, and ``reset_parameters`` restores the Δ range rather than PyTorch's default.
    ``mamba_ssm`` reads only ``.weight`` and ``.bias`` from it, so the fused kernels accept it.
    """

    def __init__(self, dt_rank: int, d_inner: int, spec: SSMInitSpec, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = dt_rank, d_inner
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(d_inner, dt_rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(d_inner, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        std = self.in_features**-0.5 * self.spec.dt_scale
        if self.spec.dt_init == "constant":
            self.weight.fill_(std)
        elif self.spec.dt_init == "random":
            self.weight.uniform_(-std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {self.spec.dt_init!r}")
        init_delta_bias_(self.bias, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: SSMInitSpec) -> "DeltaProjection":
        """Adopt the parameters of an existing ``nn.Linear`` (mamba_ssm's ``dt_proj``)."""
        proj = cls.__new__(cls)
        nn.Module.__init__(proj)
        proj.in_features, proj.out_features = linear.in_features, linear.out_features
        proj.spec = spec
        proj.weight, proj.bias = linear.weight, linear.bias
        return proj


def mixer_kind(module: nn.Module) -> str | None:
    """'mamba1', 'mamba2', 'mamba3' or None, by parameter layout (fused and reference mixers)."""
    if hasattr(module, "A_log") and hasattr(module, "dt_proj"):
        return "mamba1"
    if hasattr(module, "A_log") and hasattr(module, "dt_bias"):
        return "mamba2"
    if hasattr(module, "B_bias") and hasattr(module, "dt_bias"):
        return "mamba3"  # data-dependent A: no A_log
    return None


def checked_parameters(mixer: nn.Module) -> list[nn.Parameter]:
    """The parameters ``check_ssm_init`` reads for one mixer (to gather them when sharded)."""
    kind = mixer_kind(mixer)
    if kind == "mamba1":
        return [mixer.A_log, mixer.D, mixer.dt_proj.weight, mixer.dt_proj.bias]
    if kind == "mamba2":
        return [mixer.A_log, mixer.D, mixer.dt_bias]
    if kind == "mamba3":
        return [mixer.D, mixer.dt_bias, mixer.B_bias, mixer.C_bias]
    return []


def _init_mamba3_(mixer: nn.Module, spec: SSMInitSpec) -> None:
    """mamba_ssm's Mamba-3 draws: dt_bias as Mamba-2's, B/C biases 1, MIMO x/o 1/R and z 1."""
    init_delta_bias_(mixer.dt_bias, spec)
    mixer.B_bias.fill_(1.0)
    mixer.C_bias.fill_(1.0)
    if hasattr(mixer, "mimo_x"):
        rank = mixer.mimo_x.shape[1]
        mixer.mimo_x.fill_(1.0 / rank)
        mixer.mimo_z.fill_(1.0)
        mixer.mimo_o.fill_(1.0 / rank)


def _mamba2_A(A_log: torch.Tensor, spec: SSMInitSpec) -> torch.Tensor:
    """A fresh Mamba-2 -A per head: uniform in A_init_range, or 1..nheads ("arange")."""
    if spec.A_init == "arange":
        return torch.arange(1, A_log.numel() + 1, dtype=torch.float32,
                            device=A_log.device).view(A_log.shape)
    lo, hi = spec.A_init_range
    return torch.empty(A_log.shape, dtype=torch.float32, device=A_log.device).uniform_(lo, hi)


@torch.no_grad()
def init_ssm_parameters_(mixer: nn.Module) -> None:
    """Re-run the SSM init of one mixer in place (Δ, A_log, D; Mamba-2 conv_init; Mamba-3
    B/C biases and MIMO projections)."""
    spec: SSMInitSpec = mixer.ssm_init
    kind = mixer_kind(mixer)
    if mixer.D.is_meta:
        return
    if kind == "mamba3":
        _init_mamba3_(mixer, spec)
    elif kind == "mamba1":
        mixer.dt_proj.reset_parameters()
        d_state = mixer.A_log.shape[-1]
        a = torch.arange(1, d_state + 1, dtype=torch.float32, device=mixer.A_log.device)
        mixer.A_log.copy_(torch.log(a).expand_as(mixer.A_log))
    elif kind == "mamba2":
        if spec.dt_bias_init is None:
            init_delta_bias_(mixer.dt_bias, spec)
        else:
            mixer.dt_bias.fill_(spec.dt_bias_init)
        mixer.A_log.copy_(torch.log(_mamba2_A(mixer.A_log, spec)))
        if spec.conv_init is not None:
            mixer.conv1d.weight.uniform_(-spec.conv_init, spec.conv_init)
    else:
        raise TypeError(f"{type(mixer).__name__} is not a Mamba mixer")
    mixer.D.fill_(1.0)
    for p in (getattr(mixer, "A_log", None), mixer.D, getattr(mixer, "dt_bias", None)):
        if p is not None:
            p._no_weight_decay = True  # informational; optimizer groups go by name (optim.py)


@torch.no_grad()
def init_weights(model: nn.Module, n_layer: int, initializer_range: float = 0.02,
                 rescale_prenorm_residual: bool = True) -> None:
    """Initialise every parameter of a ``MambaLM`` the way ``mamba_ssm.MambaLMHeadModel`` does.

    Idempotent: calling it twice gives the same distributions (not the same draws). Matches
    mamba_ssm including a quirk: ``MambaLMHeadModel`` re-applies its ``_init_weights`` with the
    default ``n_residuals_per_layer=1``, so ``out_proj``/``fc2`` end up scaled by 1/sqrt(n_layer)
    even when the blocks have an MLP.
    """
    initialised: set[int] = set()
    for module in model.modules():
        if module is model:  # the root's own reset_parameters is what called us
            continue
        own = list(module.parameters(recurse=False))
        if any(p.is_meta for p in own):
            raise SSMInitError(
                f"{type(module).__name__} still has meta parameters: materialise the model "
                "(model.to_empty(device=...)) before initialising it"
            )
        if own and all(id(p) in initialised for p in own):
            continue  # a tied head: its weight is the embedding, already drawn
        initialised.update(id(p) for p in own)
        if mixer_kind(module) is None and callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()  # PyTorch's default init, which mamba_ssm inherits
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=initializer_range)
            if module.padding_idx is not None:  # as nn.Embedding and transformers start it
                module.weight[module.padding_idx].zero_()
    # SSM init last: it must win over the generic resets of the mixer's children (conv_init
    # re-draws conv1d.weight, which conv1d.reset_parameters would otherwise overwrite).
    for module in model.modules():
        if mixer_kind(module) is not None:
            init_ssm_parameters_(module)
    if rescale_prenorm_residual:
        for name, p in model.named_parameters():
            if name.endswith(("out_proj.weight", "fc2.weight")):
                # a 3-D weight holds one matrix per expert (models/moe.py), each drawn alone
                for w in (p.unbind(0) if p.dim() == 3 else (p,)):
                    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                p /= math.sqrt(n_layer)


def _mamba_mixers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if mixer_kind(module) is not None:
            yield name, module


@torch.no_grad()
def check_ssm_init(model: nn.Module, rtol: float = 1e-3) -> int:
    """Verify a freshly initialised model's SSM parameters; return how many mixers were checked.

    Checks, per mixer: softplus(Δ bias) inside [dt_init_floor, max(dt_max, dt_init_floor)] and,
    where that range is wide, spread over it
    (a zeroed bias gives softplus(0)=0.693 everywhere; PyTorch's default Linear bias init gives
    values far outside); Mamba-1 A = -(1..d_state) per channel exactly, Mamba-2 exp(A_log) inside
    A_init_range; Mamba-3 B/C biases == 1; D == 1; the Mamba-1 Δ projection weight inside
    ±dt_rank^-0.5·dt_scale.
    Only meaningful before training: trained parameters legitimately move away.
    """
    checked = 0
    for name, mixer in _mamba_mixers(model):
        spec: SSMInitSpec = getattr(mixer, "ssm_init", SSMInitSpec())
        kind = mixer_kind(mixer)
        dt_bias = mixer.dt_proj.bias if kind == "mamba1" else mixer.dt_bias
        bias_name = f"{name}.dt_proj.bias" if kind == "mamba1" else f"{name}.dt_bias"
        named = [(n, getattr(mixer, n)) for n in ("A_log", "D", "B_bias", "C_bias")
                 if hasattr(mixer, n)] + [(bias_name, dt_bias)]
        for pname, p in named:
            if p.is_meta:
                raise SSMInitError(f"{name}: {pname} is on the meta device (not materialised)")
            if not torch.isfinite(p).all():
                raise SSMInitError(f"{name}: {pname} has non-finite values")
        dt = F.softplus(dt_bias.float())
        # the draws: log-uniform in [dt_min, dt_max], then floored at dt_init_floor
        draw_lo, draw_hi = (max(v, spec.dt_init_floor) for v in (spec.dt_min, spec.dt_max))
        lo, hi = spec.dt_init_floor * (1 - rtol), draw_hi * (1 + rtol)
        if kind == "mamba2" and spec.dt_bias_init is not None:
            if not torch.all(dt_bias == spec.dt_bias_init):
                raise SSMInitError(
                    f"{bias_name}: this model's Δ bias starts at {spec.dt_bias_init:g} everywhere "
                    "(ssm_cfg.dt_bias_init) -- something re-initialised it after the build")
        elif dt.min() < lo or dt.max() > hi:
            raise SSMInitError(
                f"{bias_name}: softplus(Δ bias) spans [{dt.min():.4g}, {dt.max():.4g}], outside the "
                f"initial range [{spec.dt_init_floor:g}, {draw_hi:g}] -- something re-initialised "
                "the Δ bias after the model was built (a generic bias-zeroing or reset_parameters "
                "hook, or an uninitialised materialisation). Call "
                "mamba_train.models.init.init_weights(model) after materialising, and keep init "
                "hooks away from the SSM parameters."
            )
        # a spread check only where the drawn range is wide: 16 log-uniform draws over a 4x
        # range all within 1.5x of each other has probability ~1e-7; a narrower configured range
        # (dt_min close to dt_max, or mostly below the floor) legitimately gives close values
        if (dt.numel() >= 16 and draw_hi / draw_lo >= 4 and (dt.max() / dt.min()) < 1.5
                and spec.dt_bias_init is None):
            raise SSMInitError(
                f"{bias_name}: softplus(Δ bias) is nearly constant ({dt.min():.4g}..{dt.max():.4g}); "
                "Mamba draws it log-uniformly in [dt_min, dt_max] -- it was overwritten"
            )
        if kind == "mamba3":
            for pname in ("B_bias", "C_bias"):
                if not torch.all(getattr(mixer, pname) == 1):
                    raise SSMInitError(
                        f"{name}.{pname}: Mamba-3 initialises the B/C biases to 1 -- something "
                        "re-initialised it after the model was built (a generic bias hook?)")
        elif kind == "mamba1":
            a = torch.exp(mixer.A_log.float())
            want = torch.arange(1, a.shape[-1] + 1, device=a.device, dtype=a.dtype).expand_as(a)
            if not torch.allclose(a, want, rtol=rtol):
                raise SSMInitError(
                    f"{name}.A_log: exp(A_log) must be 1..d_state in every channel (S4D-real init)"
                )
            std = mixer.dt_proj.in_features**-0.5 * spec.dt_scale
            if mixer.dt_proj.weight.abs().max() > std * (1 + rtol):
                raise SSMInitError(
                    f"{name}.dt_proj.weight: |w| up to {mixer.dt_proj.weight.abs().max():.4g} > "
                    f"dt_rank^-0.5*dt_scale={std:.4g}: re-initialised by a generic hook"
                )
        elif spec.A_init == "arange":
            a = torch.exp(mixer.A_log.float()).flatten()
            want = torch.arange(1, a.numel() + 1, device=a.device, dtype=a.dtype)
            if not torch.allclose(a, want, rtol=rtol):
                raise SSMInitError(f"{name}.A_log: exp(A_log) must be 1..nheads (ssm_cfg.A_init="
                                   "arange) -- something re-initialised it after the build")
        else:
            a = torch.exp(mixer.A_log.float())
            a_lo, a_hi = spec.A_init_range
            if a.min() < a_lo * (1 - rtol) or a.max() > a_hi * (1 + rtol):
                raise SSMInitError(
                    f"{name}.A_log: exp(A_log) spans [{a.min():.4g}, {a.max():.4g}], outside "
                    f"A_init_range {tuple(spec.A_init_range)}"
                )
        if not torch.all(mixer.D == 1):
            raise SSMInitError(f"{name}.D: must be initialised to 1 (the skip connection)")
        checked += 1
    return checked


def ssm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that ``check_ssm_init`` reads (A_log, D, Δ bias, Mamba-1 Δ weight, Mamba-3
    B/C biases), to gather them where they are sharded."""
    return [p for module in model.modules() for p in checked_parameters(module)]
