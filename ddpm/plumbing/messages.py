"""What the user is told: one-line errors (`UserError`) and one-line notes.

Every script runs its `main` through `cli.run_cli`, which prints a `UserError` as one `error:` line
on stderr and exits with status 2, never a traceback. Library modules raise subclasses of it
(`checkpointing.CheckpointError`, `checks.DataUnavailableError`, ...) and tell the user about
choices made for them (a fallback, a default file) with `note`, one line on stderr.

Example:
    raise UserError("--steps must be in [1, 1000], got 0")
    note("no checkpoint in checkpoints/: using the demo model weights/demo_mnist5k.pt")
"""

from __future__ import annotations

import sys

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A problem the user can fix (a bad flag, missing data, a corrupt file), reported in one line."""


def note(message: str) -> None:
    """One line on stderr, `note: <message>`."""
    print(f"note: {message}", file=sys.stderr, flush=True)
