"""lm-evaluation-harness adapter: ``--model mamba_train`` (or ``MambaTrainLM(...)`` in Python).

Built on lm-eval's ``TemplateLM``, which does the request-level work exactly as its HF model
does -- the context/continuation split (whole string encoded, context tokens removed; trailing
context spaces moved to the continuation; an empty context replaced by the EOS/prefix token) --
and leaves the model calls to us. Written here, because they differ for an SSM without a
``transformers`` model class:

* **Scoring** (``_loglikelihood_tokens``): right-padded batches (exact for a causal model: padding
  after a sequence cannot change its outputs), and the LM head applied only at the scored
  positions (``len(ctx)-1 ... end-1``), never to the full ``B × L × vocab`` logits.
* **Generation** (``generate_until``): batched greedy decoding that recomputes the prefix every
  step (no recurrent-state cache; fine at evaluation sizes). SSMs cannot be left-padded (the
  padding would flow through the recurrent state), so sequences are right-padded and each row's
  next-token logits are gathered at its own length.
* **Precision**: ``dtype=bfloat16`` runs under bf16 autocast over fp32 weights -- the training
  precision (``bf16-mixed``), identical on both backends and safe for the SSM parameters
  (``A_log``, ``D``, Δ bias stay fp32). ``float32`` runs in full precision.

Model arguments (``--model_args key=value,...``): ``pretrained`` (a Lightning ``.ckpt``, a
mamba_ssm directory or a transformers directory: anything ``load_model`` reads; or, from Python,
a ``MambaLM`` instance), ``tokenizer`` (default: the ``data.tokenizer`` of the checkpoint's run
config, else tokenizer files in the model directory, else the bundled ``default``),
``batch_size``, ``dtype`` (``float32``|``bfloat16``|``auto`` = bf16 on CUDA), ``backend``
(``auto``|``fused``|``reference``), ``max_length`` (default: the larger of 2048 and the
run's ``data.seq_len``), ``device``, ``max_gen_toks``. Under lm-eval's CLI, ``batch_size`` and
``device`` come from its ``--batch_size``/``--device`` flags (not ``--model_args``).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mamba_train.evaluation.runner import EvalError

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
DEFAULT_BATCH_SIZE = 16
DTYPES = ("float32", "bfloat16", "auto")


def _parse_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        log.info("batch_size=%s: no automatic batch-size search here; using %d",
                 batch_size, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        value = 0
    if value < 1:  # 0 was raised to 1 silently: a typo that ran one sequence at a time
        raise EvalError(f"batch_size must be a positive integer or auto, got {batch_size!r}")
    return value


@register_model("mamba_train")
class MambaTrainLM(TemplateLM):
    def __init__(
        self,
        pretrained: Any = None,
        tokenizer: Any = None,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,  # accepted for CLI compatibility (no auto search)
        dtype: str = "auto",
        backend: str = "auto",
        max_length: int | None = None,
        device: str | None = None,
        max_gen_toks: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if pretrained is None:
            raise EvalError("no model given: pass pretrained=<.ckpt or model directory> "
                            "(--model_args pretrained=... on lm-eval's command line)")
        if dtype not in DTYPES:
            raise EvalError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if device is not None:
            try:
                torch.device(device)
            except RuntimeError:
                raise EvalError(f"device={device!r} is not a device: cpu, cuda or cuda:<index>") from None
        if kwargs:
            log.warning("mamba_train adapter: ignoring unknown model args %s", sorted(kwargs))
        from mamba_train.data.tokenizer import load_tokenizer
        from mamba_train.formats.checkpoint import run_config_of
        from mamba_train.formats.load import load_model, tokenizer_of

        run_config = None
        if isinstance(pretrained, torch.nn.Module):  # in-process (eval after training)
            self.model = pretrained
            self._device = next(pretrained.parameters()).device
            self.source = "in-memory model"
        else:
            if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                # lm-eval's CLI passes --device (default "cuda"); fall back like its HF model does
                if device is not None:
                    log.warning("device=%s requested but CUDA is not available: using the CPU", device)
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if str(device).startswith("cpu") and backend == "auto":
                backend = "reference"
            run_config = run_config_of(pretrained)
            self.model = load_model(pretrained, backend=backend, device=device)
            self._device = torch.device(device)
            self.source = str(pretrained)
        self.model.eval()

        if tokenizer is None:
            from_source = isinstance(pretrained, (str, Path))
            tokenizer = (tokenizer_of(pretrained, run_config or {}) if from_source else None) or "default"
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self.tokenizer_source = str(tokenizer) if isinstance(tokenizer, (str, Path)) else \
            getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)
        vocab = self.model.config.padded_vocab_size
        if len(self.tokenizer) > vocab:
            raise EvalError(f"tokenizer {self.tokenizer_source!r} has {len(self.tokenizer)} tokens but "
                             f"the model's vocabulary has {vocab}: wrong tokenizer= for this model?")

        if max_length is None:
            # An SSM has no position table: the training length is a soft limit, so short
            # training runs still get lm-eval's usual 2048-token window.
            seq_len = ((run_config or {}).get("data") or {}).get("seq_len") or 0
            max_length = max(int(seq_len), DEFAULT_MAX_LENGTH)
        self._max_length = int(max_length)
        self._batch_size = _parse_batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        if dtype == "auto":
            dtype = "bfloat16" if self._device.type == "cuda" else "float32"
        self.dtype = dtype

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_source.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # Training documents are encoded without special tokens (EOS only separates them), so
        # evaluation text is too; the EOS "prefix token" stands in for a start of document.
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ model calls
    def _autocast(self):
        if self.dtype == "bfloat16":
            return torch.autocast(self._device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _logprobs_at(self, rows: list[list[int]], positions: list[list[int]]) -> list[torch.Tensor]:
        """fp32 log-softmax rows at ``positions[i]`` of right-padded input ``rows[i]``."""
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        ids = ids.to(self._device)
        with self._autocast():
            hidden = self.model.hidden_states(ids)
            b = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(positions)])
            t = torch.cat([torch.tensor(p, dtype=torch.long) for p in positions])
            logits = self.model.lm_head(hidden[b.to(self._device), t.to(self._device)])
        logprobs = F.log_softmax(logits.float(), dim=-1)
        return list(logprobs.split([len(p) for p in positions]))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ``((context, continuation) | None, context_tokens, continuation_tokens)``."""
        def sort_key(req):
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        collator = Collator(requests, sort_fn=sort_key)
        results = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            rows, positions, targets = [], [], []
            for _, ctx, cont in chunk:
                if not ctx or not cont:
                    raise ValueError("empty context or continuation tokens in a loglikelihood request")
                # left-truncate to max_length inputs, as HFLM; the last token is only a target
                inp = (ctx + cont)[-(self.max_length + 1):][:-1]
                n = len(cont)
                if n > len(inp):
                    raise ValueError(f"continuation of {n} tokens does not fit max_length={self.max_length}")
                rows.append(inp)
                positions.append(list(range(len(inp) - n, len(inp))))
                targets.append(cont)
            for (request, _, _), logprobs, cont in zip(chunk, self._logprobs_at(rows, positions), targets):
                target = torch.tensor(cont, device=logprobs.device)
                score = logprobs.gather(-1, target[:, None]).sum().item()
                greedy = bool((logprobs.argmax(-1) == target).all())
                results.append((score, greedy))
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, (score, greedy))
                pbar.update(1)
        pbar.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity requests: every token scored once, in windows of ``max_length`` with as
        much context as fits (lm-eval's ``get_rolling_token_windows``), each document on its own,
        conditioned on the EOS/prefix token."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (score, _) in zip(owners, scores):
            totals[i] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched greedy decoding until a stop string (or EOS) or ``max_gen_toks`` tokens."""
        collator = Collator([req.args for req in requests],
                            sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError("the mamba_train adapter decodes greedily only (do_sample=True "
                                 "was requested)")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for context in "
                                 f"max_length={self.max_length}")
            prompts = [self.tok_encode(c)[-max_ctx:] or [self.prefix_token_id] for c in contexts]
            for context, text in zip(contexts, self._greedy(prompts, max_gen, until)):
                text = postprocess_generated_text(text, until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                pbar.update(1)
        pbar.close()
        return collator.get_original(results)

    def _greedy(self, prompts: list[list[int]], max_gen: int, until: list[str]) -> list[str]:
        generated: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        for _ in range(max_gen):
            if not active:
                break
            rows = [prompts[i] + generated[i] for i in active]
            logprobs = self._logprobs_at(rows, [[len(r) - 1] for r in rows])
            still = []
            for i, lp in zip(active, logprobs):
                token = int(lp[0].argmax())
                generated[i].append(token)
                text = self.tok_decode(generated[i], skip_special_tokens=False)
                if token != self.eot_token_id and not any(s and s in text for s in until):
                    still.append(i)
            active = still
        return [self.tok_decode(g, skip_special_tokens=False) for g in generated]
