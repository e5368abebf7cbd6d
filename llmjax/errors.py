"""The exceptions an entry point turns into a one-line message and a non-zero exit.

`UserError` (bad flags, files, configs, checkpoints) is raised at the edge, before any compute; `TrainingDiverged`
when a loss turns NaN/Inf. Every experiment's `main` is `absl_main(body)`, which runs the body through `exit_on_error`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, logging


class UserError(ValueError):
    """A problem the user can fix; the message names the problem and the fix on one line."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


def exit_on_error(body: Callable[[], object]) -> None:
    """Run an entry point's body: a UserError exits with 2, a diverged run with 1, each printing its message."""
    try:
        body()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def absl_main(body: Callable[[], object]) -> Callable[[list[str]], None]:
    """An experiment's `main` for `absl.app.run`: refuse stray positional arguments, keep absl's INFO logs (orbax logs
    every checkpoint step) off the console, and run `body` through `exit_on_error`."""

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}: flags look like --name=value")
        logging.set_verbosity(logging.WARNING)
        exit_on_error(body)

    return main
