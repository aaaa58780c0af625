"""compactedit: instruction-based image editing on the VIBE weights."""

__version__ = "0.1.0"
