"""Inference precision: float32, bfloat16 autocast or int8 dynamic quantization, chosen in one place.

``auto`` (the default of every inference path that takes a precision) means bfloat16 where the
hardware does bf16 arithmetic natively (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX),
else float32. On such a CPU bf16 autocast scored PSIM inputs about twice as fast as float32 with the
same flags on every input of the benchmark set, while int8 dynamic quantization changed flags
(BENCHMARKS.md, ``bench/detection.py``), so int8 is available but never chosen by ``auto``.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from peftguard.errors import OptionError

PRECISIONS = ("fp32", "bf16", "int8")
DEFAULT_PRECISION = "auto"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); without it bf16 is emulated and slow."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(name: str, device: Any, *, allowed: Sequence[str] = PRECISIONS) -> str:
    """``name`` checked against ``allowed``; ``auto`` becomes bf16 where native on ``device``, else fp32."""
    if name == "auto":
        return "bf16" if _bf16_native(device) and "bf16" in allowed else "fp32"
    if name not in allowed:
        raise OptionError(f"--precision {name!r}: choose from {', '.join(allowed)} or auto")
    return name


def _bf16_native(device: Any) -> bool:
    if getattr(device, "type", device) == "cuda":
        import torch

        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


@contextlib.contextmanager
def autocast_for(precision: str, device: Any) -> Iterator[None]:
    """bfloat16 autocast on ``device`` when ``precision`` is bf16; nothing otherwise."""
    import torch

    kind = getattr(device, "type", str(device))
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


def quantize_int8(model: Any) -> Any:
    """The model with its linear layers int8 dynamically quantized (per-channel weights), in place; CPU only."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
