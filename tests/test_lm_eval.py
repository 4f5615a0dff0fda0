"""lm-eval integration: the adapter scores exactly the tokens a direct computation scores
(context/continuation boundary, empty context, rolling windows), greedy generation equals a
manual loop and honours stop strings, lm-eval's real CLI runs the offline tasks through
``python -m mamba_train.lm_eval``, ``python -m mamba_train.eval`` writes its reports, and the
eval-after-training callback logs ``eval/<task>/<metric>`` without disturbing training."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from conftest import TINY, compose_config
from mamba_train.data.tokenizer import load_tokenizer
from mamba_train.evaluation.lm_eval_adapter import MambaTrainLM
from mamba_train.evaluation.runner import TASKS_DIR, flat_metrics, resolve_tasks
from mamba_train.train import train

REPO = Path(__file__).resolve().parents[1]
TEXT = ("The primary must evaluate to an object of a type that supports attribute references, "
        "which most objects do. This object is then asked to produce the attribute whose name "
        "is the identifier.")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny debug model trained for a few steps (its run config names the tokenizer)."""
    out = tmp_path_factory.mktemp("lm_eval")
    result = train(compose_config([*TINY, "recipe=debug", "logger=csv", "trainer.max_steps=12",
                                   "optim.lr=1e-2", "train.checkpoint_every_n_steps=12",
                                   "trainer.limit_val_batches=1", "train.val_every_n_steps=1000"], out))
    return Path(result["last_checkpoint"])


