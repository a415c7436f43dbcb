"""What produced an artifact: package versions and the machine, recorded in every manifest."""
from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

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


CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(name: str) -> str | None:
    """The first ``name`` line of ``/proc/cpuinfo`` (Linux), or None where there is none."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name), None)


def device_description() -> str:
    """The device, with what decides its floating-point rounding: the GPU, or the CPU's model, the instruction set
    torch dispatches to and the thread count. The same PSIM training gave the same weights bit for bit when rerun on
    one machine and different ones on another session's (REPRODUCTION.md, "Run to run")."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    model = cpuinfo_field("model name") or platform.processor() or "unknown model"
    return f"cpu ({torch.get_num_threads()} threads; {model}; {torch.backends.cpu.get_cpu_capability()})"
