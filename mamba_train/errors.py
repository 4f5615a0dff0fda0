"""The project's error base class: every "fix your input" error subclasses :class:`MambaTrainError`,
so the command-line entries report any of them as one line (no traceback)."""

from __future__ import annotations

import re


class MambaTrainError(Exception):
    """Bad input (config, data, checkpoint, arguments); the message says what to fix."""



class UnknownSettingError(MambaTrainError, TypeError):
    """A config key that the object it configures does not take."""


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
        # a key the target does not take (a typo added with +key=...): name it in one line
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e.__cause__ or ""))
        if isinstance(e.__cause__, TypeError) and unknown:
            where = re.search(r"full_key: (\S+)", str(e))
            key = f"{where.group(1)}.{unknown.group(1)}" if where else unknown.group(1)
            raise UnknownSettingError(f"{key} is not a setting of {cfg.get('_target_')}; check its "
                                      "spelling or remove it") from None
        raise
