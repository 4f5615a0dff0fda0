"""The training command line composed once before Hydra runs the job (``cli/train.py``).

Hydra reports a bad override (a key that does not exist, a group option that does not exist,
an override it cannot parse) as several lines ending in "Set the environment variable
HYDRA_FULL_ERROR=1 ..."; a bad value surfaces only inside the job, after Hydra has written
``.hydra/`` and the log into the run directory, which on a resume is an existing run's record.
:func:`preflight` composes the same config first and reports either as one
:class:`OverrideError` / ``ConfigValueError`` line, before anything is written.
"""

from __future__ import annotations

import difflib
import re

from mamba_train.errors import MambaTrainError

# Hydra flags after which the command line is not one job composed from overrides
NOT_ONE_JOB = ("-m", "--multirun", "-h", "--help", "--hydra-help", "-sc", "--shell-completion",
               "-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "--info",
               "-i", "--cfg", "-c", "--run", "-r", "--experimental-rerun")


class OverrideError(MambaTrainError, ValueError):
    """A command-line override Hydra cannot apply (unknown key or option, bad syntax)."""


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def compose(overrides: list[str]):
    """The config Hydra would compose for ``overrides`` (``hydra.*`` ones left out);
    :class:`OverrideError` naming the override when it cannot."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    own = [o for o in overrides if not _key(o).startswith("hydra.")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="mamba_train.conf", version_base="1.3"):
            return hydra_compose("config", overrides=own)
    except (HydraException, OmegaConfBaseException) as e:
        raise OverrideError(_one_line(e, own)) from None
    finally:
        GlobalHydra.instance().clear()


def _unparsable(overrides: list[str]) -> str | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_overrides([o])
        except OverrideParseException:
            return o
    return None


def _one_line(e: Exception, overrides: list[str]) -> str:
    from hydra.errors import OverrideParseException

    if isinstance(e, OverrideParseException):
        bad = _unparsable(overrides)
        cause = str(e).strip().splitlines()[0]
        if bad is not None:
            return (f"cannot parse the override {bad!r} ({cause}); quote a value with special "
                    f"characters: {_key(bad)}='...'")
        return f"cannot parse the command line: {cause}"
    text = str(e) + ("\n" + str(e.__cause__) if e.__cause__ and str(e.__cause__) not in str(e) else "")
    missing = re.search(r"Key '[^']+' is not in struct\s+full_key: (\S+)", text)
    if missing:  # a typo, mostly: name the close keys before Hydra's "to append" hint
        key = missing.group(1)
        given = next((o for o in overrides if _key(o) == key), f"{key}=...")
        return (f"{key} is not a key of the config.{_did_you_mean(key, overrides)} "
                f"To add a new key anyway: +{given.lstrip('+~')}")
    head: list[str] = []
    options: list[str] = []  # "Available options in 'strategy':" and one line per option
    for line in (ln.strip() for ln in text.splitlines()):
        if not line or line.startswith(("full_key:", "object_type", "reference_type", "See https://")):
            continue
        if options or (head and head[-1].endswith(":")):
            options.append(line)
        else:
            head.append(line)
    message = " ".join(h if h.endswith((".", ":")) else h + "." for h in head)
    return f"{message} {', '.join(options)}" if options else message


def _did_you_mean(full_key: str, overrides: list[str]) -> str:
    """`` Did you mean optim.lr?`` from the keys beside the unknown one (composed without it)."""
    from omegaconf import DictConfig, OmegaConf

    parent, _, leaf = full_key.rpartition(".")
    try:
        cfg = compose([o for o in overrides if _key(o) != full_key])
    except OverrideError:
        return ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return ""
    close = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1)
    return f" Did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""


def preflight(argv: list[str]) -> None:
    """Compose the command line and check it as the job will (values, the run directory, the
    batch arithmetic); raises the one-line error. A sweep or a Hydra flag (``--cfg``,
    ``--help``) is left to Hydra."""
    from mamba_train.config_checks import check_config, check_interpolations

    if any(a in NOT_ONE_JOB or a.startswith("--") for a in argv):
        return
    cfg = compose(argv)
    check_interpolations(cfg)
    check_config(cfg)  # before the heavy import below: a bad value is said at once
    from mamba_train.train import check_before_writing

    try:
        check_before_writing(cfg)
    except OSError:  # a run directory that cannot be looked up (a name too long for the file
        pass  # system): Hydra's RunDirPreflight callback says so in one line next
