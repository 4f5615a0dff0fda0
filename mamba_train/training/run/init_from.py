"""Continued pretraining: ``init_from=<source>`` starts a run from released weights.

A source is one of

* a ``mamba_ssm`` directory (``config.json`` + ``pytorch_model.bin`` or ``model.safetensors``,
  as ``state-spaces/mamba-130m`` on the hub),
* a ``transformers`` directory (``MambaForCausalLM`` / ``Mamba2ForCausalLM``: safetensors or
  ``.bin``, sharded or not),
* a ``mamba_train`` Lightning checkpoint (``.ckpt``; its weights only),
* a Hugging Face hub id (``org/name``), fetched with ``huggingface_hub`` -- only from the local
  cache when the hub is offline (``HF_HUB_OFFLINE=1``).

Weights are read by :func:`mamba_train.formats.load.read_weights`, which reads the files directly
(no model ``__init__`` or init hook runs on them). What the run takes from the source:

* **Architecture.** ``model=source`` takes it as is. With any other model group (a recipe's),
  every field that changes the function the model computes is compared with the source and a
  difference is an error listing the fields. Not compared: the init-only knobs (``dt_min``,
  ``dt_max``, ``dt_init``, ``dt_scale``, ``dt_init_floor``, ``A_init_range``, ``conv_init``,
  ``initializer_cfg``: they shape a fresh init, which a loaded run does not have), the kernel
  choices (``fused_add_norm``, ``use_fast_path``, ``use_mem_eff_path``: numerically the same;
  the configured value is used) and the vocabulary, which the data decides (below).
* **Vocabulary.** The data's tokenizer must fit the embedding: the data's ``vocab_size`` equals
  the source's, or -- where the source records only its padded embedding size, as transformers'
  ``config.json`` does -- pads up to the same number of rows; the EOS id must equal the one in
  the source's ``config.json`` where it has one. Otherwise the run stops with one line, unless
  ``init_from_resize_vocab=true``: the embedding (and an untied head) is cut or grown to the
  data's padded size; the rows of the source's tokens are kept, every other row is the mean of
  them, so a new token starts as an "average" token and the head's logit for it as
  the average logit (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language
  Models").
* **Weights**, converted to fp32 when stored in 16 bits (exact). They are assigned into the
  model in ``configure_model`` (``training/step/strategies/sharded.py: build_model_for``) instead of an init,
  and a fingerprint (BLAKE2b of the bytes) of every tensor is taken when read; the init guard
  (``callbacks/init_guard.py``) recomputes them on the full parameters after strategy setup on
  every rank, so an init hook, a materialisation or a cast that touched them stops the run.
* **Nothing else.** Optimizer, LR schedule, step counter and data position start fresh. A run
  directory that already holds checkpoints resumes from them with ``ckpt_path=last`` (a requeued
  job continues the continued run); the source's weights are then not read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from mamba_train.errors import MambaTrainError, instantiate_config
from mamba_train.models.config import MambaLMConfig

log = logging.getLogger(__name__)

# mixer arguments that only shape a fresh init / only pick a kernel: never an architecture clash
INIT_ONLY_SSM_KEYS = frozenset({"dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
                                "A_init_range", "conv_init", "A_init", "dt_bias_init"})
KERNEL_SSM_KEYS = frozenset({"use_fast_path", "use_mem_eff_path"})
_ARCH_FIELDS = ("d_model", "d_intermediate", "n_layer", "rms_norm", "residual_in_fp32",
                "tie_embeddings", "norm_epsilon", "layer_pattern")
_WEIGHT_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json",
                    "pytorch_model*.bin", "pytorch_model.bin.index.json"]


class InitFromError(MambaTrainError, ValueError):
    """An ``init_from`` source that cannot start this run; the message says what to change."""


# ------------------------------------------------------------------------------------- sources
def resolve_source(spec: str, cache_dir: str | Path | None = None) -> Path:
    """A local path for ``spec``: the path itself, or the hub snapshot of an ``org/name`` id."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".ckpt") or spec.count("/") != 1
    if looks_local:
        raise InitFromError(f"init_from={spec} does not exist (expected a mamba_ssm or "
                            "transformers directory, a .ckpt file or a hub id org/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        return Path(snapshot_download(spec, allow_patterns=_WEIGHT_PATTERNS, cache_dir=cache_dir,
                                      local_files_only=offline))
    except LocalEntryNotFoundError:
        where = cache_dir or constants.HF_HUB_CACHE
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub is unreachable"
        raise InitFromError(
            f"init_from={spec}: not in the local Hugging Face cache ({where}) and {why}; "
            f"download it once where the network is reachable (hf download {spec}) or pass a "
            "local directory") from None
    except HfHubHTTPError as e:  # no such repository, gated, ...
        raise InitFromError(f"init_from={spec}: the hub refused it ({str(e).splitlines()[0]})") from None


