"""The layout holds: config groups mirror objects, no import cycles, models/ stays at the bottom."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import lightning as L
import pytest
from omegaconf import OmegaConf


ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mamba_train"


def test_every_trainer_key_is_a_lightning_trainer_argument():
    cfg = OmegaConf.load(PKG / "conf" / "trainer" / "default.yaml")
    params = set(inspect.signature(L.Trainer.__init__).parameters)
    keys = set(cfg) - {"_target_"}
    assert keys and keys <= params, sorted(keys - params)


def test_module_settings_have_one_default_the_config():
    """One default per setting: every module group key is a constructor argument without a
    default in code (the group's YAML holds the only one)."""
    from mamba_train.training.step.module import MambaLMModule

    cfg = OmegaConf.load(PKG / "conf" / "module" / "default.yaml")
    sig = inspect.signature(MambaLMModule.__init__).parameters
    keys = set(cfg) - {"_target_", "_convert_"}
    assert keys and keys <= set(sig), sorted(keys - set(sig))
    assert all(sig[k].default is inspect.Parameter.empty for k in keys), \
        sorted(k for k in keys if sig[k].default is not inspect.Parameter.empty)


def test_every_kernel_choice_is_in_the_kernels_block():
    """``kernels.*`` are apply_kernels' arguments, without defaults in code; no kernel choice is
    a model-config key (a saved model would then depend on the kernels that trained it)."""
    from mamba_train.models.kernels import apply_kernels
    from mamba_train.models.mixer_tables import KERNEL_KEYS, MIXER_TABLES

    cfg = OmegaConf.load(PKG / "conf" / "config.yaml")
    sig = dict(inspect.signature(apply_kernels).parameters)
    sig.pop("model")
    assert set(cfg.kernels) == set(sig) and "ssd" in sig
    assert all(p.default is inspect.Parameter.empty for p in sig.values())
    assert all(not set(KERNEL_KEYS) & accepted for accepted, _ in MIXER_TABLES.values())
    assert set(KERNEL_KEYS.values()) <= {f"kernels.{k}" for k in cfg.kernels}


def test_train_group_holds_only_run_level_quantities():
    cfg = OmegaConf.load(PKG / "conf" / "config.yaml")
    assert set(cfg.train) == {"global_batch_tokens", "total_tokens", "val_every_n_steps",
                              "checkpoint_every_n_steps", "keep_last_k_checkpoints",
                              "allow_low_precision_params"}


def test_callbacks_get_tokens_per_step_from_the_config(make_config):
    from hydra.utils import instantiate

    cfg = make_config("train.global_batch_tokens=4096")
    for name in ("throughput", "run_summary"):
        assert instantiate(cfg.callbacks[name]).tokens_per_step == 4096


# ------------------------------------------------------------------------------ imports
def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def _import_graph(main_guards: bool = False) -> dict[str, set[str]]:
    """mamba_train module -> the mamba_train modules it imports (anywhere in the file; under
    ``if __name__ == "__main__"`` only with ``main_guards``: a module run as a command imports
    there what importing the module does not)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text())
        if not main_guards:
            tree.body = [n for n in tree.body if not _is_main_guard(n)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycle_among_mamba_train_modules():
    graph = _import_graph()
    assert len(graph) > 30 and graph["mamba_train.formats.load"]  # the parser found the imports
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_models_import_nothing_above_them():
    above = ("mamba_train.training", "mamba_train.evaluation", "mamba_train.export",
             "mamba_train.data", "mamba_train.formats", "mamba_train.train", "mamba_train.cli")
    graph = _import_graph()
    bad = {m: sorted(d for d in deps if d.startswith(above))
           for m, deps in graph.items() if m.startswith("mamba_train.models")}
    assert not {m: d for m, d in bad.items() if d}


def test_the_step_imports_nothing_of_the_run():
    """training/step (one optimizer step) sits below training/run (the run around the steps)."""
    graph = _import_graph()
    step = [m for m in graph if m.startswith("mamba_train.training.step.")]
    assert "mamba_train.training.step.train_step" in step and any(
        d.startswith("mamba_train.training.step.") for m in graph
        if m.startswith("mamba_train.training.run.") for d in graph[m])  # the run uses the step
    bad = {m: sorted(d for d in graph[m] if d.startswith("mamba_train.training.run"))
           for m in step}
    assert not {m: d for m, d in bad.items() if d}


def test_entry_points_live_in_cli_and_every_documented_python_m_runs_one():
    """Console scripts are ``mamba_train.cli.<command>:main``; each ``python -m mamba_train...``
    in the README and docs names a module that hands over to one of them."""
    import importlib
    import re
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    commands = {}
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module.startswith("mamba_train.cli.") and func == "main", (name, target)
        commands[module] = getattr(importlib.import_module(module), func)
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    documented = {m for t in texts for m in re.findall(r"python -m (mamba_train[\w.]*)", t.read_text())}
    assert {"mamba_train", "mamba_train.eval", "mamba_train.export"} <= documented
    as_run = _import_graph(main_guards=True)
    for module in documented:
        name = module + ".__main__" if (PKG.parent / module.replace(".", "/")).is_dir() else module
        tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        assert any(_is_main_guard(n) for n in tree.body), name
        assert as_run[name] & set(commands), (module, sorted(as_run[name]))
    # the cli package is the top: nothing below it imports it
    graph = _import_graph()
    users = {m for m, deps in graph.items() if any(d.startswith("mamba_train.cli") for d in deps)}
    assert all(m.startswith("mamba_train.cli") or m.count(".") == 1 for m in users), sorted(users)


def test_every_user_error_subclasses_the_base():
    from mamba_train.errors import MambaTrainError

    graph = _import_graph()
    names = []
    for module in graph:
        path = PKG.parent / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = PKG.parent / module.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                names.append((module, node.name))
    assert len(names) >= 10
    import importlib
    for module, cls in names:
        assert issubclass(getattr(importlib.import_module(module), cls), MambaTrainError), (module, cls)
