#!/usr/bin/env python
"""Screening speed at each precision, guarded inference, ONION fast vs reference, serve load: one run, ratios.

Inputs: N SST-2 test sentences, every other one with a BadNet trigger inserted (half triggered).

1. PSIM scan at fp32 (today's path: sorted batches of 64, float32), bf16 autocast and int8 (dynamic
   quantization, inputs near gamma re-scored), each cold (tokenization cache and memo cleared), taking turns;
   flags and detection rates of each against fp32's; GFLOP/s achieved (FLOPs counted on one fp32 pass) beside
   a float32 and a bfloat16 2048x2048 matmul timed in the same process. The same three on clean traffic (the
   same sentences, no trigger), where int8 re-scores more inputs; the share it re-scores on each set; and the
   speed probe behind ``auto`` (``precision.cpu_speedup``).
2. Guarded inference: the victim alone (fp32) vs ``GuardedPredictor`` (PSIM at the default precision, then the
   victim on the inputs that pass).
3. ONION (packaged SmolLM2, bar 0) on the first M sentences: the reference (one full LM pass per candidate
   text, float32) vs the default (prefix-shared deletions, default precision); decisions (cleaned texts) compared.
4. ``psim serve`` on loopback: concurrent clients, bounded requests (``serve_load.py``).
5. ``peftguard psim scan`` of one input in a fresh process: time to first result, and its imports alone; the
   same for the PSIM's ONNX export (``psim export``), whose scan imports onnxruntime instead of torch.
6. The ONNX export scanned through onnxruntime at fp32 and int8 (inputs near gamma re-scored by the fp32 graph),
   taking turns with the torch cases; its flags against torch fp32's.

Models: ``--psim``/``--victim`` (e.g. the demo's PSIM and LoRA victim, ``runs/demo/stages/*/artifact``), else a
small poisoned MiniLM, PSIM and LoRA victim built once and cached (``bench_models.py``, about 5 minutes).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import numpy as np  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8")


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="test sentences for PSIM (half get a BadNet trigger)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the PSIM cases (medians)")
    parser.add_argument("--onion-samples", type=int, default=16, help="sentences for ONION (the reference is slow)")
    parser.add_argument("--onion-repeats", type=int, default=1, help="rounds of the ONION cases")
    parser.add_argument("--skip-onion", action="store_true", help="leave ONION out (no SmolLM2)")
    parser.add_argument("--serve-requests", type=int, default=400, help="requests of the serve load test (0: skip)")
    parser.add_argument("--psim", type=Path, help="a trained PSIM folder [built and cached]")
    parser.add_argument("--victim", type=Path, help="a victim folder [built and cached]")
    parser.add_argument("--sweep", action="store_true", help="also time batch sizes 16/32/64/128 at the default precision")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR / "detection.json")
    return parser


def parse_args() -> argparse.Namespace:
    return build_parser().parse_args()


def test_inputs(samples: int) -> tuple[list[str], np.ndarray]:
    """``samples`` SST-2 test sentences, every other one carrying a BadNet trigger word."""
    from peftguard.triggers import BadNetTrigger

    trigger = BadNetTrigger()
    examples = common.sst2_examples("test", samples)
    texts = [trigger.triggered(ex.text, i) if i % 2 else ex.text for i, ex in enumerate(examples)]
    return texts, np.arange(len(texts)) % 2 == 1


def model_folders(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.psim and args.victim:
        return args.psim, args.victim
    from bench_models import ensure_bench_models

    models = ensure_bench_models()
    return args.psim or models.psim, args.victim or models.victim


def cold(psim: Any) -> None:
    """Forget tokenizations and memoized scores so that a timed call pays for its own."""
    from peftguard import caches

    caches.clear()
    caches.forget(psim)


def psim_cases(psims: dict[str, Any], texts: list[str], gamma: float, suffix: str = "") -> dict[str, Any]:
    def case(psim: Any) -> Any:
        def run() -> np.ndarray:
            cold(psim)
            return psim.confidences(texts, gamma=gamma)
        return run
    return {f"psim_{name}{suffix}": case(psim) for name, psim in psims.items()}


def recheck_share(psim: Any, texts: list[str], gamma: float) -> float:
    """Share of ``texts`` an int8 PSIM scores twice (its int8 confidence within the re-check margin of gamma)."""
    quick = psim._probabilities(psim.fast_model, texts, "int8").max(1)
    return float(np.mean(np.abs(quick - gamma) < psim.recheck_margin))


def onnx_export(psim_dir: Path, folder: Path) -> dict[str, Any]:
    """The PSIM exported to ONNX in ``folder``, and a scanner per ONNX precision."""
    from peftguard.defenses.psim_onnx import GRAPHS, OnnxPSIM, export_psim
    from peftguard.models import LoadOptions

    export_psim(psim_dir, folder, options=LoadOptions())
    return {name: OnnxPSIM(folder, precision=name) for name in GRAPHS}


def onnx_cases(scanners: dict[str, Any], texts: list[str], gamma: float) -> dict[str, Any]:
    def case(scanner: Any) -> Any:
        return lambda: scanner.confidences(texts, gamma=gamma)  # no memo and no shared tokenization cache: always cold
    return {f"psim_onnx_{name}": case(scanner) for name, scanner in scanners.items()}


def guarded_cases(psim: Any, victim: Any, tokenizer: Any, texts: list[str], gamma: float, max_length: int) -> dict[str, Any]:
    from peftguard.defenses.psim import GuardedPredictor
    from peftguard.inference import predict_proba

    guard = GuardedPredictor(psim, victim, tokenizer, gamma=gamma, max_length=max_length)

    def alone() -> Any:
        cold(psim)
        return predict_proba(victim, tokenizer, texts, guard.batch_size, max_length)

    def guarded() -> Any:
        cold(psim)
        return guard.predict(texts)

    return {"victim_alone": alone, "psim_plus_victim": guarded}


def agreement(scores: dict[str, np.ndarray], gamma: float, triggered: np.ndarray) -> dict[str, dict[str, float]]:
    """Per precision: share of flags equal to fp32's, largest confidence change, detection rates."""
    base = scores["fp32"] > gamma
    out = {}
    for name, s in scores.items():
        flags = s > gamma
        out[name] = {"flag_agreement_vs_fp32": float((flags == base).mean()),
                     "max_confidence_change": float(np.abs(s - scores["fp32"]).max()),
                     "triggered_flagged": float(flags[triggered].mean()), "clean_flagged": float(flags[~triggered].mean())}
    return out


