"""Train, honestly evaluate, export to ONNX and serve small image classifiers.

The flow, one package each: data ─► train ─► run (folder) ─► evaluate ─► export ─► serving.
"""

from toolkit.version import __version__

__all__ = ["__version__"]
