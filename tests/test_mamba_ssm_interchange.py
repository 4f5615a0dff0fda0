"""mamba_ssm's own ``MambaLMHeadModel`` (run on CPU under Triton's interpreter) against
mamba_train, for configs the fuzz (``benchmarks/mamba_ssm_interchange_fuzz.py``) found wrong:
each runs that script's whole check (load, ``export format=mamba_ssm`` read by mamba_ssm,
``init_from``, transformers and back) in a process of its own."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SPECS = {
    # transformers' config carries initializer_range / rescale_prenorm_residual / special ids,
    # which mamba_ssm's MambaConfig has no keys for: the mamba_ssm export must leave them out
    "mamba1_via_transformers": dict(
        d_model=24, n_layer=2, vocab_size=61, pad_vocab_size_multiple=8, tie_embeddings=False,
        ssm_cfg=dict(layer="Mamba1", d_state=4, d_conv=3, expand=2, dt_rank=5, bias=True),
        rms_norm=True, residual_in_fp32=False, fused_add_norm=True),
    "mamba2_via_transformers": dict(
        d_model=16, n_layer=2, vocab_size=48, pad_vocab_size_multiple=16, tie_embeddings=True,
        ssm_cfg=dict(layer="Mamba2", d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2,
                     chunk_size=8, dt_limit=[0.001, 0.5], conv_bias=False),
        rms_norm=True, residual_in_fp32=True, fused_add_norm=False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SPECS))
def test_mamba_ssm_interchange_under_interpreter(name):
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' has it)")
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba_ssm is not importable here; put its sources on PYTHONPATH "
                    "(e.g. a checkout of state-spaces/mamba at v2.3.2) to run this on CPU")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "mamba_ssm_interchange_fuzz.py"),
         "--spec", json.dumps(SPECS[name])],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    assert proc.returncode == 0 and last.startswith("PASS"), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "hf: M" in last, last  # the transformers leg ran