def flops_of_pass(psim: Any, texts: list[str]) -> float:
    """Floating-point operations of one fp32 PSIM pass over ``texts`` (torch's FLOP counter: matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    cold(psim)
    with FlopCounterMode(display=False) as counter:
        psim.confidences(texts)
    return float(counter.get_total_flops())


def matmul_peaks(size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a size x size matmul in float32 and bfloat16 (medians), on this process's threads."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        seconds = [common.timed(lambda: a @ b)[0] for _ in range(repeats)]
        out[f"matmul_{name}_gflop_per_s"] = 2 * size**3 / common.median(seconds) / 1e9
    return out


def onion_figures(texts: list[str], repeats: int) -> dict[str, Any]:
    from peftguard import caches
    from peftguard.defenses.onion import OnionConfig, OnionDefense

    fast = OnionDefense(OnionConfig())
    reference = OnionDefense(OnionConfig(share_prefix=False), scorer=fast.scorer)

    def run(defense: OnionDefense) -> Any:
        def screen() -> list[str]:
            caches.forget(defense)
            return defense.screen(texts).texts
        return screen

    cases = {"onion_reference": run(reference), "onion_fast": run(fast)}
    fast.screen(texts[:1])  # warm-up
    seconds = common.interleaved(cases, repeats)
    cleaned = {name: fn() for name, fn in cases.items()}
    same = [a == b for a, b in zip(cleaned["onion_reference"], cleaned["onion_fast"])]
    return {"seconds": seconds, "onion_decisions_identical": all(same), "onion_identical_share": float(np.mean(same)),
            "onion_precision": fast.scorer.precision, "onion_share_prefix": fast.describe()["share_prefix"]}


def serve_figures(psim_dir: Path, victim_dir: Path, requests: int) -> dict[str, Any]:
    import serve_load

    return serve_load.run_load_test(psim_dir, victim_dir, requests=requests)


def time_to_first_result(psim_dir: Path, text: str, runs: int = 3, prefix: str = "scan") -> dict[str, float]:
    """Wall seconds of ``peftguard psim scan`` on one input, a fresh process each run (median), and of its imports."""
    import subprocess

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "one.txt"
        source.write_text(text + "\n", encoding="utf-8")
        scan = [sys.executable, "-m", "peftguard.cli", "psim", "scan", "--psim", str(psim_dir), "--input", str(source)]
        imports = [sys.executable, "-c", "import peftguard.cli, peftguard.scan"]
        timed = {name: [common.timed(lambda c=command: subprocess.run(c, check=True, capture_output=True))[0] for _ in range(runs)]
                 for name, command in (("scan", scan), ("imports", imports))}
    return {f"{prefix}_time_to_first_result_s": common.median(timed["scan"]), f"{prefix}_import_s": common.median(timed["imports"])}


def summarize(seconds: dict[str, dict[str, list[float]]], counts: dict[str, int]) -> dict[str, dict[str, float]]:
    return {name: {"median_s": common.median(v["wall"]), "median_cpu_s": common.median(v["cpu"]),
                   "inputs_per_s": counts[name] / common.median(v["wall"]), "runs": len(v["wall"])}
            for name, v in seconds.items()}


def ratio(figures: dict[str, dict[str, float]], slower: str, faster: str, key: str = "median_s") -> float | None:
    if slower not in figures or faster not in figures:
        return None
    return figures[slower][key] / figures[faster][key]


def batch_sweep(psim_dir: Path, texts: list[str], gamma: float, repeats: int) -> dict[str, float]:
    from peftguard.defenses.psim import PSIM

    psims = {f"batch_{size}": PSIM(psim_dir, batch_size=size) for size in (16, 32, 64, 128)}
    cases = {name: psim_cases({name: p}, texts, gamma)[f"psim_{name}"] for name, p in psims.items()}
    seconds = common.interleaved(cases, repeats)
    return {name: len(texts) / common.median(v["wall"]) for name, v in seconds.items()}


def main() -> None:
    args = parse_args()
    threads = common.setup()
    load_before = list(__import__("os").getloadavg())
    from peftguard.defenses.psim import PSIM
    from peftguard.tuning import load_tuned
    from peftguard.victims import MANIFEST

    from peftguard.precision import cpu_speedup

    psim_dir, victim_dir = model_folders(args)
    texts, triggered = test_inputs(args.samples)
    clean_texts = [ex.text for ex in common.sst2_examples("test", args.samples)]
    psims = {name: PSIM(psim_dir, precision=name) for name in PRECISIONS}
    default = PSIM(psim_dir)  # the default precision
    gamma = float(default.manifest["gamma"])
    victim, tokenizer, manifest = load_tuned(victim_dir, MANIFEST)
    max_length = int(manifest["settings"]["max_length"])
    export_folder = tempfile.TemporaryDirectory()
    scanners = onnx_export(psim_dir, Path(export_folder.name) / "export")
    cases = (psim_cases(psims, texts, gamma) | psim_cases(psims, clean_texts, gamma, "_clean_traffic")
             | onnx_cases(scanners, texts, gamma)
             | guarded_cases(default, victim, tokenizer, texts, gamma, max_length))
    for fn in cases.values():  # warm-up: first-call allocations, oneDNN kernels
        fn()
    started = time.perf_counter()
    seconds = common.interleaved(cases, args.repeats)
    counts = {name: len(texts) for name in seconds}
    scores = {name: psims[name].confidences(texts, gamma=gamma) for name in PRECISIONS}
    scores |= {f"onnx_{name}": scanner.confidences(texts, gamma=gamma) for name, scanner in scanners.items()}
    onion = {}
    if not args.skip_onion:
        onion = onion_figures(texts[: args.onion_samples], args.onion_repeats)
        seconds |= onion.pop("seconds")
        counts |= {"onion_reference": args.onion_samples, "onion_fast": args.onion_samples}
    figures = summarize(seconds, counts)
    flops = flops_of_pass(psims["fp32"], texts)
    peaks = matmul_peaks()
    agree = agreement(scores, gamma, triggered)
    default_case = f"psim_{default.precision}"
    result = {
        "machine": common.machine(), "load_average_at_start": load_before, "threads": threads,
        "samples": len(texts), "triggered": int(triggered.sum()), "psim": str(psim_dir), "victim": str(victim_dir),
        "gamma": gamma, "default_precision": default.precision,
        "psim_inputs_per_s": figures[default_case]["inputs_per_s"],
        "psim_fp32_inputs_per_s": figures["psim_fp32"]["inputs_per_s"],
        "psim_speedup_vs_fp32": ratio(figures, "psim_fp32", default_case),
        "psim_speedup_vs_fp32_cpu_time": ratio(figures, "psim_fp32", default_case, "median_cpu_s"),
        "flag_agreement_vs_fp32": agree[default.precision]["flag_agreement_vs_fp32"],
        "cpu_speedup_probe": {name: cpu_speedup(name) for name in ("bf16", "int8")},
        "int8_recheck_share": recheck_share(psims["int8"], texts, gamma),
        "int8_recheck_share_clean_traffic": recheck_share(psims["int8"], clean_texts, gamma),
        "speedup_vs_fp32": {name: ratio(figures, "psim_fp32", f"psim_{name}") for name in PRECISIONS},
        "clean_traffic_speedup_vs_fp32": {name: ratio(figures, "psim_fp32_clean_traffic", f"psim_{name}_clean_traffic")
                                          for name in PRECISIONS},
        "precisions": agree,
        "psim_onnx_int8_inputs_per_s": figures["psim_onnx_int8"]["inputs_per_s"],
        "psim_onnx_int8_speedup_vs_fp32": ratio(figures, "psim_fp32", "psim_onnx_int8"),
        "psim_onnx_fp32_speedup_vs_fp32": ratio(figures, "psim_fp32", "psim_onnx_fp32"),
        "onnx_int8_flag_agreement_vs_fp32": agree["onnx_int8"]["flag_agreement_vs_fp32"],
        "guarded_overhead": ratio(figures, "psim_plus_victim", "victim_alone"),
        "onion_speedup_vs_reference": ratio(figures, "onion_reference", "onion_fast"),
        "onion_speedup_vs_reference_cpu_time": ratio(figures, "onion_reference", "onion_fast", "median_cpu_s"),
        **onion, "onion_samples": args.onion_samples if onion else 0,
        "flops_per_input": flops / len(texts),
        "gflop_per_s": {name: flops / figures[f"psim_{name}"]["median_s"] / 1e9 for name in PRECISIONS},
        **peaks, "figures": figures,
    }
    if args.sweep:
        result["batch_size_sweep_inputs_per_s"] = batch_sweep(psim_dir, texts, gamma, args.repeats)
    result |= time_to_first_result(psim_dir, texts[0])
    result |= time_to_first_result(Path(export_folder.name) / "export", texts[0], prefix="onnx_scan")
    export_folder.cleanup()
    if args.serve_requests > 0:
        result["serve"] = serve_figures(psim_dir, victim_dir, args.serve_requests)
    result["timed_seconds"] = time.perf_counter() - started
    result["load_average_at_end"] = list(__import__("os").getloadavg())
    report(result, figures)
    common.write_json(args.out, result)
    print(f"wrote {args.out}")


def report(result: dict[str, Any], figures: dict[str, dict[str, float]]) -> None:
    rows = [{"case": name, **fig} for name, fig in figures.items()]
    print(f"{result['samples']} SST-2 test sentences ({result['triggered']} triggered), {result['threads']} threads, "
          f"load {result['load_average_at_start'][0]:.1f} -> {result['load_average_at_end'][0]:.1f}")
    print(common.table(rows, ["case", "runs", "median_s", "median_cpu_s", "inputs_per_s"]))
    keys = ("default_precision", "psim_inputs_per_s", "psim_fp32_inputs_per_s", "psim_speedup_vs_fp32", "flag_agreement_vs_fp32",
            "cpu_speedup_probe", "int8_recheck_share", "int8_recheck_share_clean_traffic", "clean_traffic_speedup_vs_fp32",
            "guarded_overhead", "onion_speedup_vs_reference", "onion_decisions_identical", "scan_time_to_first_result_s", "psim_onnx_int8_inputs_per_s",
            "psim_onnx_int8_speedup_vs_fp32", "onnx_int8_flag_agreement_vs_fp32", "onnx_scan_time_to_first_result_s", "gflop_per_s",
            "matmul_fp32_gflop_per_s", "matmul_bf16_gflop_per_s")
    print({k: result.get(k) for k in keys})
    if "serve" in result:
        print("serve:", {k: v for k, v in result["serve"].items() if not isinstance(v, (list, dict))})


if __name__ == "__main__":
    main()
