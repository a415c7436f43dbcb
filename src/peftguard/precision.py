"""Inference precision: float32, bfloat16 autocast or int8 dynamic quantization, chosen in one place.

``auto`` (the default of every inference path that takes a precision) is the first of the caller's
candidates that the device runs natively *and*, on a CPU, measurably faster than float32: int8 on an x86
CPU with VNNI (8-bit activations), bf16 where the hardware multiplies bfloat16 (a CUDA GPU that supports
it; a CPU with AVX512-BF16 or AMX), else float32. CPU flags alone mislead: on a virtualized Xeon
(model 207) that reports AVX512-BF16, a bfloat16 linear layer ran at 0.54-0.66x float32's speed, so a
transformer-sized linear layer is timed once per process (:func:`cpu_speedup`, about 0.1 s).
PSIM allows int8 (on request: ``auto`` picks from bf16 and fp32, see ``PSIM``) and re-scores inputs
near its threshold at the next precision; ONION allows fp32 and bf16 and re-scores words near its bar in
float32 (``deletion_scoring``). Measured speed and agreement with float32: BENCHMARKS.md,
``bench/detection.py``.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from peftguard.errors import OptionError
from peftguard.provenance import cpuinfo_field

PRECISIONS = ("fp32", "bf16", "int8")
DEFAULT_PRECISION = "auto"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# `auto` takes a lower precision on a CPU only when a linear layer runs at least this many times faster in it than
# in float32 here. Fixed a priori: a clear margin over timing noise (the probe's ratio varied by up to 0.2 between
# runs: int8 2.7-2.9x, bf16 0.54-0.58x at one thread), and below it the rounding (and, for int8, the re-check near gamma) is not worth its cost.
MIN_CPU_SPEEDUP = 1.25
# The probe's layer: MiniLM's feed-forward input (384 -> 1536) on 256 token rows, best of 5 timings each.
PROBE_ROWS, PROBE_IN, PROBE_OUT, PROBE_REPEATS = 256, 384, 1536, 5

# The re-check margin with 8-bit activations (a CPU with VNNI). Rule, fixed before any validation PSIM was scored:
# 2 x the largest |int8 - fp32| confidence change on clean dev sentences over the development PSIMs (the PSIM
# stages of runs/v2/psim_budget_dev and psim_budget_dev_agnews), rounded up to 0.01. Those changes: 0.0502 (sst2,
# 872 sentences) and 0.0252 (agnews, 1000), so 2 x 0.0502 -> 0.11. Validated, not tuned, on the 11 held-apart
# runs/zoo-audit PSIMs: largest change 0.0920 (clean-cr-lora-s2), none above 0.11 (bench/int8_margin.py and .json).
INT8_RECHECK_MARGIN = 0.11  # also the ONNX Runtime int8 graph's (psim_onnx.py): the same u8 x s8 per-channel scheme
# torch's default 7-bit activations (a CPU without VNNI, only when --precision int8 is asked for: `auto` never
# picks it there). The same rule on the 7-bit development figures (0.0793 sst2, 0.0417 agnews) gives 0.16; it is
# no guarantee: validation found changes up to 0.184 (cr-jj-dirty-lora, clean-sst2-lora-s3).
INT8_RECHECK_MARGIN_7BIT = 0.16


def _cpu_flags() -> list[str]:
    return (cpuinfo_field("flags") or "").split()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); without it bf16 is emulated and slow."""
    return any(flag in _cpu_flags() for flag in BF16_CPU_FLAGS)


@functools.cache
def cpu_has_vnni() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8), which accumulate
    u8 x s8 products in int32: with them fbgemm's int8 kernels take full 8-bit activations without overflow."""
    return any(flag in _cpu_flags() for flag in VNNI_CPU_FLAGS)


def resolve_precision(name: str, device: Any, *, allowed: Sequence[str] = PRECISIONS,
                      auto_from: Sequence[str] | None = None) -> str:
    """``name`` checked against ``allowed`` and ``device``; ``auto``: the first of int8, bf16, fp32 in ``auto_from``
    (default ``allowed``) that :func:`native` finds native and, on a CPU, measurably faster there."""
    if name == "auto":
        candidates = allowed if auto_from is None else auto_from
        return next(p for p in ("int8", "bf16", "fp32") if p in candidates and native(p, device))
    if name not in allowed:
        raise OptionError(f"--precision {name!r}: choose from {', '.join(allowed)} or auto")
    if name == "int8" and _kind(device) != "cpu":
        raise OptionError("--precision int8 is for the CPU (dynamic quantization); use bf16 on a GPU")
    return name


