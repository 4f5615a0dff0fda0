"""Regenerate the bundled default tokenizer, ``mamba_train/assets/tokenizer/``.

A byte-level BPE (GPT-2 style: any UTF-8 text encodes, nothing is ever unknown) with 4096
entries, trained with the ``tokenizers`` library on the *train* split of the embedded default
corpus (``mamba_train.data.default_corpus``) so that validation text is unseen. Id 0 is
``<|endoftext|>``, the end-of-document separator that ``prepare`` appends after every document.

The vocabulary is small on purpose: the file stays ~100 KB in git and the default model's
embedding stays small. Real runs use a real tokenizer (e.g. ``EleutherAI/gpt-neox-20b``).

Run: ``python scripts/build_default_tokenizer.py [--out DIR]``. Training is deterministic for
a given corpus text and ``tokenizers`` version.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout
from mamba_train.data.default_corpus import default_split  # noqa: E402

VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "mamba_train" / "assets" / "tokenizer"


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(default_split("train"), trainer=trainer)
    assert tok.token_to_id(EOS) == 0 and tok.get_vocab_size() == VOCAB_SIZE
    return tok


def save(tok: Tokenizer, out: Path) -> None:
    """Write ``tokenizer.json`` plus a ``tokenizer_config.json`` that makes the directory load
    with ``AutoTokenizer.from_pretrained`` (lm-eval, HF export) on transformers 4.x and 5.x."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "model_max_length": 1_000_000_000,  # a recurrent model has no fixed context
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    tok = build()
    save(tok, args.out)
    for f in sorted(args.out.iterdir()):
        print(f"{f}  {f.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
