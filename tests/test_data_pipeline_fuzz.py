"""A slice of the randomised data-pipeline check (benchmarks/data_pipeline_fuzz.py): random small
corpora, rank x worker layouts, mixtures and document boundaries; windows, seq_idx and labels
against the generated stream, the ranks' union against the single-process stream, exact resume
(also across num_workers, rescaled weights and world sizes), one-line refusals, validation
partition, and prepare runs cut after every shard. The seeds here are not the ones the script
was developed on."""

from __future__ import annotations

from conftest import fuzz_stdout



def test_random_pipelines_keep_the_documented_contract():
    out = fuzz_stdout("data_pipeline_fuzz.py", "--seeds", "6", "--first-seed", "7001", "--quick")
    assert out.count(" PASS L=") == 6 and "+prepare" in out, out[-2000:]
