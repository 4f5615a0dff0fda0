"""The prepare CLI end to end (subprocess), resume, and its error messages."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from mamba_train.cli.args import UsageError
from mamba_train.cli.prepare import main, parse_args
from mamba_train.data.shards import TokenShards, validate_dataset
from mamba_train.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "the of a statement is value object name class function module return loop".split()


def run_prepare(*args):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "mamba_train.data.prepare", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 150))) for _ in range(300)]
    lines = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs))
    (d / "docs.jsonl").write_text(lines)
    (d / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return d, docs


def shards_of(out):
    return {s: json.loads((out / s / "index.json").read_text())["shards"] for s in ("train", "val")}


def test_jsonl_end_to_end(corpus, tmp_path):
    d, docs = corpus
    out = tmp_path / "out"
    log = run_prepare(f"source={d / 'docs.jsonl'}", f"out={out}", "tokens_per_shard=1000",
                      "val_fraction=0.2", "num_proc=2", "batch_docs=16")
    assert "wrote" in log
    tok = load_tokenizer("default")
    texts = []
    for split in ("train", "val"):
        index = validate_dataset(out / split, expected_vocab_size=4096, checksums=True)
        assert index["tokenizer"] == {"name": "default", "vocab_size": 4096, "eos_id": 0}
        assert index["dtype"] == "uint16" and all(s["num_tokens"] == 1000 for s in index["shards"][:-1])
        stream = TokenShards(out / split).tokens(0, index["total_tokens"])
        assert stream[-1] == 0  # every document ends with EOS
        cuts = np.flatnonzero(stream == 0)
        texts.append([tok.decode(stream[a + 1:b]) for a, b in zip(np.r_[-1, cuts[:-1]], cuts)])
    train, val = texts
    assert 0.1 < len(val) / len(docs) < 0.3
    assert sorted(train + val) == sorted(docs)  # every document once, in one split, intact
    assert train == [t for t in docs if t in set(train)]  # stream order = source order


def test_zst_and_resume_give_identical_shards(corpus, tmp_path, capsys):
    d, _ = corpus
    common = ["tokens_per_shard=1000", "val_fraction=0.2", "batch_docs=16"]
    assert main([f"source={d / 'docs.jsonl'}", f"out={tmp_path / 'ref'}", "num_proc=1", *common]) == 0
    out = tmp_path / "resumed"
    log = run_prepare(f"source={d / 'docs.jsonl.zst'}", f"out={out}", "num_proc=2", "max_shards=3", *common)
    assert "stopped after" in log and not (out / "train" / "index.json").exists()
    splits = json.loads((out / "progress.json").read_text())["splits"]
    assert sum(len(st["shards"]) for st in splits.values()) >= 3  # val's first (its minimum), then train
    mtime = (out / "train" / "shard_00000.bin").stat().st_mtime_ns
    capsys.readouterr()
    assert main([f"source={d / 'docs.jsonl.zst'}", f"out={out}", "num_proc=2", *common]) == 0
    assert "resuming" in capsys.readouterr().err
    assert (out / "train" / "shard_00000.bin").stat().st_mtime_ns == mtime  # skipped, not rewritten
    assert shards_of(out) == shards_of(tmp_path / "ref")  # same bytes as an uninterrupted run
    assert main([f"source={d / 'docs.jsonl.zst'}", f"out={out}", *common]) == 0
    assert "already complete" in capsys.readouterr().err


def test_missing_source(tmp_path, capsys):
    assert main([f"source={tmp_path / 'nope.jsonl'}", f"out={tmp_path / 'o'}"]) == 2
    assert "nope.jsonl' not found" in capsys.readouterr().err


def test_empty_source(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    for name in ("empty.jsonl", "blank.jsonl"):
        assert main([f"source={tmp_path / name}", f"out={tmp_path / name}.out", "num_proc=1"]) == 2
        assert f"{name}' has no documents" in capsys.readouterr().err


def test_missing_text_key(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text('{"content": "hello", "id": 1}\n')
    assert main([f"source={tmp_path / 'x.jsonl'}", f"out={tmp_path / 'o'}", "num_proc=1"]) == 2
    err = capsys.readouterr().err
    assert "no 'text' field; fields present: ['content', 'id']. Pass text_key=" in err


def test_other_settings_refused(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_text('{"text": "hello world"}\n')
    assert main([f"source={tmp_path / 'x.jsonl'}", f"out={tmp_path / 'o'}", "num_proc=1"]) == 0
    assert main([f"source={tmp_path / 'x.jsonl'}", f"out={tmp_path / 'o'}", "val_fraction=0.5"]) == 2
    assert "holds a prepare run with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("arg, expected", [
    ("num_proc=0", "num_proc must be >= 1, got 0"),  # ran on one process
    ("tokens_per_shard=0", "tokens_per_shard must be >= 1, got 0"),  # a ValueError traceback
    ("batch_docs=0", "batch_docs must be >= 1, got 0"),  # "has no documents"
    ("max_shards=0", "max_shards must be >= 1, got 0"),  # wrote nothing, exit 0
    ("val_fraction=abc", "val_fraction"),  # then the usage on a second line
    ("shards=3", "unknown argument 'shards'"),
])
def test_a_bad_argument_is_one_line(tmp_path, capsys, arg, expected):
    (tmp_path / "x.jsonl").write_text('{"text": "hello world"}\n')
    assert main([f"source={tmp_path / 'x.jsonl'}", f"out={tmp_path / 'o'}", arg]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err
    assert not (tmp_path / "o").exists()


def test_an_out_that_is_not_a_prepare_output_is_left_as_it_was(tmp_path, capsys):
    """The refusal came after the lock file was written into the user's directory; a file as
    out= was a FileExistsError traceback."""
    (tmp_path / "x.jsonl").write_text('{"text": "hello world"}\n')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep\n")
    assert main([f"source={tmp_path / 'x.jsonl'}", f"out={mine}"]) == 2
    assert "is not a prepare output" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert main([f"source={tmp_path / 'x.jsonl'}", f"out={mine / 'notes.txt'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "notes.txt is a file" in err, err


def test_parse_args():
    cfg = parse_args(["source=a.jsonl", "out=o", "tokens_per_shard=1e6", "val_fraction=0.05",
                      "max_shards=none"])
    assert (cfg.tokens_per_shard, cfg.val_fraction, cfg.max_shards) == (1_000_000, 0.05, None)
    with pytest.raises(UsageError, match="unknown argument .bogus."):
        parse_args(["source=a", "out=o", "bogus=1"])


@pytest.mark.parametrize("name, content, message", [
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "is not valid UTF-8 text"),
    ("latin1.txt", b"caf\xe9 au lait\n", "is not valid UTF-8 text"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": oops\n', "cannot parse it"),
])
def test_undecodable_source_is_one_line_naming_the_file(tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    assert main([f"source={tmp_path / name}", f"out={tmp_path / 'o'}", "num_proc=1"]) == 2
    err = capsys.readouterr().err
    assert f"prepare: error: source '{tmp_path / name}'" in err and message in err
    assert "Traceback" not in err


def test_full_disk_while_writing_a_shard_is_one_line(corpus, tmp_path, capsys, monkeypatch):
    """The second shard's write fails with ENOSPC half-way: one line naming the file; the first
    shard is whole and no partial file is left."""
    import errno

    import mamba_train.data.shards as shards
    from mamba_train.fileio import atomic_write

    d, _ = corpus
    real, calls = shards.atomic_write_bytes, {"n": 0}

    def fill_disk_at_second_shard(path, data):
        calls["n"] += Path(path).suffix == ".bin"
        if calls["n"] != 2 or Path(path).suffix != ".bin":
            return real(path, data)

        def half_then_full(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        atomic_write(path, half_then_full)
    monkeypatch.setattr(shards, "atomic_write_bytes", fill_disk_at_second_shard)
    out = tmp_path / "out"
    rc = main([f"source={d / 'docs.jsonl'}", f"out={out}", "tokens_per_shard=1000", "num_proc=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "no space left on the device while writing" in err and "shard_00001.bin" in err, err
    assert "Traceback" not in err
    assert [p.name for p in out.rglob("*shard*")] == ["shard_00000.bin"]
    assert next(out.rglob("*.bin")).stat().st_size == 2000  # whole (uint16 tokens)


def test_a_second_prepare_into_the_same_out_refuses_while_the_first_runs(corpus, tmp_path, capsys):
    """Two prepares with other settings into one out= would interleave their shards: while one
    holds out='s lock the other refuses in one line naming it, and writes nothing."""
    from mamba_train.data.shards import LOCK_FILE
    from mamba_train.fileio import exclusive_lock, release_lock

    d, _ = corpus
    out = tmp_path / "out"
    out.mkdir()
    fd, _ = exclusive_lock(out / LOCK_FILE, "pid 4242 on elsewhere\n")  # a prepare in progress
    try:
        rc = main([f"source={d / 'docs.jsonl'}", f"out={out}", "val_fraction=0.2", "num_proc=1"])
    finally:
        release_lock(fd)
    err = capsys.readouterr().err
    assert rc == 2 and f"out={out} is being written by another prepare (pid 4242 on elsewhere)" in err
    assert "Traceback" not in err and sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    assert main([f"source={d / 'docs.jsonl'}", f"out={out}", "num_proc=1"]) == 0  # lock released


