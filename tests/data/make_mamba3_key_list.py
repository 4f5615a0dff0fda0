"""Regenerate ``mamba_ssm_keys_mamba3_layer.json``: the parameter names, shapes and dtypes of
``mamba_ssm.modules.mamba3.Mamba3`` (mamba_ssm 2.3.2) for three small configurations.

Independent of mamba_train: it runs mamba_ssm's own ``Mamba3.__init__`` from an unpacked wheel,
with the kernel imports (CUDA/Triton/TileLang, not needed to build the parameters) stubbed out.

    python tests/data/make_mamba3_key_list.py /path/to/unpacked/mamba_ssm out.json
"""
import importlib.util
import json
import sys
import types

root = sys.argv[1]
def stub(name, **attrs):
    m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m; return m
for n in ["mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.ops.triton.mamba3"]:
    stub(n).__path__ = []
spec = importlib.util.spec_from_file_location("mamba_ssm.ops.triton.layernorm_gated", f"{root}/ops/triton/layernorm_gated.py")
lg = importlib.util.module_from_spec(spec); sys.modules[spec.name] = lg; spec.loader.exec_module(lg)
stub("mamba_ssm.ops.triton.mamba3.mamba3_siso_combined", mamba3_siso_combined=None)
stub("mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step", apply_rotary_qk_inference_fwd=None)
spec = importlib.util.spec_from_file_location("m3", f"{root}/modules/mamba3.py")
m3 = importlib.util.module_from_spec(spec); spec.loader.exec_module(m3)
m3.mamba3_mimo_combined = object()  # let MIMO construct
cases = {
  "siso": dict(d_model=64, d_state=32, headdim=16),
  "siso_outproj_norm_ngroups2_rope1": dict(d_model=64, d_state=32, headdim=16, ngroups=2, rope_fraction=1.0, is_outproj_norm=True),
  "mimo": dict(d_model=64, d_state=32, headdim=16, is_mimo=True, mimo_rank=2),
}
out = {}
for name, kw in cases.items():
    mod = m3.Mamba3(**kw)
    out[name] = {"kwargs": kw, "params": {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in mod.state_dict().items()}}
with open(sys.argv[2], "w") as f:
    json.dump(out, f, indent=1)
