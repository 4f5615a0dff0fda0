"""A slice of the randomised data-pipeline check (benchmarks/data_pipeline_fuzz.py): random small
corpora, rank x worker layouts, mixtures and document boundaries; windows, seq_idx and labels
against the generated stream, the ranks' union against the single-process stream, exact resume
(also across num_workers, rescaled weights and world sizes), one-line refusals, validation
partition, and prepare runs cut after every shard. The seeds here are not the ones the script
was developed on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "data_pipeline_fuzz.py"


def test_random_pipelines_keep_the_documented_contract():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "6", "--first-seed", "7001", "--quick"],
                          capture_output=True, text=True, timeout=600)
    failures = [line for line in proc.stdout.splitlines() if line.startswith("seed") and " FAIL " in line]
    assert proc.returncode == 0 and not failures, "\n".join(failures) or proc.stderr[-3000:]
    assert proc.stdout.count(" PASS L=") == 6 and "+prepare" in proc.stdout, proc.stdout[-2000:]
