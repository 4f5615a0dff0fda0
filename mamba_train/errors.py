"""The project's error base class: every "fix your input" error subclasses :class:`MambaTrainError`,
so the command-line entries report any of them as one line (no traceback)."""

from __future__ import annotations


class MambaTrainError(Exception):
    """Bad input (config, data, checkpoint, arguments); the message says what to fix."""

