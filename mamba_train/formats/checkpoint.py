"""The mamba_train training checkpoint (a Lightning ``.ckpt``): every key we add to it, and the
one safe way to open it.

Lightning writes ``state_dict`` (our model under ``model.``), optimizer and loop states; the
LightningModule adds the keys defined here (``training/step/module.py`` imports them). Nothing else
in the project names a checkpoint key.

Checkpoints are shared and downloaded, and unpickling is code execution: a ``.ckpt`` whose pickle
names ``os.system`` (or any other callable) runs it when unpickled unrestricted.
Every read here goes through :func:`load_checkpoint_dict`, which uses ``weights_only=True`` (tensors,
containers and plain Python values only) and allows in addition exactly the numpy array pieces
that RNG states saved with ``np.random.get_state()`` need. A file that needs anything else is
refused with one line naming the file and the object it asked for; it is never executed.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamba_train.errors import MambaTrainError

# Lightning stores the LightningModule's state dict; MambaLMModule holds the model as ``model``.
CKPT_MODEL_PREFIX = "model."
# MambaLMConfig.to_dict() of the trained model: the checkpoint describes its own architecture
CKPT_CONFIG_KEY = "mamba_train_model_config"
# the resolved Hydra config of the run, as YAML text (tokenizer, seq_len, ...)
RUN_CONFIG_KEY = "mamba_train_run_config"
# python / numpy / torch / cuda RNG states, restored on resume (plain lists, no numpy arrays)
RNG_KEY = "mamba_train_rng"


class CheckpointError(MambaTrainError, ValueError):
    """A path that is not a loadable model; the message says what was expected."""


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs, under the names numpy 1.x and 2.x pickle it with.

    ``_reconstruct`` builds an empty array of a class the unpickler resolves -- itself limited
    to this list -- and the dtype classes only describe element types, so nothing here can call
    arbitrary code (PyTorch's ``torch.load`` docs allowlist the same pieces for numpy arrays)."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    dtype_classes = [c for c in vars(getattr(np, "dtypes", np)).values()
                     if isinstance(c, type) and issubclass(c, np.dtype)]
    return [(reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"),
            np.ndarray, np.dtype, *dtype_classes]


def _refused_global(error: BaseException) -> str:
    found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(error))
    return next(g for g in found.groups() if g) if found else "an object that is not data"


def refusal(path: str | Path, error: pickle.UnpicklingError) -> CheckpointError:
    """The one-line error for a file whose pickle ``torch.load(weights_only=True)`` refused."""
    return CheckpointError(
        f"{path}: refused to load: its pickle asks for {_refused_global(error)}, which a "
        "mamba_train checkpoint never contains (tensors and plain data only); unpickling it "
        "could run code from the file. Use a checkpoint from a source you trust")


def load_checkpoint_dict(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """``torch.load`` of a ``.ckpt`` that can never run code from the file.

    Raises :class:`CheckpointError` (one line, naming the file) when the file asks to unpickle
    anything beyond tensors, plain data and numpy arrays, and when it is unreadable."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise refusal(path, e) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: cannot read it ({first[:200]}): the file is truncated, "
                              "corrupt or not a PyTorch checkpoint") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it holds a "
                              f"{type(ckpt).__name__}, not a dict)")
    return ckpt


def read_lightning_checkpoint(path: str | Path):
    """``(MambaLMConfig, state dict in mamba_ssm key names)`` of a mamba_train ``.ckpt``."""
    from mamba_train.models.config import MambaLMConfig

    path = Path(path)
    ckpt = load_checkpoint_dict(path)
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict' key)")
    if CKPT_CONFIG_KEY not in ckpt:
        raise CheckpointError(
            f"{path} was not written by mamba_train (no '{CKPT_CONFIG_KEY}' entry), so the model "
            "config is unknown"
        )
    config = MambaLMConfig.from_dict(ckpt[CKPT_CONFIG_KEY])
    state = {k[len(CKPT_MODEL_PREFIX):]: v for k, v in ckpt["state_dict"].items()
             if k.startswith(CKPT_MODEL_PREFIX)}
    return config, state


def run_config_of(path: str | Path) -> dict[str, Any] | None:
    """The resolved training config stored in a mamba_train ``.ckpt`` (None for other sources
    and for checkpoints written without one)."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".ckpt"):
        return None
    import yaml

    text = load_checkpoint_dict(path, mmap=True).get(RUN_CONFIG_KEY)
    return yaml.safe_load(text) if text else None


def optimizer_state_in_group_order(state: dict[str, Any], optimizer,
                                   model_parameters) -> dict[str, Any]:
    """An optimizer state dict numbered as torch numbers it: parameter ``i`` is the ``i``-th of
    the optimizer's groups, in order (what one process, DDP and ``strategy=fsdp2`` write).

    Lightning's FSDP1 full checkpoints number by position in ``model.parameters()`` instead
    (``FSDP.rekey_optim_state_dict(..., PARAM_ID, model)``) and list those numbers sorted in each
    group, so torch's ``load_state_dict`` would pair states with the wrong parameters (our groups
    are sorted by name). Such a state is recognised by its groups not counting 0, 1, 2, ... in
    order, and renumbered through ``model_parameters`` (in module order) and ``optimizer``."""
    groups = state["param_groups"]
    ids = [i for g in groups for i in g["params"]]
    if ids == list(range(len(ids))):
        return state
    position = {id(p): n for n, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    new = {i: position[id(p)] for i, p in enumerate(model_parameters)}
    return {**state, "state": {new[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": sorted(new[i] for i in g["params"])} for g in groups]}
