"""Convert a trained model between formats.

Usage::

    python -m mamba_train.export ckpt=<path> out=<dir> format=hf|mamba_ssm \\
        [dtype=float32|bfloat16] [tokenizer=<name or path>]

``ckpt`` is anything ``mamba_train.load_model`` reads: a Lightning ``.ckpt`` written by
mamba_train, a mamba_ssm directory (``config.json`` + ``pytorch_model.bin``/safetensors) or a
transformers Mamba/Mamba2 directory. ``format=hf`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads; ``format=mamba_ssm`` one that
``mamba_ssm.MambaLMHeadModel.from_pretrained`` loads. Exit status: 0 on success, 2 for bad
arguments, 1 when the conversion itself fails (the message says why).
"""

from __future__ import annotations

import sys
from pathlib import Path

FORMATS = ("hf", "mamba_ssm")
DTYPES = ("float32", "bfloat16")
REQUIRED = ("ckpt", "out", "format")
OPTIONAL = ("dtype", "tokenizer")
USAGE = ("usage: python -m mamba_train.export ckpt=<path> out=<dir> format=hf|mamba_ssm "
         "[dtype=float32|bfloat16] [tokenizer=<name or path>]")


class UsageError(ValueError):
    pass


def parse_args(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        key = key.lstrip("-")
        if not sep:
            raise UsageError(f"argument {item!r} is not key=value")
        if key not in REQUIRED + OPTIONAL:
            raise UsageError(f"unknown argument {key!r}; expected {', '.join(REQUIRED + OPTIONAL)}")
        if key in args:
            raise UsageError(f"argument {key!r} given twice")
        if not value:
            raise UsageError(f"argument {key}= has an empty value")
        args[key] = value
    missing = [k for k in REQUIRED if k not in args]
    if missing:
        raise UsageError(f"missing required argument(s): {', '.join(k + '=' for k in missing)}")
    if args["format"] not in FORMATS:
        raise UsageError(f"format must be one of {'|'.join(FORMATS)}, got {args['format']!r}")
    if "dtype" in args and args["dtype"] not in DTYPES:
        raise UsageError(f"dtype must be one of {'|'.join(DTYPES)}, got {args['dtype']!r}")
    return args


def convert(args: dict[str, str]) -> Path:
    import torch

    dtype = getattr(torch, args["dtype"]) if "dtype" in args else None
    out = Path(args["out"])
    if args["format"] == "hf":
        from mamba_train.export.hf import export_hf
        return export_hf(args["ckpt"], out, dtype=dtype, tokenizer=args.get("tokenizer"))

    from mamba_train.export.load import load_model
    model = load_model(args["ckpt"], backend="reference", device="cpu")
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out)
    if "tokenizer" in args:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(args["tokenizer"]).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE)
        print(__doc__.split("\n\n", 2)[-1].strip())
        return 0
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e} (usage: python -m mamba_train.export ckpt=<path> out=<dir> "
              "format=hf|mamba_ssm [dtype=float32|bfloat16] [tokenizer=<name or path>])",
              file=sys.stderr)
        return 2
    try:
        out = convert(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        # CheckpointError / ExportError / ConfigError are ValueErrors with a full sentence
        msg = " ".join(str(e).split())
        print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    print(f"wrote {args['format']} model ({args.get('dtype', 'source dtype')}) to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
