"""WebUI glue of One More Step: duck-typed adapters and orchestration, no WebUI imports.

The WebUI script (``scripts/one_more_step.py``) passes the WebUI's objects (``p``,
``shared.opts``, ``sd_model``, ...) into :mod:`oms_ext.webui.a1111` or
:mod:`oms_ext.webui.forge`, which turn them into plain values for
:func:`oms_ext.webui.runner.run_oms`. Nothing here imports ``modules``, ``backend`` or
``gradio`` at import time.
"""

from oms_ext.webui.args import FIELDS, OMSArgs, OMSArgsError, args_from_infotext
from oms_ext.webui.cache import MODEL_CACHE, CacheKey, ModelCache
from oms_ext.webui.download import DownloadError, download_files
from oms_ext.webui.provider import ModelRequest, Settings, provide_model
from oms_ext.webui.registry import KNOWN_MODULES, module_choices, resolve_module, scan_modules
from oms_ext.webui.runner import BatchInputs, Outcome, run_oms

__all__ = [
    "FIELDS",
    "KNOWN_MODULES",
    "MODEL_CACHE",
    "BatchInputs",
    "CacheKey",
    "DownloadError",
    "ModelCache",
    "ModelRequest",
    "OMSArgs",
    "OMSArgsError",
    "Outcome",
    "Settings",
    "args_from_infotext",
    "download_files",
    "module_choices",
    "provide_model",
    "resolve_module",
    "run_oms",
    "scan_modules",
]