def _read(path: Path, spec: str):
    """``read_weights`` with every reading failure (missing, truncated, corrupt) as one line."""
    from safetensors import SafetensorError

    from mamba_train.formats.load import read_weights

    try:
        return read_weights(path)
    except (OSError, ValueError) as e:  # missing files; CheckpointError/ExportError: ValueErrors
        raise InitFromError(f"init_from={spec}: {_one_line(e)}") from None
    except (SafetensorError, RuntimeError, EOFError) as e:  # safetensors / torch.load failures
        raise InitFromError(f"init_from={spec}: cannot read its weights ({_one_line(e)}): a file "
                            "is truncated or corrupt -- download or copy it again") from None


def _read_config(path: Path, spec: str) -> MambaLMConfig:
    """The source's model config alone (a resumed run needs no weights)."""
    if path.is_dir() and (path / "config.json").is_file():
        from mamba_train.formats.hf import read_hf_config

        try:
            raw = json.loads((path / "config.json").read_text())
            if "model_type" in raw:  # a transformers directory (mamba_ssm's has none)
                return read_hf_config(path)
            return MambaLMConfig.load(path / "config.json")
        except ValueError as e:
            raise InitFromError(f"init_from={spec}: {_one_line(e)}") from None
    return _read(path, spec)[0]


def _source_eos(path: Path) -> int | None:
    """The EOS id in a transformers ``config.json`` (mamba_ssm's has none)."""
    cfg_file = path / "config.json"
    if not (path.is_dir() and cfg_file.is_file()):
        return None
    eos = json.loads(cfg_file.read_text()).get("eos_token_id")
    return eos if isinstance(eos, int) else None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# -------------------------------------------------------------------------------- architecture
def _norm(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in sorted(value.items())}
    return value


def architecture(cfg: MambaLMConfig) -> dict[str, Any]:
    """The fields that decide the function a model computes (see the module docstring)."""
    arch: dict[str, Any] = {f: getattr(cfg, f) for f in _ARCH_FIELDS}
    arch["attn_layer_idx"] = sorted(int(i) for i in cfg.attn_layer_idx)
    arch["ssm_cfg.layer"] = cfg.layer
    for key, value in cfg.mixer_kwargs().items():
        if key not in INIT_ONLY_SSM_KEYS | KERNEL_SSM_KEYS:
            arch[f"ssm_cfg.{key}"] = value
    if cfg.n_attention_layers:
        arch.update({f"attn_cfg.{k}": v for k, v in cfg.attn_kwargs().items()})
    if cfg.d_intermediate:
        arch.update({f"mlp_cfg.{k}": v for k, v in cfg.mlp_kwargs().items()})
    from mamba_train.models.pattern import MULTIPLIER_DEFAULTS
    arch.update({f"multipliers.{k}": cfg.multiplier(k) for k in MULTIPLIER_DEFAULTS})
    return {k: _norm(v) for k, v in arch.items()}


def architecture_differences(configured: MambaLMConfig, source: MambaLMConfig) -> list[str]:
    """``["d_model=64 (source: 768)", ...]`` for every architecture field that differs."""
    mine, theirs = architecture(configured), architecture(source)
    if mine["ssm_cfg.layer"] != theirs["ssm_cfg.layer"]:  # other mixers: their knobs are moot
        mine = {k: v for k, v in mine.items() if not k.startswith("ssm_cfg.") or k == "ssm_cfg.layer"}
        theirs = {k: v for k, v in theirs.items() if k in mine}
    return [f"{k}={_show(mine.get(k))} (source: {_show(theirs.get(k))})"
            for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]


