"""Config files: a script's flags read from, and a training run's resolved flags written to, TOML.

Keys are the flag names without their dashes (`batch-size = 256`, `channel-mult = [1, 2, 2]`,
`hflip = false`, `T = 1000`); the values go through the same argparse types and choices as on the
command line, so an unknown key, a wrong type or a file that does not parse is one error line naming
the file and the key. The file's values become the parser's defaults (cli.parse_flags): a preset's
defaults < the file < the flags given on the command line, as EDM's training_options.json does for
its runs. A training run writes its resolved flags to `config.toml` beside last.pt
(presets.write_run_config), so that `python train_MNIST.py --config checkpoints/config.toml` repeats
it. TOML has no null: a flag whose value is None (its default: "it depends") is left out.

Example:
    python train_MNIST.py --config my_run.toml --epochs 5
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from ddpm.plumbing.messages import UserError
from ddpm.plumbing.output_files import atomic_write

CONFIG_FLAG = "--config"
CONFIG_NAME = "config.toml"
SKIPPED_DESTS = ("help", "config")  # flags that are not settings of a run
TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


class ConfigFileError(UserError):
    """A config file that cannot be read, does not parse, or names an unknown flag or a bad value."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """--config FILE.toml (once per parser)."""
    if any(CONFIG_FLAG in action.option_strings for action in parser._actions):
        return
    parser.add_argument(
        CONFIG_FLAG,
        metavar="FILE.toml",
        default=None,
        help="read flags from a TOML file, keys named as the flags (batch-size = 256, channel-mult = [1, 2]);"
        " flags given here win over it, and it over a preset (default: none)",
    )


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML file's table, or one error line when it is missing or does not parse."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigFileError(f"cannot read config file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"config file {path} is not UTF-8 text") from None
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
    """A TOML value as the flag's parsed value, through the flag's own type and choices: a switch takes
    true or false, a text flag a string, any other flag a number, a string or a list (as typed on the
    command line: [1, 2, 2] is 1,2,2)."""
    wrong = f"config file {path}: {key} = {value!r}"
    if action.nargs == 0:  # a switch: --flag / --no-flag
        if not isinstance(value, bool):
            raise ConfigFileError(f"{wrong}: expected true or false")
        return value
    if action.type is None and not isinstance(value, str):
        raise ConfigFileError(f'{wrong}: expected a string in quotes, e.g. {key} = "{value}"')
    scalars = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str | int | float) and not isinstance(item, bool) for item in scalars):
        raise ConfigFileError(f"{wrong}: expected a number, a string or a list of them")
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
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
    defaults: dict[str, Any] = {}
    for key, value in read_toml(path).items():
        if key not in keys:
            raise ConfigFileError(f"config file {path}: unknown key {key!r} (see {parser.prog} --help)")
        dest = keys[key].dest
        if dest in defaults:
            raise ConfigFileError(f"config file {path}: {key} is set twice (as {dest} and its flag name)")
        defaults[dest] = flag_value(keys[key], value, key, path)
    return defaults


def toml_value(value: Any) -> str:
    """A plain value as TOML: booleans, numbers, strings and lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, int | float):
        return repr(value)  # TOML reads Python's float reprs, inf and nan included
    return '"' + "".join(toml_character(character) for character in str(value)) + '"'


def toml_character(character: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and control characters escaped."""
    if character in TOML_ESCAPES:
        return TOML_ESCAPES[character]
    if ord(character) < 0x20 or ord(character) == 0x7F:
        return f"\\u{ord(character):04x}"
    return character


def write_config(sections: dict[str, dict[str, Any]], path: str | Path, header: str) -> None:
    """Write {section title: {flag name: value}} as a flat TOML file (atomically): the header and each
    title as comments; None values are left out, as TOML has no null."""
    lines = [f"# {line}" for line in header.splitlines()]
    for title, flags in sections.items():
        lines += ["", f"# {title}"]
        lines += [f"{key} = {toml_value(value)}" for key, value in flags.items() if value is not None]
    with atomic_write(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
