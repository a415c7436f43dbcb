"""What produced an artifact: package versions and the machine, recorded in every manifest."""
from __future__ import annotations

import platform
from importlib import metadata

import torch

_PACKAGES = ("peftguard", "torch", "transformers", "peft", "accelerate")


def versions() -> dict[str, str]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu ({torch.get_num_threads()} threads)"
