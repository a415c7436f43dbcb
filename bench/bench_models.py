"""The small poisoned MiniLM, its PSIM and a LoRA victim that the detection benchmark needs, built once and cached.

A fresh checkout has no ``runs/demo``; rather than failing, the benchmark trains a reduced version of the demo's
chain (BadNet on SST-2, clean-label, 20% poisoned; P-tuning v1 PSIM; LoRA victim), about 5 minutes on 2 cores,
into ``$PEFTGUARD_CACHE/bench-models`` (default ``~/.cache/peftguard/bench-models``), reused afterwards. Only
throughput and agreement between precisions are measured on them, which do not need the demo's full training.

Run alone to build them: ``python bench/bench_models.py``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

POISON_SAMPLES, PSIM_SAMPLES, VICTIM_SAMPLES, DEV_SAMPLES = 1200, 1000, 600, 200
MAX_LENGTH = 128  # the demo's


@dataclass(frozen=True)
class BenchModels:
    poisoned: Path
    psim: Path
    victim: Path


def cache_root() -> Path:
    from peftguard.models import cache_dir

    return cache_dir() / "bench-models"


def ensure_bench_models(root: Path | None = None, echo=print) -> BenchModels:
    """The cached models, trained on first use (each step skipped when its manifest exists)."""
    from peftguard.data import load_dataset
    from peftguard.defenses.psim import DEFAULT_PSIM_LR, train_psim
    from peftguard.poisoning import PoisonSpec, poison_weights
    from peftguard.training import TrainSettings
    from peftguard.triggers import BadNetTrigger
    from peftguard.tuning import LoraMethodConfig
    from peftguard.victims import finetune

    root = root or cache_root()
    models = BenchModels(root / "poisoned", root / "psim", root / "victim-lora")
    data = load_dataset("sst2")
    if not (models.poisoned / "poisoning.json").is_file():
        echo(f"bench: poisoning MiniLM on {POISON_SAMPLES} SST-2 samples (once; cached in {root})")
        poison_weights("minilm", data, [BadNetTrigger()], PoisonSpec(poison_count=None, poison_rate=0.2),
                       TrainSettings(epochs=2, lr=5e-5, max_length=MAX_LENGTH), models.poisoned,
                       max_train_samples=POISON_SAMPLES, max_eval_samples=DEV_SAMPLES)
    if not (models.psim / "psim.json").is_file():
        echo("bench: training the P-tuning v1 PSIM on the poisoned weights (once)")
        train_psim(str(models.poisoned), data, TrainSettings(epochs=1, lr=DEFAULT_PSIM_LR, max_length=MAX_LENGTH),
                   models.psim, max_train_samples=PSIM_SAMPLES, max_eval_samples=DEV_SAMPLES)
    if not (models.victim / "finetune.json").is_file():
        echo("bench: fine-tuning a LoRA victim on the poisoned weights (once)")
        config = LoraMethodConfig()
        finetune(str(models.poisoned), data, config, TrainSettings(epochs=1, lr=config.lr, max_length=MAX_LENGTH),
                 models.victim, max_train_samples=VICTIM_SAMPLES, max_eval_samples=DEV_SAMPLES)
    return models


if __name__ == "__main__":
    common.setup()
    print(ensure_bench_models())
