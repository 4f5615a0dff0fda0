"""Greedy continuations of a few fixed prompts at each validation: a glance that the model learns.

The text goes to the log (``mamba_train.samples``) and, as text, to W&B (a table) and TensorBoard
(``add_text``). All prompts form one batch, left-padded with the end-of-document token (the
boundary the model is trained to start a new document after), and each new token re-runs the
forward over the whole prefix (no recurrent-state cache): ``new_tokens`` forwards of a few
dozen tokens. The measured time is part of each log line; the cost per validation is stated in
``conf/callbacks/default.yaml``.

Runs on rank 0 only, on the unwrapped model, so it is skipped under sharded strategies (FSDP,
DeepSpeed), whose parameters live across ranks.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

log = logging.getLogger("mamba_train.samples")


def greedy_continue(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, pad_id: int,
                    device) -> list[list[int]]:
    """Greedy continuations of token-id prompts (one batch, left-padded with ``pad_id``)."""
    width = max(len(p) for p in prompts)
    x = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long,
                     device=device)
    for _ in range(new_tokens):
        logits = model(x, num_last_tokens=1).logits[:, -1]
        x = torch.cat([x, logits.argmax(-1, keepdim=True)], dim=1)
    return x[:, width:].tolist()  # one host read at the end


class TextSamples(L.Callback):
    """Args:
        prompts: the prompt strings (fixed across the run, so the samples are comparable).
        new_tokens: tokens generated per prompt.
        tokenizer: name/path as for the data (``${data.tokenizer}``); ``default`` = bundled.
    """

    def __init__(self, prompts: list[str] | tuple[str, ...] = (), new_tokens: int = 24,
                 tokenizer: str | None = "default"):
        self.prompts = [str(p) for p in prompts]
        self.new_tokens = int(new_tokens)
        self.tokenizer_name = tokenizer
        self._tokenizer = None
        self.last_seconds: float | None = None

    @staticmethod
    def _sharded(pl_module: L.LightningModule) -> bool:
        """Parameters spread over the ranks (FSDP, FSDP2, DeepSpeed): the training step's kind."""
        return getattr(getattr(pl_module, "train_step", None), "kind", None) in ("sharded", "engine")

    @torch.no_grad()
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (not self.prompts or self.new_tokens <= 0 or trainer.sanity_checking
                or not trainer.is_global_zero or self._sharded(pl_module)):
            return
        if self._tokenizer is None:
            from mamba_train.data.tokenizer import load_tokenizer
            try:
                self._tokenizer = load_tokenizer(self.tokenizer_name)
            except Exception as e:  # e.g. a hub tokenizer on an offline node: not worth a failed run
                log.info("no text samples: tokenizer %r did not load (%s: %s)", self.tokenizer_name,
                         type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.prompts = []
                return
        model = pl_module.model
        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            from mamba_train.data.tokenizer import eos_id

            ids = [self._tokenizer.encode(p, add_special_tokens=False) or [eos_id(self._tokenizer)]
                   for p in self.prompts]
            # the validation step's precision context: same dtypes, so no new kernel compiles on GPU
            with trainer.precision_plugin.val_step_context():
                new = greedy_continue(model, ids, self.new_tokens, eos_id(self._tokenizer), pl_module.device)
            texts = [self._tokenizer.decode(t) for t in new]
        finally:
            model.train(was_training)
        self.last_seconds = time.perf_counter() - t0
        step = trainer.global_step
        lines = [f"{p!r} -> {t!r}" for p, t in zip(self.prompts, texts)]
        log.info("samples at step %d (greedy, %d tokens, %.2f s):\n  %s", step, self.new_tokens,
                 self.last_seconds, "\n  ".join(lines))
        self._to_loggers(trainer, texts, step)

    def _to_loggers(self, trainer: L.Trainer, texts: list[str], step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_text("samples", columns=["step", "prompt", "continuation"],
                                data=[[step, p, t] for p, t in zip(self.prompts, texts)], step=step)
            elif isinstance(logger, TensorBoardLogger):
                body = "\n\n".join(f"**{p}** {t}" for p, t in zip(self.prompts, texts))
                logger.experiment.add_text("samples", body, global_step=step)
