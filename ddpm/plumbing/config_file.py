"""Config files: a script's flags read from, and a training run's resolved flags written to, TOML.

Keys are the flag names without their dashes (`batch-size = 256`, `channel-mult = [1, 2, 2]`,
`hflip = false`); the values go through the same argparse types and choices as on the command line,
so an unknown key or a wrong type is one error line naming the file and the key. Flags given on the
command line win over the file (the file's values become the parser's defaults), as EDM's
training_options.json does for its runs. A training run writes its resolved flags to `config.toml`
beside last.pt, so that `python train_MNIST.py --config checkpoints/config.toml` repeats it.

Example:
    python train_MNIST.py --config my_run.toml --epochs 5
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import atomic_write

CONFIG_FLAG = "--config"
CONFIG_NAME = "config.toml"
SKIPPED_DESTS = ("help", "config")  # flags that are not settings of a run


class ConfigFileError(UserError):
    """A config file that cannot be read, does not parse, or names an unknown flag or a bad value."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        CONFIG_FLAG,
        metavar="FILE.toml",
        default=None,
        help="read flags from a TOML file (keys are flag names without dashes); flags given here win",
    )


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file's table, or one error line when it is missing or does not parse."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigFileError(f"cannot read config file {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(f"config file {path} is not valid TOML: {error}") from None


def actions_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each settable flag under its names without dashes (`batch-size`) and as its dest (`batch_size`)."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public list of a parser's actions
        if action.dest in SKIPPED_DESTS or not action.option_strings:
            continue
        keys[action.dest] = action
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith("--no-"):
                keys[option[2:]] = action
    return keys


def flag_value(action: argparse.Action, value: Any, key: str, path: str | Path) -> Any:
    """A TOML value as the flag's parsed value, through the flag's own type and choices."""
    wrong = f"config file {path}: {key} = {value!r}"
    if action.nargs == 0:  # a switch: --flag / --no-flag
        if not isinstance(value, bool):
            raise ConfigFileError(f"{wrong}: expected true or false")
        return value
    if isinstance(value, bool | dict):
        raise ConfigFileError(f"{wrong}: expected a number, text or list")
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)  # as typed on the command line
    try:
        parsed = action.type(text) if callable(action.type) else text
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        raise ConfigFileError(f"{wrong}: {error}") from None
    if action.choices is not None and parsed not in action.choices:
        raise ConfigFileError(f"{wrong}: choose from {', '.join(map(str, action.choices))}")
    return parsed


def config_defaults(parser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """The file's values by dest, checked against the parser's flags, for `parser.set_defaults`."""
    keys = actions_by_key(parser)
    defaults = {}
    for key, value in read_toml(path).items():
        if key not in keys:
            raise ConfigFileError(f"config file {path}: unknown key {key!r} (see {parser.prog} --help)")
        defaults[keys[key].dest] = flag_value(keys[key], value, key, path)
    return defaults


def toml_value(value: Any) -> str:
    """A plain value as TOML: booleans, numbers, text (JSON's string escapes are TOML's) and lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def write_config(flags: dict[str, Any], path: str | Path, header: str) -> None:
    """Write {flag name: value} as a TOML file (atomically); None values are left out (the flag's
    default is None), as TOML has no null."""
    lines = [f"# {header}"]
    lines += [f"{key} = {toml_value(value)}" for key, value in flags.items() if value is not None]
    with atomic_write(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n")
