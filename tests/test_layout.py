"""The layout a newcomer reads: the design card's files on top, the library in ddpm/, the module map true.

docs/modules.md lists every module in reading order as a table row whose first cell is the module's
path in backticks; these tests fail when a file appears, disappears or grows past one job's size.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE_MAP = REPO / "docs" / "modules.md"
DESIGN_CARD_FILES = {"model.py", "diffusion.py", "train_MNIST.py", "eval_MNIST.py", "vizu_MNIST.py"}
PACKAGE = "ddpm"
MAX_PACKAGE_FILE_LINES = 400
MAPPED_ROW = re.compile(r"^\|\s*`([^`]+\.py)`\s*\|", re.MULTILINE)


def library_modules() -> set[str]:
    """Every Python file of the design card and the package, as a path relative to the repo."""
    package_files = {path.relative_to(REPO).as_posix() for path in (REPO / PACKAGE).rglob("*.py")}
    return DESIGN_CARD_FILES | package_files


def test_top_level_holds_only_the_design_cards_code():
    assert {path.name for path in REPO.glob("*.py")} == DESIGN_CARD_FILES


def test_no_package_file_is_over_400_lines():
    long_files = {
        path.relative_to(REPO).as_posix(): len(path.read_text().splitlines())
        for path in (REPO / PACKAGE).rglob("*.py")
        if len(path.read_text().splitlines()) > MAX_PACKAGE_FILE_LINES
    }
    assert long_files == {}


def test_every_module_opens_with_a_docstring():
    missing = [name for name in sorted(library_modules()) if not (REPO / name).read_text().startswith('"""')]
    assert missing == []


def test_module_map_lists_every_module_once_and_nothing_else():
    mapped = MAPPED_ROW.findall(MODULE_MAP.read_text())
    assert len(mapped) == len(set(mapped)), "a module is listed twice"
    assert set(mapped) == library_modules()


def test_module_map_starts_with_the_design_cards_files():
    mapped = MAPPED_ROW.findall(MODULE_MAP.read_text())
    assert set(mapped[: len(DESIGN_CARD_FILES)]) == DESIGN_CARD_FILES
