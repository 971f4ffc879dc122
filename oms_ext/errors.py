"""The one error base of One More Step for problems the user can fix.

Every such error carries two texts. ``str(error)`` is the full message for the console: which
file, which folder, what was expected. ``error.reason`` is one short sentence that says what
is wrong and what to do, with no local path, user name or traceback in it: the WebUI writes it
into the image's infotext ("OMS skipped: <reason>"), and infotext travels with shared PNGs.
"""

from __future__ import annotations


class OMSUserError(Exception):
    """A problem on the user's side (missing or broken files, an unsupported checkpoint, no
    network, a full disk): the generation goes on without OMS and says ``reason``."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