@pytest.fixture(scope="module")
def lm(ckpt):
    return MambaTrainLM(pretrained=str(ckpt), batch_size=4, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, straight from model(input_ids).logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return F.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


# ---------------------------------------------------------------------------------- loglikelihood
@pytest.mark.parametrize("context, continuation", [
    ("The primary must evaluate to", " an object"),      # continuation with a leading space
    ("The primary must evaluate to ", "an object"),      # trailing context space moves over
    ("attribute refer", "ences, which"),                 # boundary inside a word
    ("", "The primary must evaluate"),                   # empty context: the EOS prefix
])
def test_loglikelihood_equals_direct_computation(lm, tok, context, continuation):
    (score, greedy), = lm.loglikelihood([_req("loglikelihood", context, continuation)])
    # the lm-eval token split: trailing context whitespace joins the continuation, the whole
    # string is encoded once and the context's tokens are cut off its front
    ctx, cont = context.rstrip(), context[len(context.rstrip()):] + continuation
    if ctx:
        whole, ctx_ids = tok.encode(ctx + cont), tok.encode(ctx)
        cont_ids = whole[len(ctx_ids):]
    else:
        ctx_ids, cont_ids = [tok.eos_token_id], tok.encode(continuation)
    if continuation.startswith(" ") or context.endswith(" "):  # a clean word boundary
        assert ctx_ids + cont_ids == tok.encode(context + continuation)
        assert tok.decode(cont_ids).startswith(" ")
    # (inside a word the context keeps its own tokens and the continuation is what is left of
    # the whole string's tokens -- lm-eval's rule, scored as ctx_ids + cont_ids as HFLM does)
    lp = direct_logprobs(lm.model, ctx_ids + cont_ids)[len(ctx_ids) - 1:]  # positions len(ctx)-1 ...
    assert len(lp) == len(cont_ids)
    assert score == pytest.approx(lp.sum().item(), abs=1e-4)
    with torch.no_grad():
        logits = lm.model(torch.tensor([ctx_ids + cont_ids])).logits[0, len(ctx_ids) - 1:-1]
    assert greedy == bool((logits.argmax(-1) == torch.tensor(cont_ids)).all())


def test_loglikelihood_is_batch_size_invariant(ckpt, lm):
    words = TEXT.split(" ")
    reqs = [_req("loglikelihood", " ".join(words[:k]), " " + " ".join(words[k:k + 1 + k % 5]))
            for k in range(1, 20)]
    one = MambaTrainLM(pretrained=str(ckpt), batch_size=1, dtype="float32", device="cpu")
    a, b = lm.loglikelihood(reqs), one.loglikelihood(reqs)
    for (sa, ga), (sb, gb) in zip(a, b):
        assert sa == pytest.approx(sb, abs=1e-4) and ga == gb


def test_bf16_scores_are_close_to_fp32(ckpt, lm):
    bf16 = MambaTrainLM(pretrained=str(ckpt), batch_size=4, dtype="bfloat16", device="cpu")
    reqs = [_req("loglikelihood", "The primary must", " evaluate to an object")]
    (s32, _), = lm.loglikelihood(reqs)
    (s16, _), = bf16.loglikelihood(reqs)
    assert s16 == pytest.approx(s32, rel=0.05)


# ---------------------------------------------------------------------------------- rolling
def test_loglikelihood_rolling_is_the_sum_of_token_logprobs(lm, tok):
    (total,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", TEXT)])
    ids = [tok.eos_token_id] + tok.encode(TEXT)
    assert len(ids) - 1 < lm.max_length
    assert total == pytest.approx(direct_logprobs(lm.model, ids).sum().item(), abs=1e-3)


def test_loglikelihood_rolling_windows_score_every_token_once(ckpt, tok):
    W = 8
    short = MambaTrainLM(pretrained=str(ckpt), batch_size=3, dtype="float32", device="cpu", max_length=W)
    (total,) = short.loglikelihood_rolling([_req("loglikelihood_rolling", TEXT)])
    toks = tok.encode(TEXT)
    assert len(toks) > 3 * W and len(toks) % W  # several windows, a partial last one
    # first window: EOS + W-1 tokens predicts tokens 0..W-1; every later token is predicted
    # once, from the W tokens before it, in blocks of up to W (lm-eval's rolling windows)
    expected = direct_logprobs(short.model, [tok.eos_token_id] + toks[:W]).sum().item()
    done = W
    while done < len(toks):
        end = min(done + W, len(toks))
        expected += direct_logprobs(short.model, toks[end - W - 1:end])[-(end - done):].sum().item()
        done = end
    assert total == pytest.approx(expected, abs=1e-3)


# ---------------------------------------------------------------------------------- generation
def manual_greedy(model, ids: list[int], n: int) -> list[int]:
    ids, out = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


def test_generate_until_equals_a_manual_greedy_loop_and_honours_stops(lm, tok):
    prompts = ["The primary must evaluate to", "This object is then asked to produce the",
               "Multiple", "An implementation is allowed to postpone garbage collection or"]
    n = 10
    outs = lm.generate_until([_req("generate_until", p, {"until": [], "max_gen_toks": n}) for p in prompts])
    for prompt, out in zip(prompts, outs):
        gen = manual_greedy(lm.model, tok.encode(prompt), n)
        if tok.eos_token_id in gen:
            gen = gen[:gen.index(tok.eos_token_id) + 1]
        assert out == tok.decode(gen, skip_special_tokens=False).split(tok.eos_token)[0]
    # a stop string cuts the text before it (and ends decoding), in a batch with other prompts
    long = max(outs, key=len)
    assert len(long) > 4
    stop = long[len(long) // 2:len(long) // 2 + 2]
    first = long.index(stop)
    reqs = [_req("generate_until", p, {"until": [stop], "max_gen_toks": n}) for p in prompts]
    cut = lm.generate_until(reqs)
    assert cut[outs.index(long)] == long[:first]
    assert all(stop not in c for c in cut)


# ---------------------------------------------------------------------------------- CLIs
def test_lm_eval_cli_runs_the_offline_tasks(ckpt, tmp_path):
    out = tmp_path / "lm_eval"
    cmd = [sys.executable, "-m", "mamba_train.lm_eval", "--model", "mamba_train",
           "--model_args", f"pretrained={ckpt},dtype=float32", "--batch_size", "8",
           "--device", "cpu", "--tasks", "mamba_train_local",  # packaged tasks: no --include_path
           "--limit", "4", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          # DISABLE_MULTIPROC: lm-eval's switch for its forked bootstrap pool
                          # (forking a threaded process can hang; see evaluation/runner.py)
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "DISABLE_MULTIPROC": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert set(results["results"]) >= {"local_mc", "local_lambada", "local_ppl", "local_gen"}
    assert 0 <= results["results"]["local_mc"]["acc,none"] <= 1
    assert results["results"]["local_ppl"]["word_perplexity,none"] > 1
    assert results["config"]["model"] == "mamba_train"
    assert "|local_mc" in proc.stdout or "local_mc" in proc.stdout
    assert "Custom kwargs" not in proc.stdout + proc.stderr  # lm-eval's advice to task authors


def test_eval_cli_writes_results_without_per_task_advice(ckpt, tmp_path):
    """``python -m mamba_train.eval`` on the packaged offline tasks: the report is written and
    lm-eval's per-task "Custom kwargs can be passed to --metadata" lines are not printed."""
    out = tmp_path / "reports"
    proc = subprocess.run([sys.executable, "-m", "mamba_train.eval", f"ckpt={ckpt}", "tasks=local",
                           "limit=2", "batch_size=8", "dtype=float32", "device=cpu",
                           f"out={out}"], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO),
                                             "HF_DATASETS_OFFLINE": "1", "DISABLE_MULTIPROC": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / f"{ckpt.stem}.json").read_text())
    assert {"local_mc", "local_ppl"} <= set(results["results"])
    assert "Custom kwargs" not in proc.stdout + proc.stderr


def test_eval_entry_writes_results_next_to_the_checkpoint(ckpt, capsys):
    from mamba_train.cli.eval import main
    assert main([f"ckpt={ckpt}", "tasks=local_mc,local_lambada", "limit=4", "batch_size=8",
                 "dtype=float32", "device=cpu"]) == 0
    out = ckpt.parent / "eval"
    results = json.loads((out / f"{ckpt.stem}.json").read_text())
    assert set(results["results"]) == {"local_mc", "local_lambada"}
    assert results["mamba_train_source"] == str(ckpt)
    table = (out / f"{ckpt.stem}.md").read_text()
    assert "local_lambada" in table and "acc" in table
    # another checkpoint of the directory gets its own report, the first one stays
    other = ckpt.parent / "step=000012.ckpt"
    other.write_bytes(ckpt.read_bytes())
    assert main([f"ckpt={other}", "tasks=local_mc", "limit=2", "batch_size=8", "dtype=float32",
                 "device=cpu"]) == 0
    assert set(json.loads((out / "step=000012.json").read_text())["results"]) == {"local_mc"}
    assert set(json.loads((out / f"{ckpt.stem}.json").read_text())["results"]) == {"local_mc", "local_lambada"}
    assert main(["ckpt=/no/such.ckpt", "tasks=local"]) == 2
    assert main([f"ckpt={ckpt}", "tasks=local", "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def test_task_presets_and_the_eval_link():
    assert resolve_tasks("paper") == ["lambada_openai", "hellaswag", "piqa", "arc_easy",
                                      "arc_challenge", "winogrande", "openbookqa"]
    assert resolve_tasks("local,piqa") == ["local_mc", "local_lambada", "local_ppl", "local_gen", "piqa"]
    assert (REPO / "eval").resolve() == TASKS_DIR
    for name in ("mc", "lambada", "ppl", "gen"):
        rows = (TASKS_DIR / "data" / f"{name}.jsonl").read_text().splitlines()
        assert 20 <= len(rows) <= 50


def test_flat_metrics_names():
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                                 "exact_match,strict": 1.0, "x,none": "N/A"}}}
    assert flat_metrics(results) == {"eval/t/acc": 0.5, "eval/t/acc_stderr": 0.1,
                                     "eval/t/exact_match_strict": 1.0}


# ---------------------------------------------------------------------------------- after training
def _losses(run_dir):
    with open(run_dir / "metrics" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_eval_after_training_logs_scores_and_leaves_training_untouched(make_config):
    common = ["recipe=debug", "logger=csv", "trainer.max_steps=4", "train.checkpoint_every_n_steps=2",
              "trainer.limit_val_batches=1", "train.val_every_n_steps=1000"]
    plain = train(make_config(*common, "run_name=plain"))
    evald = train(make_config(*common, "run_name=evald", "eval=local", "eval.limit=3",
                              "eval.tasks=[local_mc,local_lambada]", "eval.every_n_checkpoints=1",
                              "eval.strict=true"))
    run_dir = evald["run_dir"]
    assert _losses(plain["run_dir"]) == _losses(run_dir)  # RNG and train mode restored
    assert sorted(p.name for p in (run_dir / "eval").glob("step*")) == ["step0000002", "step0000004"]
    assert json.loads((run_dir / "eval" / "results.json").read_text())["results"]["local_mc"]
    with open(run_dir / "metrics" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/local_mc/acc")]
    assert [int(r["step"]) for r in rows] == [2, 4]  # the steps evaluated, as train/loss rows
    assert all(0 <= float(r["eval/local_mc/acc"]) <= 1 and float(r["eval/local_lambada/perplexity"]) > 1
               for r in rows)


def test_lm_eval_wrapper_adds_the_packaged_tasks_once():
    from mamba_train.cli.lm_eval import with_packaged_tasks

    args = ["--model", "mamba_train", "--tasks", "local_mc"]
    assert with_packaged_tasks(args) == [*args, "--include_path", str(TASKS_DIR)]
    assert with_packaged_tasks(["run", *args])[-1] == str(TASKS_DIR)
    mine = [*args, "--include_path", "/my/tasks"]
    assert with_packaged_tasks(mine) == mine
    assert with_packaged_tasks(["--help"]) == ["--help"]


@pytest.mark.parametrize("module,argv,rc,stream,needle", [
    ("lm_eval", ["--help"], 0, "stdout", "--model mamba_train"),
    ("lm_eval", ["--model", "mamba_train", "--tasks", "local_mc"], 1, "stderr",
     'pip install "mamba_train[eval]"'),
    ("eval", ["--help"], 0, "stdout", "ckpt="),
    ("eval", [f"ckpt={REPO / 'pyproject.toml'}", "tasks=local"], 1, "stderr",
     'pip install "mamba_train[eval]"'),
])
def test_eval_entries_without_the_eval_extra(module, argv, rc, stream, needle):
    """lm-eval not installed: --help still answers, anything else is one line naming the extra."""
    code = (f"import sys; sys.modules['lm_eval'] = None; from mamba_train.cli.{module} import main; "
            f"sys.exit(main({argv!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == rc, proc.stderr
    text = getattr(proc, stream)
    assert needle in text and "Traceback" not in proc.stderr, proc.stderr
    if rc:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("kwargs, expected", [
    (dict(), "no model given: pass pretrained="),  # a TypeError from lm-eval's CLI
    (dict(batch_size=0), "batch_size must be a positive integer or auto, got 0"),  # ran at 1
    (dict(device="tpu9"), "device='tpu9' is not a device"),  # torch's RuntimeError
    (dict(dtype="float8"), "dtype must be one of"),  # said only after the model was loaded
])
def test_bad_model_arguments_are_refused_before_loading(ckpt, kwargs, expected):
    from mamba_train.evaluation.runner import EvalError

    with pytest.raises(EvalError, match=expected):
        MambaTrainLM(**({"pretrained": str(ckpt)} if kwargs else {}), **kwargs)


def test_an_unknown_task_is_one_line(lm, tmp_path, capsys):
    """lm-eval raised a KeyError (simple_evaluate) or a ValueError (its CLI): tracebacks."""
    from mamba_train.cli.eval import main as eval_main
    from mamba_train.cli.lm_eval import main as lm_eval_main
    from mamba_train.evaluation.runner import EvalError, evaluate

    with pytest.raises(EvalError, match="unknown task.s. no_such_task: not an lm-eval task"):
        evaluate(lm, "no_such_task,local_mc")
    assert eval_main([f"ckpt={tmp_path}", "tasks=local", "limit=-1"]) == 2
    assert "limit must be > 0" in capsys.readouterr().err
    assert lm_eval_main(["--model", "mamba_train", "--model_args", f"pretrained={tmp_path}",
                         "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: lm-eval: Tasks not found: no_such_task"), err[-3:]
