"""ComfyUI entry point of One More Step (ComfyUI loads this file by path from custom_nodes/).

ComfyUI does not put the node's folder on ``sys.path``; it is appended here so the package
``oms_ext`` imports as it does everywhere else. AUTOMATIC1111 and Forge never import this
file (they run ``scripts/`` and ``install.py``). Outside ComfyUI (pytest imports a root
package's ``__init__.py`` while collecting ``tests/``) there are no nodes to export.
"""

import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
#: The page extension (toasts for what OMS skipped), served by ComfyUI.
WEB_DIRECTORY = "./web/comfy"

try:
    import folder_paths
except ImportError:
    folder_paths = None

if folder_paths is not None:
    _HERE = os.path.dirname(os.path.abspath(__file__))
    if _HERE not in sys.path:
        sys.path.append(_HERE)

    from oms_ext.comfy import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from oms_ext.comfy.models import register_folder

    register_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
