"""Convert a trained model between formats.

Usage::

    mamba-train-export ckpt=<path> out=<dir> format=hf|mamba_ssm \\
        [dtype=float32|bfloat16] [tokenizer=<name or path>]

``ckpt`` is anything ``mamba_train.load_model`` reads: a Lightning ``.ckpt`` written by
mamba_train, a mamba_ssm directory (``config.json`` + ``pytorch_model.bin``/safetensors) or a
transformers Mamba/Mamba2 directory. ``format=hf`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads; ``format=mamba_ssm`` one that
``mamba_ssm.MambaLMHeadModel.from_pretrained`` loads. Both carry the tokenizer the model was
trained with (the checkpoint's ``data.tokenizer``, or the tokenizer files of a model directory)
unless ``tokenizer=`` names another (``default``: the bundled one); its special-token ids go
into the transformers ``config.json``, so ``AutoTokenizer`` and ``generate()`` work as they are.
Exit status: 0 on success, 2 for bad arguments, 1 when the conversion itself fails (the message
says why).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mamba_train.cli.args import UsageError, parse_key_values, wants_help
from mamba_train.errors import MambaTrainError

FORMATS = ("hf", "mamba_ssm")
DTYPES = ("float32", "bfloat16")
REQUIRED = ("ckpt", "out", "format")
# what an export writes besides weight files (*.safetensors, *.bin)
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
USAGE = ("usage: mamba-train-export (or python -m mamba_train.export) ckpt=<path> out=<dir> format=hf|mamba_ssm "
         "[dtype=float32|bfloat16] [tokenizer=<name or path>]")


@dataclass
class ExportArgs:
    ckpt: Optional[str] = None
    out: Optional[str] = None
    format: Optional[str] = None
    dtype: Optional[str] = None
    tokenizer: Optional[str] = None


def parse_args(argv: list[str]) -> dict[str, str]:
    """The given arguments as a dict (absent optional ones left out)."""
    parsed = parse_key_values(argv, ExportArgs, required=REQUIRED)
    args = {k: str(v) for k, v in vars(parsed).items() if v is not None}
    if args["format"] not in FORMATS:
        raise UsageError(f"format must be one of {'|'.join(FORMATS)}, got {args['format']!r}")
    if "dtype" in args and args["dtype"] not in DTYPES:
        raise UsageError(f"dtype must be one of {'|'.join(DTYPES)}, got {args['dtype']!r}")
    out = Path(args["out"])
    if out.exists() and not out.is_dir():
        raise UsageError(f"out={out} is a file; give a new or empty directory")
    held = sorted(p.name for p in out.iterdir() if p.name in MODEL_FILES
                  or p.suffix in (".safetensors", ".bin")) if out.is_dir() else []
    if held:  # the export would overwrite some of them and leave the rest beside its own
        raise UsageError(f"out={out} already holds a model ({', '.join(held)}); export into a new "
                         "or empty directory")
    return args


def convert(args: dict[str, str]) -> Path:
    import torch

    dtype = getattr(torch, args["dtype"]) if "dtype" in args else None
    out = Path(args["out"])
    if args["format"] == "hf":
        from mamba_train.formats.hf_export import export_hf
        return export_hf(args["ckpt"], out, dtype=dtype, tokenizer=args.get("tokenizer"))

    from mamba_train.data.tokenizer import load_tokenizer
    from mamba_train.formats.load import load_model, tokenizer_of
    model = load_model(args["ckpt"], backend="reference", device="cpu")
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, for_mamba_ssm=True)
    tokenizer = args.get("tokenizer") or tokenizer_of(args["ckpt"])
    if tokenizer is not None:
        load_tokenizer(tokenizer).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(USAGE)
        print(__doc__.split("\n\n", 2)[-1].strip())
        return 0
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"error: {e} ({USAGE})", file=sys.stderr)
        return 2
    try:
        out = convert(args)
    except (MambaTrainError, ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        # CheckpointError / ExportError / ConfigError are ValueErrors with a full sentence
        msg = " ".join(str(e).split())
        print(f"error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    print(f"wrote {args['format']} model ({args.get('dtype', 'source dtype')}) to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
