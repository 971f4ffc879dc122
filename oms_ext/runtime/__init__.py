"""What every host of One More Step uses: run arguments, module registry, downloads, the model
cache, model loading for a request and the per-batch runner. Plain torch and plain values: no
host (WebUI, ComfyUI) is imported here; each host's package (:mod:`oms_ext.webui`,
:mod:`oms_ext.comfy`) turns its own objects into these values.
"""

from oms_ext.runtime.args import FIELDS, OMSArgs, OMSArgsError, args_from_infotext
from oms_ext.runtime.cache import MODEL_CACHE, CacheKey, ModelCache
from oms_ext.runtime.download import DownloadError, download_files
from oms_ext.runtime.provider import ModelRequest, provide_model
from oms_ext.runtime.registry import KNOWN_MODULES, module_choices, resolve_module, scan_modules
from oms_ext.runtime.runner import BatchInputs, Outcome, run_oms

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
    "args_from_infotext",
    "download_files",
    "module_choices",
    "provide_model",
    "resolve_module",
    "run_oms",
    "scan_modules",
]
