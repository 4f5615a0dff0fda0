"""Document boundaries inside packed windows.

Pretraining packs documents back to back, separated by EOS. With ``document_boundaries`` the
batch carries ``seq_idx`` (int32, B × L): the document number of each input token, counted from
0 at the start of every window and incremented after every EOS (the EOS ends its document). The
mixers reset their convolution window and SSM state where ``seq_idx`` changes, and attention
layers mask across documents, so each document is modelled as if it were alone.

Computed on the device after the batch is transferred (a cumsum over the batch): the loader,
its resume state and the shard format stay unchanged.
"""

from __future__ import annotations

import torch

from mamba_train.models.loss import IGNORE_INDEX


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """seq_idx for (B, L) token ids: 0 up to and including the first EOS, 1 after it, ..."""
    is_eos = (input_ids == eos_id).to(torch.int32)
    return (torch.cumsum(is_eos, dim=-1, dtype=torch.int32) - is_eos).contiguous()


def add_document_boundaries(batch: dict, eos_id: int, mask_cross_document_loss: bool) -> dict:
    """Add ``seq_idx``; optionally ignore the loss of predicting a document's first token from
    the previous document's EOS (with state resets there is nothing to predict it from)."""
    batch["seq_idx"] = document_ids(batch["input_ids"], eos_id)
    if mask_cross_document_loss:
        batch["labels"] = batch["labels"].masked_fill(batch["input_ids"] == eos_id, IGNORE_INDEX)
    return batch
