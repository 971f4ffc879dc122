"""The trainer's one error type for problems the user can fix."""

from __future__ import annotations

from oms_ext.errors import OMSUserError


class TrainError(OMSUserError):
    """Bad training input (data, checkpoint, flags, disk): ``python -m oms_ext.train`` prints
    the message on one line, without a traceback, and exits with status 2."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message, reason=reason or message)
