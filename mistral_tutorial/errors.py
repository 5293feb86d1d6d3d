"""The library's own errors: what a user did or gave that cannot work, said with the fix."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded exactly: a missing, unexpected or mis-shaped tensor, a field the model does not
    implement, a truncated or corrupt file, or an unknown format. The message names the file and the key."""
