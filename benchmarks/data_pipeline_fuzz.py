"""Randomised property checks of the data pipeline (CPU, nothing downloaded).

For each seed, draw a small corpus and a run layout, build every rank's pipeline the way a run
does (``TokenDataModule`` with a stand-in Trainer that names the rank, the world size and the
gradient accumulation; real DataLoader workers), and check the contract of docs/data.md:

* windows: every sample is ``seq_len + 1`` consecutive tokens of one source's stream starting
  at a multiple of ``seq_len`` (``input_ids = w[:-1]``, ``labels = w[1:]``);
* documents: with ``document_boundaries`` ``seq_idx`` steps by one exactly where a document
  starts inside the window (known from how the corpus was generated, not from the EOS ids),
  and with ``mask_cross_document_loss`` exactly the labels that are a document's first token
  are ignored;
* ranks and workers: every rank runs ``len(loader)`` batches per epoch (the same on every
  rank); interleaving the ranks' samples (global sample ``i`` is rank ``i % world``'s) gives
  the single-process stream, whatever the micro-batch; each source's samples, in order, are
  back-to-back permutations of its windows (no duplicate, no gap, epoch after epoch);
* mixtures: every prefix of the global stream holds each source's share of it to within one
  sample (plus the 2**-20 rounding of the weights); another seed gives another order;
* exact resume: the loader state after any step, through ``torch.save``/``load``, loaded into
  a fresh pipeline (another ``num_workers``) gives the uninterrupted run's next batches bit for
  bit; under another world size (and micro-batch) the ranks continue the global stream at the
  saved global sample rounded down to a multiple of the new world size; another seed,
  ``seq_len``, data, weights or (same world size) micro-batch is refused in one line;
* validation: rank ``r`` gets windows ``r, r + world, ...`` of the file-order enumeration
  (capped at ``val_windows``), the tail that does not divide is dropped, every rank runs the
  same number of batches;
* a real Trainer (``--lightning``, every fourth seed by default): one rank resumed from the
  checkpoint of a random optimizer step (gradient accumulation 1 or 2, another ``num_workers``)
  trains on exactly the rest of the uninterrupted run's samples;
* prepare (``--prepare``, every third seed by default): a run cut after every shard
  (``max_shards=1``) and resumed writes the same shards as an uninterrupted one, and the
  splits hold every document's tokens + EOS, in order, exactly once.

The corpus: token ``base_s + p`` at position ``p`` of source ``s`` (EOS = 0 ends every
document), so each sample names its source and position. Shards are cut at random sizes
(1 token upwards), some with an empty shard listed in the index.

One line per seed, ``PASS`` or ``FAIL <reason>``, then a summary; exit status 1 on any FAIL.
``python benchmarks/data_pipeline_fuzz.py --seeds 30`` (``--quick``: smaller draws).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mamba_train.data.datamodule import TokenDataModule  # noqa: E402
from mamba_train.data.shards import DataError, ShardWriter  # noqa: E402
from mamba_train.models.loss import IGNORE_INDEX  # noqa: E402

EOS = 0
SPAN = 20_000  # token ids per source: base_s = 1 + s * SPAN
warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Failure(AssertionError):
    pass


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise Failure(msg)


# ----------------------------------------------------------------------------- the corpus
@dataclass
class Split:
    tokens: np.ndarray      # the stream
    starts: np.ndarray      # True at the first token of every document
    seq_len: int

    @property
    def windows(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len


def documents(rng, min_tokens: int, seq_len: int, base: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents of 1 token, up to seq_len, and longer than a window, each followed by EOS."""
    lens, total = [], 0
    while total < min_tokens:
        u = rng.random()
        n = 1 if u < 0.3 else int(rng.integers(1, seq_len + 1)) if u < 0.7 else int(rng.integers(seq_len, 3 * seq_len + 6))
        lens.append(n + 1)
        total += n + 1
    check(total < SPAN, "corpus too large for the token numbering")
    tokens = base + np.arange(total, dtype=np.int64)
    tokens[np.cumsum(lens) - 1] = EOS
    starts = np.zeros(total, bool)
    starts[np.cumsum([0] + lens[:-1])] = True
    return tokens, starts


