"""Command-line plumbing shared by the scripts: one-line errors, argparse types, presets, config files.

Every script wraps its `main` in `run_cli`, so a `UserError` (bad flag, missing data, corrupt
checkpoint, unwritable folder, a config file that does not parse) prints one line to stderr and exits
with status 2, never a traceback. Every script parses its flags with `parse_flags`: the defaults of a
preset, then those of a `--config FILE.toml` (config_file.py), then the command line.

Example:
    args = parse_flags(parser, ["--config", "run.toml", "--epochs", "5"])
    if __name__ == "__main__":
        run_cli(main)
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any, NoReturn, cast

from ddpm.plumbing.config_file import add_config_flag, config_defaults
from ddpm.plumbing.messages import USER_ERROR_EXIT_CODE, UserError

SEED_LIMIT = 2**32 - 1  # NumPy's legacy seeding takes [0, 2**32 - 1]
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max: the largest flag value a tensor takes
NONE_WORD = "none"  # what a flag of positive_float_or_none takes to mean None


def run_cli(main: Callable[[], None]) -> None:
    """Run main(); turn a UserError into `error: <message>` on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends each flag's default to its help (unless the help already says what the default is) and
    keeps the description's and epilog's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UserErrors (run_cli prints one line, not the usage block)
    and whose --help shows every default."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def parse_flags(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    presets: dict[str, dict[str, Any]] | None = None,
    default_preset: str | None = None,
) -> argparse.Namespace:
    """parser.parse_args(argv) with --config FILE.toml (added to the parser here) and, for a parser
    with presets, --preset NAME: the defaults are the preset's (named in argv, else in the file,
    else `default_preset`), replaced by the file's values, and flags given in argv win over both.
    `--config FILE --help` and `--preset NAME --help` show the defaults they make."""
    add_config_flag(parser)
    chooser = OneLineErrorParser(prog=parser.prog, add_help=False)
    add_config_flag(chooser)
    if presets is not None:
        chooser.add_argument("--preset", choices=tuple(presets), default=None)
    chosen, _ = chooser.parse_known_args(argv)
    from_file = config_defaults(parser, chosen.config) if chosen.config is not None else {}
    if presets is not None:
        preset = cast(str, chosen.preset or from_file.get("preset") or default_preset)
        parser.set_defaults(**{key: as_typed(value) for key, value in presets[preset].items()})
    parser.set_defaults(**from_file)
    return parser.parse_args(argv)


def as_typed(value: Any) -> Any:
    """A tuple default as the text a flag's type parses ((1, 2, 2) -> '1,2,2'); others as they are."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def int_between(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in [low, high] (argparse names a non-integer an invalid int value)."""

    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text}")
        return value

    parse.__name__ = "int"
    return parse


def seed_number(text: str) -> int:
    """argparse type: a seed NumPy accepts, an integer in [0, 2**32 - 1]."""
    return int_between(0, SEED_LIMIT)(text)


def positive_float(text: str) -> float:
    """argparse type: a float > 0 that float32 tensors hold (an LR of 1e308 overflows in AdamW)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return at_most_float32_max(value, text)


def non_negative_float(text: str) -> float:
    """argparse type: a float >= 0 that float32 tensors hold."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return at_most_float32_max(value, text)


def at_most_float32_max(value: float, text: str) -> float:
    if value > FLOAT32_MAX:  # inf too
        raise argparse.ArgumentTypeError(f"must be at most {FLOAT32_MAX:.4g} (float32's largest), got {text}")
    return value


def positive_float_or_none(text: str) -> float | None:
    """argparse type: a float > 0, or "none" (off: a preset's value switched off on the command line)."""
    return None if text.lower() == NONE_WORD else positive_float(text)


def fraction(text: str) -> float:
    """argparse type: a float in [0, 1)."""
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def float_strictly_between(low: float, high: float) -> Callable[[str], float]:
    """argparse type: a float in the open interval (low, high)."""

    def parse(text: str) -> float:
        value = float(text)
        if not low < value < high:
            raise argparse.ArgumentTypeError(f"must be in ({low:g}, {high:.4g}), got {text}")
        return value

    parse.__name__ = "float"
    return parse


def int_tuple(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers, e.g. '1,2,2' -> (1, 2, 2); '' -> ()."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_int_tuple(text: str) -> tuple[int, ...]:
    """argparse type: one or more comma-separated integers >= 1, e.g. '1,2,2'."""
    values = int_tuple(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def int_tuple_between(low: int, high: int) -> Callable[[str], tuple[int, ...]]:
    """argparse type: one or more comma-separated integers in [low, high], e.g. '1,2,2'."""

    def parse(text: str) -> tuple[int, ...]:
        values = int_tuple(text)
        if not values or not all(low <= value <= high for value in values):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers in [{low}, {high}], got {text!r}"
            )
        return values

    return parse


def float_tuple(text: str) -> tuple[float, ...]:
    """Comma-separated finite floats, e.g. '1,2,4'; () for anything else."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        return ()
    return values if all(math.isfinite(value) for value in values) else ()


def non_negative_float_tuple(text: str) -> tuple[float, ...]:
    """argparse type: one or more comma-separated finite floats >= 0, e.g. '0,1,2,4'."""
    values = float_tuple(text)
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 0, got {text!r}")
    return values
