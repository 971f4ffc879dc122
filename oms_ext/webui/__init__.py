"""AUTOMATIC1111 / Forge glue of One More Step: duck-typed adapters and orchestration, no
WebUI imports.

The WebUI script (``scripts/one_more_step.py``) passes the WebUI's objects (``p``,
``shared.opts``, ``sd_model``, ...) into :mod:`oms_ext.webui.a1111` or
:mod:`oms_ext.webui.forge`, which turn them into plain values for the host-neutral
:mod:`oms_ext.runtime` (:func:`oms_ext.runtime.runner.run_oms`). Nothing here imports
``modules``, ``backend`` or ``gradio`` at import time.
"""