def test_a_killed_prepares_partial_shards_are_removed_and_files_follow_the_umask(corpus, tmp_path):
    """A prepare killed mid-write leaves .shard_*.tmp files: the next one removes them. Every
    file it writes gets 0666 less the umask (group-readable under umask 027), not 0600."""
    d, _ = corpus
    out = tmp_path / "out"
    run_prepare(f"source={d / 'docs.jsonl'}", f"out={out}", "tokens_per_shard=1000", "num_proc=1",
                "max_shards=1")
    before = {p for p in out.rglob("*") if p.is_file()}
    partial = out / "train" / ".shard_00007.bin.k1ll3d.tmp"
    partial.write_bytes(b"\0" * 100)
    (out / ".progress.json.abc123.tmp").write_text("{")
    keep = out / "train" / "notes.tmp"  # not a name prepare writes: left alone
    keep.write_text("mine")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(["sh", "-c", f'umask 027 && exec "{sys.executable}" -m mamba_train.data.prepare '
                           f'source={d / "docs.jsonl"} out={out} tokens_per_shard=1000 num_proc=1'],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not partial.exists() and not (out / ".progress.json.abc123.tmp").exists() and keep.exists()
    later = [p for p in out.rglob("*") if p.is_file() and p not in before and p != keep]
    assert len(later) >= 3 and {oct(p.stat().st_mode & 0o777) for p in later} == {oct(0o640)}, \
        {p.name: oct(p.stat().st_mode & 0o777) for p in later}
    index = json.loads((out / "train" / "index.json").read_text())
    vocab = index["tokenizer"]["vocab_size"]
    for shard in index["shards"]:  # recorded for the load-time range check
        tokens = np.fromfile(out / "train" / shard["file"], dtype=index["dtype"])
        assert shard["max_token_id"] == int(tokens.max()) < vocab


def test_a_tokenizer_that_needs_its_own_code_is_refused_in_one_line(corpus, tmp_path, capsys):
    from mamba_train.data.tokenizer import DEFAULT_TOKENIZER_DIR

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_bytes((DEFAULT_TOKENIZER_DIR / "tokenizer.json").read_bytes())
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "FooTokenizer", "auto_map": {"AutoTokenizer": ["foo.FooTokenizer", None]}}))
    (tok / "foo.py").write_text("raise SystemExit('remote code ran')\n")
    d, _ = corpus
    rc = main([f"source={d / 'docs.jsonl'}", f"out={tmp_path / 'out'}", f"tokenizer={tok}", "num_proc=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"prepare: error: tokenizer '{tok}' needs to run its repository's own Python code" in err


def test_resume_inside_the_val_minimum_gives_identical_shards(corpus, tmp_path):
    """Stopped after one val shard, while the first documents still fill min_val_tokens."""
    d, _ = corpus
    common = [f"source={d / 'docs.jsonl'}", "tokens_per_shard=1000", "val_fraction=0.2",
              "batch_docs=16", "num_proc=1", "min_val_tokens=2500"]
    assert main([*common, f"out={tmp_path / 'ref'}"]) == 0
    assert main([*common, f"out={tmp_path / 'r'}", "max_shards=1"]) == 0
    progress = json.loads((tmp_path / "r" / "progress.json").read_text())
    assert progress.get("val_head_docs") is None and len(progress["splits"]["val"]["shards"]) == 1
    assert main([*common, f"out={tmp_path / 'r'}"]) == 0
    assert shards_of(tmp_path / "r") == shards_of(tmp_path / "ref")
    val = json.loads((tmp_path / "ref" / "val" / "index.json").read_text())
    assert val["total_tokens"] >= 2500


def test_resume_twice_inside_a_document_that_straddles_a_shard(tmp_path):
    """val stops inside its first document (a shard cut mid-document); the next run re-adds
    the document's tail and stops when train writes a shard, val's tail still buffered. The
    third run must still skip the head the first wrote (it once restarted the document from
    its first token, writing the head twice, and alternated without finishing)."""
    words = "the of a statement is value object name class function module return loop".split()
    docs = [" ".join(words[i % len(words)] for i in range(60))]  # ~60 tokens, val (the minimum)
    docs += [" ".join(words[(i + k) % len(words)] for i in range(10)) for k in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    common = [f"source={tmp_path / 'd.jsonl'}", "tokens_per_shard=40", "val_fraction=1e-9",
              "min_val_tokens=1", "num_proc=1", "batch_docs=1"]
    assert main([*common, f"out={tmp_path / 'ref'}"]) == 0
    for runs in range(1, 40):
        assert main([*common, f"out={tmp_path / 'cut'}", "max_shards=1"]) == 0
        if (tmp_path / "cut" / "train" / "index.json").exists():
            break
    assert shards_of(tmp_path / "cut") == shards_of(tmp_path / "ref")
    assert runs <= sum(len(s) for s in shards_of(tmp_path / "ref").values()) + 1
