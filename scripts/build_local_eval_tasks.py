"""Build the offline lm-eval task data in ``mamba_train/evaluation/tasks/data/`` (run once; the
JSONL files are committed).

The text is the embedded corpus' *validation* documents (``default_split("val")``: Python's
language reference as shipped in ``pydoc_data``, never seen by the debug recipe's training
split), so a model trained on the default corpus is evaluated on held-out prose of the same
domain. Python versions ship slightly different text: the committed files were built with
Python 3.11; rebuilding elsewhere gives similar, not identical, files.

    python scripts/build_local_eval_tasks.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from mamba_train.data.default_corpus import default_split

OUT = Path(__file__).resolve().parents[1] / "mamba_train" / "evaluation" / "tasks" / "data"
SENTENCE_END = re.compile(r"(?<=[a-z][.!?])\s+(?=[A-Z])")


def prose_paragraphs(docs: list[str]) -> list[str]:
    """Plain-English paragraphs: no headings, code, lists or markup-heavy lines, 20+ words."""
    out = []
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc):
            lines = para.splitlines()
            if not lines or any(l.startswith((" ", "\t", "*", "-", "=", ">>>", "+")) for l in lines):
                continue
            text = re.sub(r"\s+", " ", " ".join(l.strip() for l in lines))
            if any(c in text for c in '"`{}[]|\\_=<>*'):
                continue
            if 20 <= len(text.split()) <= 90 and text.endswith("."):
                out.append(text)
    return out


def sentences(paragraph: str) -> list[str]:
    return [s for s in SENTENCE_END.split(paragraph) if len(s.split()) >= 6]


def main() -> None:
    rng = random.Random(0)
    # held-out documents first, then the training documents' paragraphs to reach ~40 examples
    paragraphs = prose_paragraphs(default_split("val")) + prose_paragraphs(default_split("train"))
    seen, unique = set(), []
    for p in paragraphs:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    paragraphs = unique

    # LAMBADA-style: predict the final word of a passage (strip the closing period).
    lambada = []
    for p in paragraphs:
        words = p[:-1].split(" ")
        if re.fullmatch(r"[a-z]{4,}", words[-1]) and len(words) >= 20:
            lambada.append({"text": " ".join(words)})
    lambada = lambada[:40]

    # Multiple choice: which sentence follows? (the true next one vs three from elsewhere)
    pairs = [(a, b) for p in paragraphs for a, b in list(zip(sentences(p), sentences(p)[1:]))[:1]]
    pool = [s for p in paragraphs for s in sentences(p)]
    mc = []
    for a, b in pairs[:40]:
        distractors = rng.sample([s for s in pool if s not in (a, b)], 3)
        choices = distractors + [b]
        rng.shuffle(choices)
        mc.append({"context": a, "choices": choices, "label": choices.index(b)})

    # Rolling log-likelihood (perplexity) over whole paragraphs.
    ppl = [{"text": p} for p in paragraphs[::max(1, len(paragraphs) // 20)][:20]]

    # Generation: continue the sentence; the reference is the rest of the sentence.
    gen = []
    for p in paragraphs:
        s = sentences(p)[0] if sentences(p) else ""
        words = s.rstrip(".").split(" ")
        if 10 <= len(words) <= 30:
            cut = len(words) - 3
            gen.append({"prompt": " ".join(words[:cut]), "target": " " + " ".join(words[cut:])})
    gen = gen[:20]

    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in {"lambada": lambada, "mc": mc, "ppl": ppl, "gen": gen}.items():
        with open(OUT / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} examples -> {OUT / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
