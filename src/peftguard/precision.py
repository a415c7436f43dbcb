"""Inference precision: float32, bfloat16 autocast or int8 dynamic quantization, chosen in one place.

``auto`` (the default of every inference path that takes a precision) is the fastest the device runs
natively among those the caller allows: int8 on an x86 CPU, then bf16 where the hardware multiplies
bfloat16 (a CUDA GPU that supports it; a CPU with AVX512-BF16 or AMX), else float32. PSIM allows int8
and re-scores inputs near its threshold at the next precision (``PSIM``); ONION allows fp32 and bf16
and re-scores words near its bar in float32 (``deletion_scoring``). Measured speed and agreement
with float32: BENCHMARKS.md, ``bench/detection.py``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
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
    """``name`` checked against ``allowed`` and ``device``; ``auto``: the first of int8, bf16, fp32 in ``allowed``
    that runs natively there (int8: CPU with an x86/fbgemm quantized engine; bf16: see :func:`cpu_has_bf16`)."""
    if name == "auto":
        return next(p for p in ("int8", "bf16", "fp32") if p in allowed and native(p, device))
    if name not in allowed:
        raise OptionError(f"--precision {name!r}: choose from {', '.join(allowed)} or auto")
    if name == "int8" and _kind(device) != "cpu":
        raise OptionError("--precision int8 is for the CPU (dynamic quantization); use bf16 on a GPU")
    return name


def native(precision: str, device: Any) -> bool:
    import torch

    if precision == "int8":
        return _kind(device) == "cpu" and bool({"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines))
    if precision == "bf16":
        return torch.cuda.is_bf16_supported() if _kind(device) == "cuda" else cpu_has_bf16()
    return True


def _kind(device: Any) -> str:
    return getattr(device, "type", str(device))


def quantize_int8(model: Any) -> Any:
    """The model with its linear layers int8 dynamically quantized (per-channel weights), in place; CPU only.

    Adapters that live inside linear layers (LoRA, IA3) are merged into them first: peft's layers read
    their own ``weight.dtype``, which a quantized linear layer no longer has. Prompt methods keep their
    (unquantized) virtual tokens.
    """
    import warnings

    import torch
    from peft.tuners.tuners_utils import BaseTuner
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if isinstance(getattr(model, "base_model", None), BaseTuner):
        model = model.merge_and_unload()

    with warnings.catch_warnings():  # torch.ao's notice that it moves to torchao; the API works in torch 2.13
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
