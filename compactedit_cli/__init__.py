"""compactedit: instruction-based image editing on the VIBE weights.

``from compactedit_cli import Editor, EditPipeline`` works; both load lazily, so importing the package (as every
command does before checking its arguments) costs no torch import.
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["EditOptions", "EditPipeline", "EditRecord", "Editor", "ModelOptions", "OutputOptions", "__version__"]

if TYPE_CHECKING:
    from .editor import Editor
    from .engine.pipeline import EditPipeline
    from .options import EditOptions, ModelOptions, OutputOptions
    from .record import EditRecord

_LAZY = {
    "Editor": "editor",
    "EditPipeline": "engine.pipeline",
    "EditOptions": "options",
    "ModelOptions": "options",
    "OutputOptions": "options",
    "EditRecord": "record",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
