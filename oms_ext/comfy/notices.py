"""Telling the ComfyUI user what OMS did: a toast in the page (the ``web/comfy`` extension
listens for :data:`EVENT`) when ComfyUI's server runs, always a line in the log."""

from __future__ import annotations

import logging

#: The websocket event the page extension turns into a toast.
EVENT = "one_more_step.notice"

log = logging.getLogger("one_more_step")


def notify(text: str) -> None:
    """Log ``text`` as a warning and send it to the page when ComfyUI's server runs."""
    log.warning(text)
    try:
        from server import PromptServer

        server = PromptServer.instance
    except (ImportError, AttributeError):  # no server: a script or a test
        return
    server.send_sync(EVENT, {"text": text, "severity": "warn"})