def native(precision: str, device: Any) -> bool:
    """Whether ``device`` runs ``precision`` in hardware and, on a CPU, at least ``MIN_CPU_SPEEDUP`` x float32's speed."""
    import torch

    if precision == "int8":  # without VNNI int8 needs 7-bit activations, too coarse to be a default (psim.py)
        return (_kind(device) == "cpu" and cpu_has_vnni()
                and bool({"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines))
                and cpu_speedup("int8") >= MIN_CPU_SPEEDUP)
    if precision == "bf16":
        if _kind(device) == "cuda":
            return torch.cuda.is_bf16_supported()
        return cpu_has_bf16() and cpu_speedup("bf16") >= MIN_CPU_SPEEDUP
    return True


def cpu_speedup(precision: str) -> float:
    """How many times faster than float32 this CPU runs a MiniLM-sized linear layer at ``precision`` (bf16: weights
    and inputs in bfloat16, as autocast runs them; int8: :func:`quantize_int8`'s layer), on the current threads.
    Measured once per process and thread count (about 0.1 s)."""
    import torch

    return _measured_speedup(precision, torch.get_num_threads())


@functools.cache
def _measured_speedup(precision: str, threads: int) -> float:
    import time

    import torch

    if precision not in ("bf16", "int8"):
        return 1.0

    def best(run: Any) -> float:
        run()  # first call: kernel selection, allocation
        timings = []
        for _ in range(PROBE_REPEATS):
            start = time.perf_counter()
            run()
            timings.append(time.perf_counter() - start)
        return min(timings)

    with torch.inference_mode():
        layer = torch.nn.Linear(PROBE_IN, PROBE_OUT)
        x = torch.randn(PROBE_ROWS, PROBE_IN)
        fp32 = best(lambda: layer(x))
        if precision == "bf16":
            x16, weight16, bias16 = x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()
            other = best(lambda: torch.nn.functional.linear(x16, weight16, bias16))
        else:
            quantized = quantize_int8(torch.nn.Sequential(layer))
            other = best(lambda: quantized(x))
    return fp32 / other


def _kind(device: Any) -> str:
    return getattr(device, "type", str(device))


def int8_activation_bits() -> int:
    """Bits :func:`quantize_int8` gives the activations on this CPU: 8 with VNNI (:func:`cpu_has_vnni`), else 7."""
    return 8 if cpu_has_vnni() else 7


@functools.cache
def full_range_linear() -> type:
    """torch's dynamic int8 ``Linear`` with 8-bit activations (``reduce_range=False``); everything else as torch's.

    torch's own hard-codes ``reduce_range=True`` (7-bit activations) because fbgemm's AVX2/AVX512 kernels
    without VNNI add pairs of u8 x s8 products in int16 (``vpmaddubsw``), which saturates with 8-bit
    activations; VNNI (``vpdpbusd``) accumulates in int32 and does not. The lost bit is what moves PSIM
    confidences most: on the sst2-bb PSIM the largest change against float32 was 0.103 with 7 bits and
    0.038 with 8 (bench/int8_activations.py).
    """
    import torch
    from torch.ao.nn.quantized.dynamic import Linear

    class FullRangeDynamicLinear(Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self._packed_params.dtype == torch.qint8:
                y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
            elif self._packed_params.dtype == torch.float16:
                y = torch.ops.quantized.linear_dynamic_fp16(x, self._packed_params._packed_params)
            else:
                raise RuntimeError("Unsupported dtype on dynamic quantized linear!")
            return y.to(x.dtype)

    FullRangeDynamicLinear.__qualname__ = FullRangeDynamicLinear.__name__
    return FullRangeDynamicLinear


def quantize_int8(model: Any, *, activation_bits: int | None = None) -> Any:
    """The model with its linear layers int8 dynamically quantized (per-channel weights), in place; CPU only.

    Activations are quantized to 8 bits where the CPU has VNNI, else to torch's default 7 bits
    (:func:`full_range_linear` says why; :func:`int8_activation_bits` which); ``activation_bits`` (7 or 8)
    overrides the choice, for measurements: 8 without VNNI can saturate. Adapters that live inside
    linear layers (LoRA, IA3) are merged into them first: peft's layers read their own ``weight.dtype``,
    which a quantized linear layer no longer has. Prompt methods keep their (unquantized) virtual tokens.
    """
    import warnings

    import torch
    from peft.tuners.tuners_utils import BaseTuner
    from torch.ao.nn.quantized.dynamic import Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

    if isinstance(getattr(model, "base_model", None), BaseTuner):
        model = model.merge_and_unload()

    bits = int8_activation_bits() if activation_bits is None else activation_bits
    if bits not in (7, 8):
        raise ValueError(f"int8 activations have 7 or 8 bits, not {bits}")
    mapping = get_default_dynamic_quant_module_mappings()
    if bits == 8:
        mapping = {float_type: full_range_linear() if quantized is Linear else quantized
                   for float_type, quantized in mapping.items()}
    with warnings.catch_warnings():  # torch.ao's notice that it moves to torchao; the API works in torch 2.13
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                                mapping=mapping, inplace=True)
