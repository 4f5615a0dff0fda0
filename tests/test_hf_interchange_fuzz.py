"""A slice of the randomised interchange check (benchmarks/hf_interchange_fuzz.py): random small
configurations of every transformers family we read and write, each loaded with transformers'
logits and loss and exported back to the source's exact tensors, or refused in one line. The
seeds here are not the ones the script was developed on."""

from __future__ import annotations

import pytest

from conftest import fuzz_stdout

pytest.importorskip("transformers")


def test_random_configs_of_every_family_round_trip_or_are_refused_in_one_line():
    out = fuzz_stdout("hf_interchange_fuzz.py", "--seeds", "6", "--first-seed", "500")
    assert out.count(" PASS") >= 20, out[-2000:]  # most configs are ours
