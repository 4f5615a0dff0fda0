"""``key=value`` command lines for every ``python -m mamba_train.*`` entry (prepare, eval, export).

Arguments are parsed with OmegaConf's dotlist grammar (``OmegaConf.from_dotlist``: ``n=3`` is an
int, ``tasks=[a,b]`` a list, ``x=null`` or ``x=none`` None) and checked against the entry's dataclass, so a
typo or a wrong type is one :class:`UsageError` line naming the argument. Integer fields also
take scientific notation (``tokens_per_shard=1e6``).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any, TypeVar

from mamba_train.errors import MambaTrainError

T = TypeVar("T")
HELP_FLAGS = ("-h", "--help", "help")


class UsageError(MambaTrainError):
    """A command-line argument that is missing, unknown or of the wrong type."""


def wants_help(argv: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def _int_field(tp: Any) -> bool:
    args = typing.get_args(tp)
    return tp is int or tp == "int" or (int in args and float not in args)


def _integral(value: Any) -> Any:
    """``1e6`` / ``"1e6"`` / ``2.0`` -> int for integer fields; anything else unchanged."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return value
    return int(f) if f.is_integer() and not isinstance(value, bool) else value


def parse_key_values(argv: list[str], schema: type[T], required: tuple[str, ...] = (),
                     usage: str = "") -> T:
    """``["a=1", "b=x"]`` -> an instance of the dataclass ``schema``; :class:`UsageError` on bad input."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    suffix = f" ({usage})" if usage else ""  # one line: the error, then how to call
    items, seen = [], set()
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"argument {item!r} is not key=value{suffix}")
        key = key.lstrip("-").replace("-", "_")
        if key in seen:
            raise UsageError(f"argument {key!r} given twice{suffix}")
        seen.add(key)
        items.append(f"{key}={'null' if value.lower() == 'none' else value}")
    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(items))
    except OmegaConfBaseException as e:
        raise UsageError(f"{str(e).splitlines()[0]}{suffix}") from None
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    for key, value in given.items():
        if key not in names:
            raise UsageError(f"unknown argument {key!r}; expected one of {', '.join(names)}{suffix}")
        if _int_field(hints.get(key)) and value is not None:
            given[key] = _integral(value)
    missing = [k for k in required if given.get(k) in (None, "")]
    if missing:
        raise UsageError(f"missing required argument(s): {', '.join(k + '=' for k in missing)}{suffix}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), given)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # a value of the wrong type: name the argument
        key = getattr(e, "full_key", None)
        raise UsageError(f"{f'argument {key}: ' if key else ''}{str(e).splitlines()[0]}{suffix}") from None
