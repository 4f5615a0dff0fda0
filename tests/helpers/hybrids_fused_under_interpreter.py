"""The fused backend's hybrids (mamba_ssm's kernels under Triton's interpreter, fp32) against
transformers' own model, and transformers' training path against its inference path, on CPU.
Prints, as JSON, for each case of tests/test_hf_hybrids.py named in ``argv[1:]``: the largest
relative difference over the logits and every parameter gradient of one training step of
(``ours``) our fused model and (``hf_train``) transformers in training mode (the mamba_ssm
fused-kernel call it makes on a GPU, here made directly) from transformers in eval mode (its
PyTorch path on CPU). Run by tests/test_hf_hybrids_fused_cpu.py."""

import json
import sys
import tempfile
from pathlib import Path

import mamba_ssm_on_cpu  # noqa: F401  (first: the interpreter and mamba_ssm's CPU shims)
import inspect  # noqa: E402

import torch  # noqa: E402
from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined  # noqa: E402
from transformers.models.bamba import modeling_bamba  # noqa: E402
from transformers.models.falcon_h1 import modeling_falcon_h1  # noqa: E402
from transformers.models.nemotron_h import modeling_nemotron_h  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from hf_bf16_check import _run, rel_err, token_ids  # noqa: E402
from test_hf_hybrids import CASES, make_hf  # noqa: E402

from mamba_train.formats.hf import FAMILIES  # noqa: E402
from mamba_train.formats.load import load_model  # noqa: E402
from mamba_train.models import backend  # noqa: E402

_SPLIT_ARGS = inspect.signature(mamba_split_conv1d_scan_combined).parameters


def _fused_call(*args, **kwargs):  # what transformers' hub-kernel wrapper calls on a GPU
    return mamba_split_conv1d_scan_combined(
        *args, **{k: v for k, v in kwargs.items() if k in _SPLIT_ARGS})


for module in (modeling_bamba, modeling_falcon_h1, modeling_nemotron_h):
    module.mamba2_split_conv1d_scan_combined = _fused_call
backend.fused_unavailable_reason = lambda: None  # the fused mixers, on CPU tensors


def worst(step, ref):
    (logits, grads), (ref_logits, ref_grads) = step, ref
    return max([rel_err(logits, ref_logits)] + [rel_err(grads[n], g) for n, g in ref_grads.items()])


def case_errors(case: str) -> dict[str, float]:
    hf, src = make_hf(Path(tempfile.mkdtemp()), CASES[case])
    ours = load_model(src, backend="fused", device="cpu").train()
    ids = token_ids(hf, 2, 32, "cpu")
    vocab = hf.config.vocab_size
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    reference = _run(hf.eval(), ids, ids, "cpu", False, vocab, use_cache=False)
    hf_train = _run(hf.train(), ids, ids, "cpu", False, vocab, use_cache=False)
    logits, grads = _run(ours, ids, labels, "cpu", False, vocab)
    ours_step = (logits, FAMILIES[CASES[case]["model_type"]].to_hf(ours.config, grads))
    return {"ours": worst(ours_step, reference), "hf_train": worst(hf_train, reference)}


if __name__ == "__main__":
    print(json.dumps({case: case_errors(case) for case in sys.argv[1:]}))
