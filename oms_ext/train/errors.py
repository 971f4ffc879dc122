"""The trainer's error type for problems the user can fix, and its Ctrl-C."""

from __future__ import annotations

from pathlib import Path

from oms_ext.errors import OMSUserError


class TrainError(OMSUserError):
    """Bad training input (data, checkpoint, flags, disk): ``python -m oms_ext.train`` prints
    the message on one line, without a traceback, and exits with status 2."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message, reason=reason or message)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during the steps, after the trainer has said so (and where its checkpoint is):
    ``python -m oms_ext.train`` adds nothing and exits with status 130."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted after step {step}")
        self.step, self.checkpoint = step, checkpoint
