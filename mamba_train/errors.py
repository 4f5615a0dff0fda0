"""The project's error base class: every "fix your input" error subclasses :class:`MambaTrainError`,
so the command-line entries report any of them as one line (no traceback)."""

from __future__ import annotations


class MambaTrainError(Exception):
    """Bad input (config, data, checkpoint, arguments); the message says what to fix."""



def instantiate_config(cfg, **kwargs):
    """Hydra's ``instantiate``, but a :class:`MambaTrainError` raised by the target is re-raised as
    itself (one line) instead of inside Hydra's multi-line wrapper."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, MambaTrainError):
            raise e.__cause__ from None
        raise
