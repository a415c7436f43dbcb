"""Optional dependencies: each is an extra of the package (``pip install 'peftguard[ray]'``).

The core commands never import them at module level: a feature that needs one imports it through
:func:`require`, so a missing package stops that feature with one line naming the extra to install
instead of an ImportError traceback (and nothing else breaks). ``pyproject.toml``'s
``[project.optional-dependencies]`` lists the same extras; a test keeps the two in step.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from peftguard.errors import PeftguardError

# importable module -> the extra that installs it
EXTRAS: dict[str, str] = {"ray": "ray", "matplotlib": "plots", "gguf": "gguf", "onnx": "onnx", "onnxruntime": "onnx"}


def install_hint(module: str) -> str:
    return f"pip install 'peftguard[{EXTRAS[module]}]'"


def _import(module: str) -> ModuleType:
    """Import ``module``; a bare folder of that name (a namespace package, such as Ray's /tmp/ray
    seen from the current folder) is not the package, so it counts as missing."""
    imported = importlib.import_module(module)
    if getattr(imported, "__file__", None) is None:
        raise ImportError(f"'{module}' is a folder without the package ({list(imported.__path__)})")
    return imported


def available(module: str) -> bool:
    """Whether the optional ``module`` can be imported (it is imported, so a broken install reads as missing)."""
    try:
        _import(module)
    except ImportError:
        return False
    return True


def require(module: str, feature: str) -> ModuleType:
    """Import the optional ``module`` that ``feature`` needs, or stop with the extra to install."""
    try:
        return _import(module)
    except ImportError:
        raise PeftguardError(f"{feature} needs the optional package '{module}': {install_hint(module)}") from None
