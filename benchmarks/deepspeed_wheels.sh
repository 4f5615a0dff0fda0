#!/usr/bin/env bash
# Builds .whl_rel: the wheel set for `device_call.sh reliab` with DeepSpeed, which the device
# machine lacks. DeepSpeed ships only an sdist; built here with no CUDA ops (DS_BUILD_OPS=0: the
# 1-GPU ZeRO tests use a torch optimizer, so no op is compiled). Everything must fit the 64 MiB a
# device call carries beside the tracked tree, so lm-eval/datasets stay out (train() imports
# neither), DeepSpeed's C++ sources (only for JIT op builds) are dropped and causal-conv1d is
# re-zipped with LZMA (pip reads it; 0.8 MB smaller). Needs torch installed here (its setup.py).
#   bash benchmarks/deepspeed_wheels.sh && BUDGET_S=540 WHL=.whl_rel bash benchmarks/device_call.sh reliab
set -euo pipefail
SRC=${SRC:-.whl}; DEST=.whl_rel; WORK=$(mktemp -d)
mkdir -p "$DEST"
for w in mamba_ssm hydra_core omegaconf antlr4; do cp "$SRC"/$w*.whl "$DEST"/; done
pip download -q --no-deps deepspeed==0.19.8 -d "$WORK"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  pydantic pydantic_core annotated_types typing_inspection hjson -d "$DEST"
tar xzf "$WORK"/deepspeed-0.19.8.tar.gz -C "$WORK"
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation -w "$WORK" "$WORK"/deepspeed-0.19.8
python3 - "$WORK" "$SRC" "$DEST" <<'PY'
import pathlib, sys, zipfile
work, src, dest = map(pathlib.Path, sys.argv[1:])
def repack(path, out, drop=()):
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_LZMA) as zout:
        for info in zin.infolist():
            if not info.filename.startswith(drop):
                zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_LZMA)
repack(next(work.glob("deepspeed-*.whl")), dest / "deepspeed-0.19.8-py3-none-any.whl",
       drop=("deepspeed/ops/csrc/",))
conv = next(src.glob("causal_conv1d-*.whl"))
repack(conv, dest / conv.name)
PY
rm -rf "$WORK"; du -sh "$DEST"
