"""benchmarks/seed_band.py on CPU: the band arithmetic against ``statistics``, the verdict at the
band's edges, the SEEDBAND lines read back (what ``--from-log`` combines across device calls),
the losses read from a run's CSV, and one smoke run of two arms through the real ``train``."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import seed_band as sb  # noqa: E402


def test_arms_take_overrides_verbatim_and_refuse_a_nameless_spec():
    assert sb.parse_arm("base=") == ("base", [])
    assert sb.parse_arm("ssd=kernels.ssd=mamba_train") == ("ssd", ["kernels.ssd=mamba_train"])
    assert sb.parse_arm("x=+model.ssm_cfg.extra=1  kernels.norm_backward=mamba_ssm") \
        == ("x", ["+model.ssm_cfg.extra=1", "kernels.norm_backward=mamba_ssm"])
    for bad in ("kernels.ssd", "=a=b", "two words=x", "kernels.ssd=mamba_train"):
        with pytest.raises(ValueError):
            sb.parse_arm(bad)


def test_train_loss_at_a_step_is_the_mean_of_the_ten_steps_ending_there():
    train = {s: float(s) for s in range(1, 201)}
    m = sb.run_metrics(train, {100: 9.0, 200: 4.5}, 200)
    assert sb.check_steps(200) == (50, 100, 200)
    assert m["val"] == 4.5  # the last validation
    assert m["train@50"] == pytest.approx(45.5) and m["train@200"] == pytest.approx(195.5)
    assert m["last20"] == pytest.approx(190.5)
    assert math.isnan(sb.step_loss({1: 1.0}, 50))


def test_mean_and_std_are_the_sample_statistics():
    vals = [3.4339, 3.4504, 3.5450, 3.4094, 3.5022, 3.4974]
    mean, std = sb.mean_std(vals)
    assert mean == pytest.approx(statistics.mean(vals)) and std == pytest.approx(statistics.stdev(vals))
    assert sb.mean_std([3.0]) == (3.0, None)


def _runs(arm, vals, t200=None):
    return [{"arm": arm, "seed": i, "steps": 200, "wall_s": 1.0,
             "metrics": {"val": v, "train@50": 4.0, "train@100": 3.5,
                         "train@200": (t200 or [3.0] * len(vals))[i], "last20": 3.0}}
            for i, v in enumerate(vals)]


def test_an_arm_is_inside_only_when_every_metric_is_inside_the_baselines_two_std_band():
    base = _runs("base", [3.0, 3.1, 3.2], t200=[2.9, 3.0, 3.1])  # val band [2.9, 3.3]
    summary = sb.summarise(base + _runs("near", [3.28, 3.29, 3.30]) + _runs("far", [3.30, 3.31, 3.35])
                           + _runs("drift", [3.1, 3.1, 3.1], t200=[3.3, 3.3, 3.3]))
    assert summary["base"]["val"]["std"] == pytest.approx(0.1)
    near = sb.check_arm(summary["base"], summary["near"])
    assert near["verdict"] == "inside"
    assert near["metrics"]["val"]["lo"] == pytest.approx(2.9) and near["metrics"]["val"]["hi"] == pytest.approx(3.3)
    assert sb.check_arm(summary["base"], summary["far"])["verdict"] == "outside"
    drift = sb.check_arm(summary["base"], summary["drift"])  # val inside, train@200 outside
    assert drift["metrics"]["val"]["status"] == "inside"
    assert drift["metrics"]["train@200"]["status"] == "outside" and drift["verdict"] == "outside"


def test_one_baseline_run_gives_no_band():
    summary = sb.summarise(_runs("base", [3.0]) + _runs("x", [3.0, 3.1]))
    assert sb.check_arm(summary["base"], summary["x"])["verdict"] == "no band"


def test_lines_read_back_and_combine_across_logs(tmp_path, capsys):
    runs = _runs("base", [3.0, 3.1, 3.2]) + _runs("ssd", [3.5, 3.6, 3.55])
    lines = [sb.format_run(r) for r in runs]
    log1 = "noise\n" + "\n".join(lines[:2] + lines[3:5]) + "\nSEEDBAND arm=ssd seed=9 error=boom\n"
    log2 = "== part\n" + "\n".join([lines[2], lines[5]]) + "\nSEEDBAND_ARM base n=3 ...\n"
    (tmp_path / "a.log").write_text(log1)
    (tmp_path / "b.log").write_text(log2)
    back = sb.parse_runs(log1 + log2)
    assert len(back) == 6 and {r["arm"] for r in back} == {"base", "ssd"}
    assert back[0]["metrics"] == pytest.approx(runs[0]["metrics"], abs=1e-4)
    assert sb.main(["--from-log", str(tmp_path / "a.log"), str(tmp_path / "b.log")]) == 0
    out = capsys.readouterr().out
    assert "SEEDBAND_ARM base n=3" in out and "SEEDBAND_CHECK ssd vs base: OUTSIDE" in out
    assert "SEEDBAND_RULE" in out


def test_losses_are_read_by_optimizer_step(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,train/loss,val/loss\n1,8.0,\n2,7.5,\n2,,7.9\n")
    assert sb.read_losses(csv) == ({1: 8.0, 2: 7.5}, {2: 7.9})


@pytest.mark.slow
def test_two_arms_train_through_the_real_task_on_cpu(tmp_path, capsys):
    """A debug recipe on the embedded corpus: two arms x one seed, the second arm's override
    applied (a failed override reported on its line, the other arms kept)."""
    argv = ["--allow-cpu", "--recipe", "debug-mamba2", "--corpus", "embedded", "--steps", "4",
            "--seq-len", "64", "--micro-batch", "2", "--val-batches", "1", "--seeds", "7",
            "--arm", "base=", "--arm", "lr=optim.lr=1e-3", "--arm", "bad=model.no_such_key=1",
            "--work", str(tmp_path), "--json", str(tmp_path / "out.json"),
            "--override", "callbacks.progress_bar=null"]
    assert sb.main(argv) == 0
    out = capsys.readouterr().out
    runs = sb.parse_runs(out)
    assert [r["arm"] for r in runs] == ["base", "lr"]
    assert runs[0]["metrics"]["train@4"] != runs[1]["metrics"]["train@4"]
    assert "SEEDBAND arm=bad seed=7 error=" in out
    import json
    saved = json.loads((tmp_path / "out.json").read_text())
    assert len(saved["runs"]) == 2 and saved["failed"][0]["arm"] == "bad"
