"""One-line notices to the user (which dtype a checkpoint loaded in, a measurement being made), on stderr.

$MISTRAL_TUTORIAL_QUIET=1 silences them: the notebook runs of `tasks.py setup` and `test` set it, so that a first run
on a new machine (which measures) prints what every later run prints.
"""

from __future__ import annotations

import os
import sys

QUIET_ENV = "MISTRAL_TUTORIAL_QUIET"


def notice(message: str) -> None:
    """Print `mistral_tutorial: <message>` on stderr, unless $MISTRAL_TUTORIAL_QUIET is set (to anything but 0)."""
    if os.environ.get(QUIET_ENV, "") in ("", "0"):
        print(f"mistral_tutorial: {message}", file=sys.stderr, flush=True)