def write_split(directory: Path, tokens: np.ndarray, vocab: int, rng, split: str) -> None:
    tps = int(rng.choice([1, 2, 3, 5, 7, 13, 64, 1000, 10**6]))
    if tps < 5 and len(tokens) > 3000:
        tps = 64
    writer = ShardWriter(directory, tps, {"name": "fuzz", "vocab_size": vocab, "eos_id": EOS}, split)
    cuts = np.sort(rng.integers(0, len(tokens), int(rng.integers(0, 6))))
    for piece in np.split(tokens, cuts):
        writer.add(piece)
    index = writer.finish()
    if rng.random() < 0.25:  # an empty shard listed in the index (the reader must skip it)
        (directory / "shard_empty.bin").write_bytes(b"")
        empty = {"file": "shard_empty.bin", "num_tokens": 0, "sha256": hashlib.sha256(b"").hexdigest(),
                 "max_token_id": -1}
        index["shards"].insert(int(rng.integers(0, len(index["shards"]) + 1)), empty)
        (directory / "index.json").write_text(json.dumps(index))


# ----------------------------------------------------------------------------- the draw
def draw(seed: int, quick: bool, root: Path) -> dict:
    rng = np.random.default_rng(seed)
    seq_len = int(rng.choice([1, 2, 3, 4, 5, 8, 16, 32]))
    boundaries = bool(rng.random() < 0.5)
    mask = boundaries and seq_len > 1 and bool(rng.random() < 0.6)
    n_src = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    nodes, per_node = int(rng.choice([1, 2], p=[0.7, 0.3])), int(rng.choice([1, 2, 3, 4]))
    world = nodes * per_node
    mb = int(rng.integers(1, 5))
    val_len = int(rng.choice([seq_len, 2 * seq_len, seq_len // 2 + 1]))
    max_windows = 40 if quick else 120
    vocab = int(rng.choice([65536, 1 << 24]))
    sources = []
    for s in range(n_src):
        n_win = int(rng.choice([1, 2, 3, int(rng.integers(1, max_windows))]))
        train = documents(rng, n_win * seq_len + 1, seq_len, 1 + s * SPAN)
        val = documents(rng, int(rng.integers(1, 12)) * val_len + 1, val_len, 1 + s * SPAN)
        d = root / f"src{s}"
        write_split(d / "train", train[0], vocab, rng, "train")
        write_split(d / "val", val[0], vocab, rng, "val")
        weight = float(rng.choice([1.0, rng.uniform(0.01, 1.0), rng.uniform(0.5, 50)]))
        sources.append({"path": str(d), "weight": weight, "train": Split(*train, seq_len),
                        "val": Split(*val, val_len)})
    val_total = sum(s["val"].windows for s in sources)
    val_windows = None if rng.random() < 0.6 else int(rng.integers(1, val_total + 3))
    return dict(seed=seed, seq_len=seq_len, boundaries=boundaries, mask=mask, world=world,
                nodes=nodes, mb=mb, val_len=val_len, vocab=vocab, sources=sources,
                workers=int(rng.choice([0, 1, 2], p=[0.5, 0.25, 0.25])),
                epoch_batches=None if rng.random() < 0.7 else int(rng.integers(1, 6)),
                accumulate=int(rng.choice([1, 2])), val_windows=val_windows,
                single_path=n_src == 1 and bool(rng.random() < 0.5), rng=rng, quick=quick)


def describe(d: dict) -> str:
    srcs = ",".join(f"{s['train'].windows}w/{s['weight']:.3g}" for s in d["sources"])
    return (f"L={d['seq_len']} mb={d['mb']} world={d['nodes']}x{d['world'] // d['nodes']} "
            f"workers={d['workers']} src=[{srcs}] docs={'mask' if d['mask'] else d['boundaries']} "
            f"epoch_batches={d['epoch_batches']} val_len={d['val_len']} val_windows={d['val_windows']}")


def datamodule_kwargs(d: dict) -> dict:
    kw = dict(seq_len=d["seq_len"], micro_batch_size=d["mb"], num_workers=d["workers"],
              seed=d["seed"], tokenizer=None, expected_vocab_size=d["vocab"], pin_memory=False,
              epoch_batches=d["epoch_batches"], document_boundaries=d["boundaries"],
              mask_cross_document_loss=d["mask"], val_seq_len=d["val_len"],
              val_windows=d["val_windows"])
    if d["single_path"]:
        kw["path"] = d["sources"][0]["path"]
    else:
        kw["sources"] = [{"path": s["path"], "weight": s["weight"]} for s in d["sources"]]
    return kw


def datamodule(d: dict, rank: int, world: int, **over) -> TokenDataModule:
    kw = datamodule_kwargs(d)
    accumulate = over.pop("accumulate", d["accumulate"])
    validate = over.pop("validate", False)  # the training checks run without a val split
    kw.update(over)
    dm = TokenDataModule(**kw)
    dm.trainer = SimpleNamespace(  # what the datamodule reads from Lightning's Trainer
        strategy=SimpleNamespace(distributed_sampler_kwargs={"rank": rank, "num_replicas": world}),
        global_rank=rank, world_size=world, limit_val_batches=1.0 if validate else 0,
        accumulate_grad_batches=accumulate)
    dm.setup("fit")
    return dm


def decode(d: dict, batch: dict, split: str, seq_len: int) -> list[tuple[int, int]]:
    """(source, window) of every sample, after checking its tokens, labels and seq_idx against
    the generated stream."""
    out = []
    inp, lab = batch["input_ids"].numpy(), batch["labels"].numpy()
    check(inp.shape[1] == seq_len and lab.shape == inp.shape, f"{split} batch shape {inp.shape}")
    for b in range(inp.shape[0]):
        seen = np.concatenate([inp[b], lab[b, -1:]])  # no two EOS in a row: one is a content token
        k = int(np.argmax((seen != EOS) & (seen != IGNORE_INDEX)))
        s, p = divmod(int(seen[k]) - 1, SPAN)
        check(0 <= s < len(d["sources"]), f"{split} token {seen[k]} of no source")
        sp: Split = d["sources"][s][split]
        start = p - k
        check(start % seq_len == 0 and 0 <= start // seq_len < sp.windows,
              f"{split} sample starts at token {start} of source {s}: not a window start "
              f"(seq_len {seq_len}, {sp.windows} windows)")
        w = sp.tokens[start:start + seq_len + 1]
        check((inp[b] == w[:-1]).all(), f"{split} input_ids are not tokens [{start}, {start + seq_len}) of source {s}")
        first = sp.starts[start + 1:start + seq_len + 1]  # label t is a document's first token
        want = np.where(first & d["mask"], IGNORE_INDEX, w[1:])
        check((lab[b] == want).all(), f"{split} labels of window {start // seq_len} of source {s}: "
              f"{lab[b].tolist()} != {want.tolist()}")
        if d["boundaries"]:
            want_idx = np.concatenate([[0], np.cumsum(sp.starts[start + 1:start + seq_len])])
            got = batch["seq_idx"][b].numpy()
            check((got == want_idx).all(), f"{split} seq_idx {got.tolist()} != {want_idx.tolist()}")
        else:
            check("seq_idx" not in batch, "seq_idx without document_boundaries")
        out.append((s, start // seq_len))
    return out


def transfer(dm, batch):
    return dm.on_after_batch_transfer({k: v.clone() for k, v in batch.items()}, 0)


def run_rank(dm, steps: int, save_at: set[int] = frozenset()) -> tuple[list, list, dict]:
    """``steps`` batches across epochs as Lightning takes them (one ``iter()`` per epoch);
    returns the batches, the batch count of every complete epoch and the states at ``save_at``."""
    dl = dm.train_dataloader()
    batches, per_epoch, states = [], [], {}
    if 0 in save_at:
        states[0] = dl.state_dict()
    while len(batches) < steps:
        n = 0
        for batch in dl:
            batches.append(transfer(dm, batch))
            n += 1
            if len(batches) in save_at:
                states[len(batches)] = dl.state_dict()
            if len(batches) == steps:
                break
        else:
            per_epoch.append(n)
    dl._stream = None  # stop its workers now: a run's one loader lives as long as the process
    return batches, per_epoch, states


def checkpoint_round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save({"loader": state}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)["loader"]


def same_batches(a: list, b: list, what: str) -> None:
    check(len(a) == len(b), f"{what}: {len(b)} batches, expected {len(a)}")
    for i, (x, y) in enumerate(zip(a, b)):
        check(x.keys() == y.keys(), f"{what}: batch {i} keys {sorted(y)} != {sorted(x)}")
        for k in x:
            check(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), f"{what}: batch {i} differs in {k}")


def one_line_refusal(fn, what: str) -> None:
    try:
        fn()
    except DataError as e:
        check("\n" not in str(e).strip(), f"{what}: refusal of several lines: {str(e)[:200]!r}")
        return
    except Exception as e:  # noqa: BLE001 - anything but a DataError is a finding
        raise Failure(f"{what}: {type(e).__name__} instead of a DataError: {str(e)[:200]}") from None
    raise Failure(f"{what}: accepted")


# ----------------------------------------------------------------------------- the checks
def check_training(d: dict) -> None:
    rng, world, mb, L = d["rng"], d["world"], d["mb"], d["seq_len"]
    n_windows = [s["train"].windows for s in d["sources"]]
    dms = [datamodule(d, r, world) for r in range(world)]
    length = len(dms[0].train_dataloader())
    want_len = d["epoch_batches"] or max(1, sum(n_windows) // (world * mb))
    check(length == want_len, f"len(loader) {length}, expected {want_len}")
    steps = min(max(length * int(rng.integers(1, 4)), 3 * max(n_windows) // (world * mb) + 1), 120 // world + length)
    save_at = {int(rng.integers(0, steps + 1)), length * int(rng.integers(0, 3))}
    runs = [run_rank(dm, steps, save_at) for dm in dms]
    for r, (_, per_epoch, _) in enumerate(runs):
        check(all(n == length for n in per_epoch), f"rank {r} epochs of {per_epoch} batches, len(loader)={length}")
    ids = [[w for b in batches for w in decode(d, b, "train", L)] for batches, _, _ in runs]
    glob = [ids[i % world][i // world] for i in range(len(ids[0]) * world)]

    # the single-process stream, with another micro-batch and workers: the same global order
    ref_dm = datamodule(d, 0, 1, micro_batch_size=int(rng.integers(1, 5)), num_workers=int(rng.choice([0, 2])),
                        epoch_batches=None)
    ref_len = len(glob) + 80
    ref = [w for b in run_rank(ref_dm, -(-ref_len // ref_dm.micro_batch_size))[0] for w in decode(d, b, "train", L)]
    if glob != ref[:len(glob)]:
        first = next(i for i, (a, b) in enumerate(zip(glob, ref)) if a != b)
        raise Failure(f"ranks interleaved differ from the single-process stream at global sample {first}")

    for s, n in enumerate(n_windows):  # each source: back-to-back permutations of its windows
        seq = [w for src, w in ref if src == s]
        for e in range(0, len(seq), n):
            part = seq[e:e + n]
            check(len(set(part)) == len(part) and (len(part) < n or sorted(part) == list(range(n))),
                  f"source {s} epoch {e // n}: {len(part) - len(set(part))} duplicate windows "
                  f"({len(part)} of {n} windows)")

    weights = np.array([s["weight"] for s in d["sources"]])
    weights = weights / weights.sum()
    onehot = np.eye(len(weights))[[s for s, _ in ref]]
    dev = np.abs(np.cumsum(onehot, 0) - np.arange(1, len(ref) + 1)[:, None] * weights).max(0)
    bound = 1 + weights * (len(weights) - 2 if len(weights) > 2 else 0) + len(ref) * 2.0**-19
    if (dev > bound).any():
        raise Failure(f"mixture: a prefix is {dev.max():.3f} samples off its weights (bound {bound.max():.3f})")
    if len(ref) >= 16 and any(n >= 8 and w >= 0.25 for n, w in zip(n_windows, weights)):
        other = run_rank(datamodule(d, 0, 1, seed=d["seed"] + 1, micro_batch_size=16, num_workers=0), 1)[0]
        check([w for b in other for w in decode(d, b, "train", L)] != ref[:16], "another seed, the same order")

    for k, state in sorted(runs[0][2].items()):
        check_resume(d, dms, runs, k, checkpoint_round_trip(state), glob, ref)


def check_resume(d, dms, runs, k, state, glob, ref) -> None:
    rng, world, mb, L = d["rng"], d["world"], d["mb"], d["seq_len"]
    check(state["samples_yielded"] == k * mb, f"state after {k} steps counts {state['samples_yielded']} samples")
    for r in sorted({0, world - 1}):  # fresh pipeline, other workers: the rest bit for bit
        dm = datamodule(d, r, world, num_workers=int(rng.choice([0, 1, 2])))
        dm.train_dataloader().load_state_dict(state)
        rest = runs[r][0][k:]
        same_batches(rest, run_rank(dm, len(rest))[0], f"rank {r} resumed after step {k}")
    new_world = int(rng.choice([1, 2, 3, 4, 6]))
    new_mb = int(rng.integers(1, 5)) if new_world != world else mb  # same world: same batching
    steps = 3
    g = state["samples_yielded"] * world // new_world * new_world
    got = []
    for r in range(new_world):
        dm = datamodule(d, r, new_world, micro_batch_size=new_mb, num_workers=int(rng.choice([0, 1])))
        dm.train_dataloader().load_state_dict(state)
        got.append([w for b in run_rank(dm, steps)[0] for w in decode(d, b, "train", L)])
    merged = [got[i % new_world][i // new_world] for i in range(steps * new_mb * new_world)]
    want = ref[g:g + len(merged)]
    check(len(want) < len(merged) or merged == want,
          f"resumed after step {k} on {new_world} ranks x mb {new_mb}: not the global stream from sample {g}")
    for what, over in (("another seed", {"seed": d["seed"] + 7}), ("another seq_len", {"seq_len": L + 1}),
                       ("another micro-batch", {"micro_batch_size": mb + 1}),
                       ("another accumulation", {"accumulate": d["accumulate"] + 1})):
        one_line_refusal(lambda: datamodule(d, 0, world, **over).train_dataloader().load_state_dict(state),
                         f"resume with {what}")
    scale = float(rng.choice([0.25, 2, 8]))
    scaled = [{"path": s["path"], "weight": s["weight"] * scale} for s in d["sources"]]
    dm = datamodule(d, 0, world, **({"path": None, "sources": scaled} if d["single_path"] else {"sources": scaled}))
    dm.train_dataloader().load_state_dict(state)  # weights are ratios: the same order
    same_batches(runs[0][0][k:], run_rank(dm, len(runs[0][0]) - k)[0], f"resumed after step {k} with rescaled weights")
    if len(d["sources"]) > 1:
        other = [{"path": s["path"], "weight": s["weight"] * (3 if i == 0 else 1)} for i, s in enumerate(d["sources"])]
        one_line_refusal(lambda: datamodule(d, 0, world, sources=other).train_dataloader().load_state_dict(state),
                         "resume with other weights")


def check_validation(d: dict) -> None:
    world, V = d["world"], d["val_len"]
    every = [(s, w) for s, src in enumerate(d["sources"]) for w in range(src["val"].windows)]
    total = len(every) if d["val_windows"] is None else min(len(every), d["val_windows"])
    keep = total // world * world
    if keep == 0:
        one_line_refusal(lambda: datamodule(d, 0, world, validate=True), f"{total} validation windows on {world} ranks")
        return
    counts, seen = set(), []
    for r in range(world):
        dm = datamodule(d, r, world, validate=True)
        batches = [transfer(dm, b) for b in dm.val_dataloader()]
        counts.add(len(batches))
        check(all(len(b["input_ids"]) == dm.val_batch_size for b in batches[:-1]), "val batch sizes")
        got = [w for b in batches for w in decode(d, b, "val", V)]
        check(got == every[r:keep:world], f"val rank {r}: windows {got[:6]}..., expected {every[r:keep:world][:6]}...")
        seen += got
    check(len(counts) == 1, f"val batches per rank differ: {counts}")
    check(sorted(seen) == sorted(every[:keep]), "val: union over ranks")


def check_lightning(d: dict, root: Path) -> None:
    """One rank under a real Trainer: resuming from the checkpoint of a random optimizer step
    (gradient accumulation, epochs of any length, another num_workers) trains on exactly the
    rest of the uninterrupted run's samples."""
    import logging

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    for name in ("lightning.pytorch", "lightning.fabric"):  # its INFO lines, one per fit
        logging.getLogger(name).setLevel(logging.WARNING)

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple] = []

        def training_step(self, batch, batch_idx):
            self.seen += [tuple(x) for x in batch["input_ids"][:, :2].tolist()]
            return (self.w - 1).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(ckpt_dir, workers, ckpt_path=None):
        kw = {k: v for k, v in datamodule_kwargs(d).items() if k != "num_workers"}
        dm = TokenDataModule(num_workers=workers, **kw)
        model = Recorder()
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0,
                            accumulate_grad_batches=d["accumulate"], enable_checkpointing=True,
                            callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="{step}",
                                                       every_n_train_steps=1, save_top_k=-1)])
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        dm._train_loader._stream = None  # its workers stop now, not in a later fork's garbage collection
        return model.seen

    rng = d["rng"]
    steps = int(rng.integers(2, 9))
    full = fit(root / "full", d["workers"])
    k = int(rng.integers(1, steps))
    ckpt = root / "full" / f"step={k}.ckpt"
    consumed = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["samples_yielded"]
    resumed = fit(root / f"resumed{k}", int(rng.choice([0, 1, 2])), ckpt)
    check(resumed == full[consumed:], f"Trainer resumed from step {k} (of {steps}, accumulation "
          f"{d['accumulate']}): {len(resumed)} samples, expected the last {len(full) - consumed} of {len(full)}")


# ----------------------------------------------------------------------------- prepare
WORDS = "the of a statement is value object name class function module return loop é 東京 🙂".split()


def check_prepare(seed: int, root: Path) -> None:
    from mamba_train.data.prepare import PrepareConfig, prepare
    from rich.console import Console

    rng = np.random.default_rng(seed + 10**6)
    docs = []
    for _ in range(int(rng.integers(1, 80))):
        n = int(rng.choice([0, 1, int(rng.integers(1, 20)), int(rng.integers(20, 300))]))
        docs.append(" ".join(str(rng.choice(WORDS)) for _ in range(n)))
    if not any(docs):
        docs.append("the")
    root.mkdir(parents=True, exist_ok=True)
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    words = sum(len(t.split()) for t in docs) + len(docs)  # about the tokens
    common = dict(source=str(src), tokenizer="default",
                  tokens_per_shard=max(int(rng.choice([1, 7, 50, 300, 5000])), words // 300),
                  val_fraction=float(rng.choice([0.0, 0.1, 0.5])),
                  min_val_tokens=int(rng.choice([0, 10, 200])), batch_docs=int(rng.choice([1, 3, 512])))
    quiet = Console(file=io.StringIO())
    whole_proc = 2 if rng.random() < 0.3 else 1  # worker processes: the same output
    whole = prepare(PrepareConfig(out=str(root / "whole"), num_proc=whole_proc, **common), console=quiet)
    shards = sum(len(whole["splits"][s]["shards"]) for s in ("train", "val"))
    step = max(1, shards // 25)  # at most ~25 cut runs, each resuming the previous one's
    for runs in range(1, shards + 3):
        if prepare(PrepareConfig(out=str(root / "cut"), num_proc=1, max_shards=step, **common),
                   console=quiet).get("done"):
            break
    try:
        check(runs <= shards // step + 1, f"prepare: {runs} runs of max_shards={step} for {shards} shards")
        compare_prepared(root, docs)
    except Failure as e:
        raise Failure(f"{e} ({ {k: v for k, v in common.items() if k != 'source'} }, num_proc={whole_proc})") from None


def compare_prepared(root: Path, docs: list[str]) -> None:
    from mamba_train.data.shards import TokenShards
    from mamba_train.data.tokenizer import load_backend

    for split in ("train", "val"):
        a, b = (json.loads((root / o / split / "index.json").read_text()) for o in ("whole", "cut"))
        check(a == b, f"prepare {split}: a run resumed after every shard wrote other shards")
    tok, info = load_backend("default")
    want = [np.array(tok.encode(t, add_special_tokens=False).ids + [info["eos_id"]]) for t in docs if t]
    streams = {}
    for split in ("train", "val"):
        sh = TokenShards(root / "whole" / split)
        streams[split] = sh.tokens(0, len(sh)).astype(np.int64)
    pos = {"train": 0, "val": 0}
    for i, w in enumerate(want):  # each document, in order, in exactly one split
        hits = [s for s in pos if np.array_equal(streams[s][pos[s]:pos[s] + len(w)], w)]
        check(bool(hits), f"prepare: document {i} is in neither split at its place")
        pos[hits[0]] += len(w)
    check(all(pos[s] == len(streams[s]) for s in pos), f"prepare: extra tokens {pos} of {[len(v) for v in streams.values()]}")


# ----------------------------------------------------------------------------- driver
def run_seed(seed: int, quick: bool, prepare: bool, lightning: bool) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="datafuzz-") as tmp:
        d = draw(seed, quick, Path(tmp))
        desc = describe(d)
        try:
            check_training(d)
            check_validation(d)
            if prepare:
                check_prepare(seed, Path(tmp) / "prepare")
                desc += " +prepare"
            if lightning:
                check_lightning(d, Path(tmp) / "lightning")
                desc += " +lightning"
        except Failure as e:
            return False, f"{desc}: {e}"
        except Exception:  # noqa: BLE001 - a crash is a finding
            return False, f"{desc}: crash\n{traceback.format_exc()}"
        return True, desc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=30, help="how many seeds")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smaller corpora")
    p.add_argument("--prepare", choices=("every", "third", "none"), default="third",
                   help="which seeds also fuzz prepare's resume")
    p.add_argument("--lightning", choices=("every", "fourth", "none"), default="fourth",
                   help="which seeds also resume a real Trainer from a checkpoint")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    failures, t0 = 0, time.time()
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        prep = args.prepare == "every" or (args.prepare == "third" and seed % 3 == 0)
        t = time.time()
        light = args.lightning == "every" or (args.lightning == "fourth" and seed % 4 == 1)
        ok, msg = run_seed(seed, args.quick, prep, light)
        failures += not ok
        print(f"seed {seed:5d} {'PASS' if ok else 'FAIL'} {msg} ({time.time() - t:.1f}s)", flush=True)
    print(f"summary: {args.seeds - failures} PASS, {failures} FAIL of {args.seeds} seeds in "
          f"{time.time() - t0:.0f}s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
