"""The table the randomised checkers print (hf_interchange_fuzz.py, mamba_ssm_interchange_fuzz.py):
one line per (group, seed) -- PASS, FAIL <reason> or REFUSED <message> -- the drawn spec under
any line that is neither PASS nor REFUSED (or under every line with ``show_spec``), then a
SUMMARY line. Returns the process exit status: 1 if anything failed. ``outcome`` runs one check
in a fresh directory and turns a mismatch or a crash into its FAIL line."""

from __future__ import annotations

import tempfile
import traceback
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable


def outcome(check: Callable[[Path], str], mismatch: type[Exception]) -> str:
    with tempfile.TemporaryDirectory() as d:
        try:
            return check(Path(d))
        except mismatch as e:
            return f"FAIL {e}"
        except Exception as e:  # noqa: BLE001 - a crash is a finding
            tb = traceback.extract_tb(e.__traceback__)[-1]
            first = str(e).splitlines()[0][:200] if str(e) else ""
            return (f"FAIL crash {type(e).__name__}: {first} at {Path(tb.filename).name}:"
                    f"{tb.lineno}")


def run_table(groups: Iterable[str], seeds: range, run_one: Callable[[str, int], tuple[str, object]],
              show_spec: bool = False, width: int = 17) -> int:
    tally: Counter = Counter()
    for group in groups:
        for seed in seeds:
            result, spec = run_one(group, seed)
            tally[(group, result.split()[0])] += 1
            print(f"{group:{width}s} seed={seed:<3d} {result}", flush=True)
            if show_spec or not result.startswith(("PASS", "REFUSED")):
                print(f"    spec={spec}", flush=True)
    print("SUMMARY " + " ".join(f"{g}:{s}={n}" for (g, s), n in sorted(tally.items())))
    return 1 if any(s == "FAIL" for _, s in tally) else 0
