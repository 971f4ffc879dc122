"""One More Step for ComfyUI: the nodes, over the same core as the WebUI extension.

Only ComfyUI code lives here; ComfyUI's modules (``comfy``, ``folder_paths``, ``server``) are
imported inside functions, when ComfyUI runs them. The repository's root ``__init__.py``
exports :data:`NODE_CLASS_MAPPINGS` and :data:`NODE_DISPLAY_NAME_MAPPINGS` from here.
"""

from oms_ext.comfy.nodes import NODE_CLASS_MAPPINGS as _NODES
from oms_ext.comfy.nodes import NODE_DISPLAY_NAME_MAPPINGS
from oms_ext.comfy.record import record_nodes

NODE_CLASS_MAPPINGS = {**_NODES, **record_nodes()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