def _show(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return str(v)


# ---------------------------------------------------------------------------------- vocabulary
def _pad(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def resize_vocab(state: Mapping[str, torch.Tensor], config: MambaLMConfig,
                 vocab_size: int) -> dict[str, torch.Tensor]:
    """The embedding (and untied head) cut or grown to ``vocab_size`` padded. Rows of the
    source's tokens (ids below ``config.vocab_size``) are kept; every other row -- new tokens
    and padding, including the source's never-trained padding rows -- is the mean of the
    source's token rows."""
    rows = _pad(vocab_size, config.pad_vocab_size_multiple)
    keys = ["backbone.embedding.weight"] + ([] if config.tie_embeddings else ["lm_head.weight"])
    out = dict(state)
    for key in keys:
        old = state[key]
        new = old.new_empty((rows, old.shape[1]))
        real = old[:min(config.vocab_size, old.shape[0])]
        keep = min(rows, real.shape[0])
        new[:keep] = real[:keep]
        new[keep:] = real.double().mean(0).to(old.dtype)
        out[key] = new
    if config.tie_embeddings:
        out["lm_head.weight"] = out["backbone.embedding.weight"]
    return out


# ------------------------------------------------------------------------------------ weights
def fingerprint(tensor: torch.Tensor) -> str:
    """BLAKE2b of dtype, shape and bytes: equal fingerprints = bit-identical tensors."""
    # a copy: ``.numpy()`` marks the storage it views as non-resizable, and FSDP must be able
    # to free (resize) the storage of the parameters it gathered
    t = tensor.detach().to("cpu", copy=True).contiguous()
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _to_fp32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    low = sorted({str(v.dtype) for v in state.values() if v.is_floating_point()
                  and v.dtype != torch.float32})
    if low:
        log.info("init_from: %s tensors converted to float32 (exact) for training", low)
    # own, resizable storage: FSDP frees a parameter's storage after flattening it, which a
    # tensor backed by a memory-mapped safetensors file does not allow
    return {k: v.to(torch.float32 if v.is_floating_point() else v.dtype,
                    copy=not v.untyped_storage().resizable())
            for k, v in state.items()}


_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


@dataclasses.dataclass
class LoadedWeights:
    """What a loaded run must hold after setup: the fingerprint of every tensor."""

    source: str
    fingerprints: dict[str, str]

    def verify(self, model: torch.nn.Module) -> int:
        """Compare the model's full tensors with the source; raise naming the ones that differ."""
        seen = {_clean(n): t for n, t in [*model.named_parameters(), *model.named_buffers()]}
        missing = sorted(set(self.fingerprints) - set(seen))
        changed = sorted(n for n, fp in self.fingerprints.items()
                         if n in seen and fingerprint(seen[n]) != fp)
        if missing or changed:
            raise InitFromError(
                f"loaded weights did not survive setup: {changed[:5] + missing[:5]} no longer "
                f"equal init_from={self.source} (an init hook, materialisation or cast touched "
                "them; parameters must stay fp32)")
        return len(self.fingerprints)


# ---------------------------------------------------------------------------------------- plan
class InitFrom:
    """The source of a continued run: its architecture, and its weights on demand."""

    def __init__(self, spec: str, path: Path, config: MambaLMConfig, resize_vocab: bool = False,
                 state: dict[str, torch.Tensor] | None = None, resuming: bool = False):
        self.spec, self.path, self.source_config = spec, path, config
        self.resuming = resuming  # the run continues its own checkpoint: load nothing
        self.config = config  # the training config: the source's, vocabulary fitted to the data
        self.resize = resize_vocab
        self.eos_id = _source_eos(path)
        self._state = state

    @classmethod
    def from_run_config(cls, cfg, configured: MambaLMConfig | None, resuming: bool) -> "InitFrom":
        """Resolve ``cfg.init_from``, check it against the configured model; read the weights
        now unless the run resumes its own checkpoint (a bad file fails before any process
        starts training)."""
        spec = str(cfg.init_from)
        path = resolve_source(spec)
        state = None
        if resuming:
            config = _read_config(path, spec)
        else:
            config, state = _read(path, spec)
            state = _to_fp32(state)
        if configured is not None:
            differ = architecture_differences(configured, config)
            if differ:
                raise InitFromError(
                    f"init_from={spec}: the configured model contradicts the source's "
                    f"architecture: {', '.join(differ)}. The architecture comes from the source: "
                    "drop these model.* overrides, pick the matching recipe, or use model=source")
            config = dataclasses.replace(config, fused_add_norm=configured.fused_add_norm)
        plan = cls(spec, path, config, bool(cfg.get("init_from_resize_vocab", False)), state,
                   resuming)
        if state is not None:
            plan._check_weights(state, config)
        return plan

    def _check_weights(self, state: Mapping[str, torch.Tensor], config: MambaLMConfig) -> None:
        from mamba_train.formats.checkpoint import CheckpointError
        from mamba_train.formats.load import model_from_state_dict

        try:  # names and shapes against a meta skeleton: nothing is copied
            model_from_state_dict(config, state, backend="reference", device="meta", source=self.spec)
        except CheckpointError as e:
            raise InitFromError(f"init_from={self.spec}: {_one_line(e)}") from None

    def fit_vocabulary(self, vocab_size: int, eos_id: int | None) -> MambaLMConfig:
        """The training config for data tokenized with ``vocab_size`` tokens and ``eos_id``."""
        src = self.source_config
        rows, multiple = src.padded_vocab_size, src.pad_vocab_size_multiple
        # a source whose vocab_size is its row count (transformers' config.json) does not know
        # how many of the rows are real tokens: any vocabulary padding up to the rows fits
        exact = src.vocab_size != rows
        fits = vocab_size == src.vocab_size or (
            not exact and vocab_size <= rows and _pad(vocab_size, multiple) == rows)
        eos_ok = self.eos_id is None or eos_id is None or eos_id == self.eos_id
        if fits and (eos_ok or self.resize):
            if not eos_ok:
                log.warning("init_from: the data's eos_id=%s differs from the source's "
                            "eos_token_id=%s (continuing: init_from_resize_vocab=true)",
                            eos_id, self.eos_id)
            self.config = dataclasses.replace(self.config, vocab_size=int(vocab_size))
            return self.config
        if not self.resize:
            what = (f"vocab_size={vocab_size}, the source's embedding has {rows} rows "
                    f"(vocab_size {src.vocab_size})" if not fits else
                    f"eos_id={eos_id}, the source's config.json says eos_token_id={self.eos_id}")
            raise InitFromError(
                f"init_from={self.spec}: the data's tokenizer does not fit the model ({what}); "
                "tokenize the data with the source's tokenizer, or set init_from_resize_vocab=true "
                "to resize the embedding/head (new rows: mean of the existing rows)")
        log.warning("init_from: embedding resized from %d to %d tokens (padded %d -> %d); new rows "
                    "are the mean of the source's rows", src.vocab_size, vocab_size, rows,
                    _pad(vocab_size, multiple))
        if self._state is not None:
            self._state = resize_vocab(self._state, src, vocab_size)
        # a frozen pad row cut off by the smaller vocabulary is dropped (as transformers'
        # resize_token_embeddings does)
        pad = self.config.padding_idx
        self.config = dataclasses.replace(self.config, vocab_size=int(vocab_size),
                                          padding_idx=pad if pad is None or pad < vocab_size else None)
        return self.config

    def check_resumed(self, restored_from: str | None) -> None:
        """After checkpoint restore: a run that skipped loading must really have resumed."""
        if self.resuming and restored_from is None:
            raise InitFromError(
                f"init_from={self.spec}: the run directory looked resumable, so the source was not "
                "loaded, but no checkpoint was restored; start a new run (run_name=...) or pass "
                "ckpt_path=<file>")

    def take_state(self) -> tuple[dict[str, torch.Tensor], LoadedWeights]:
        """The weights for the model (read now if they were not) and their fingerprints; the
        plan lets go of them, so the model's parameters are the only copy kept."""
        if self._state is None:
            _, state = _read(self.path, self.spec)
            self._state = _to_fp32(state)
            if self.config.vocab_size != self.source_config.vocab_size:
                self._state = resize_vocab(self._state, self.source_config, self.config.vocab_size)
        state, self._state = self._state, None
        self._check_weights(state, self.config)
        from mamba_train.models.lm import MambaLM

        skeleton = MambaLM(self.config, backend="reference", device="meta")
        kept = set(skeleton.state_dict())  # not the MoE statistics (non-persistent buffers)
        names = [n for n, _ in [*skeleton.named_parameters(), *skeleton.named_buffers()]
                 if n in kept]
        return state, LoadedWeights(self.spec, {n: fingerprint(state[n]) for n in names})


def model_and_source(cfg, resuming: bool) -> tuple[MambaLMConfig, InitFrom | None]:
    """The run's model config and, with ``cfg.init_from``, its source (``train.py``).
    ``resuming``: whether a checkpoint will be restored, as ``training/run/resume.py`` resolved it
    (``MambaLMModule.on_train_start`` checks that one was)."""
    configured = instantiate_config(cfg.model, _convert_="all") if cfg.get("model") else None
    if cfg.get("init_from"):
        source = InitFrom.from_run_config(cfg, configured, resuming)
        return source.config, source
    if configured is None:
        raise InitFromError("model=source takes the architecture from init_from=<source>; set "
                            "init_from, or pick a model/recipe")
    return configured, None
