"""One More Step (OMS, arXiv 2311.15744) in plain PyTorch, independent of any WebUI.

The package never imports the WebUIs' ``modules`` or ``backend`` packages; the WebUI script
turns their objects into plain values and calls the functions exported here.
"""

__version__ = "0.1.0"
