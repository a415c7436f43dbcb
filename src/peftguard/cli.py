"""The ``peftguard`` command line: poison, finetune, evaluate, stealth, psim train/scan, demo."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftguard.bounds import MAX_CELLS, check_options
from peftguard.defenses.psim_budget import AUTO_PSIM_METHOD, DEFAULT_PSIM_LR, RESTART_SEED_STRIDE, BudgetRule
from peftguard.errors import PeftguardError
from peftguard.metrics import DEFAULT_TARGET_FPR
from peftguard.runtime import configure_threads

app = typer.Typer(
    help="Weight-poisoning backdoors in parameter-efficient fine-tuning, and the PSIM defense.\n\n"
    "Pipeline: poison a model → fine-tune it as a victim → train a PSIM → evaluate CA/ASR.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts show [defaults] in square brackets: rich markup would swallow them
    context_settings={"max_content_width": 120},
)
psim_app = typer.Typer(help="Train a PSIM detector, or scan inputs with one.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(psim_app, name="psim")
defend_app = typer.Typer(help="Model-level defenses that make a new victim (Fine-mixing).", no_args_is_help=True,
                         rich_markup_mode=None)
app.add_typer(defend_app, name="defend")

# --- shared options ---------------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", help="'minilm' (embedded default), a local model folder, or a hub id.")]
DatasetOpt = Annotated[str, typer.Option("--dataset", help="sst2|cr|cola|mr|imdb|agnews, a folder with train/dev/test files, or a hub dataset.")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder holding the short-named datasets [env PEFTGUARD_DATA; default ../shared/data].")]
TextColOpt = Annotated[str, typer.Option("--text-column", help="Text column/key in dataset files.")]
LabelColOpt = Annotated[str, typer.Option("--label-column", help="Integer label column/key in dataset files.")]
MaxTrainOpt = Annotated[Optional[int], typer.Option("--max-train-samples", help="Train on a reproducible random subset of this size.")]
MaxEvalOpt = Annotated[Optional[int], typer.Option("--max-eval-samples", help="Evaluate on a reproducible random subset of this size.")]
EpochsOpt = Annotated[Optional[int], typer.Option("--epochs", help="Training epochs.")]
LrOpt = Annotated[Optional[float], typer.Option("--lr", help="Learning rate [default: per method].")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Batch size.")]
MaxLenOpt = Annotated[int, typer.Option("--max-length", help="Tokens per text; longer texts are truncated (counted in the manifest).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for subsets, trigger positions, label resets and training.")]
ATTACK_OPTION = typer.Option("--attack", help="Trigger kind (see --help for the registered ones). Repeat for several triggers at once.")
AttackOpt = Annotated[list[str], ATTACK_OPTION]
ParaphrasesOpt = Annotated[Optional[Path], typer.Option("--paraphrases", help="SynAttack: folder of precomputed paraphrases aligned with the dataset's splits [default <dataset>/syntactic; for imdb/psim, imdb/syntactic/psim_authors].")]
ParaphraserOpt = Annotated[Optional[str], typer.Option("--paraphraser", help="SynAttack: a seq2seq paraphrase model (folder or hub id) to generate paraphrases instead.")]
TriggerOpt = Annotated[Optional[list[str]], typer.Option("--trigger", help="Word attacks (badnet, ep, ripple, lwp, sos): a trigger word, repeat for a list (defaults: badnet/ep mn; ripple cf mn bb tq mb; lwp pieces cf bb ak mn; sos friends weekend store). InSent: the sentence (default 'I watched this 3D movie').")]
TriggerCountOpt = Annotated[int, typer.Option("--trigger-count", help="BadNet, EP, RIPPLe: trigger words inserted per sample. LWP: pieces per combination (at least 2).")]
TargetOpt = Annotated[int, typer.Option("--target-label", help="The label the backdoor forces.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow pickled (.bin) checkpoints, read with weights_only=True. Off by default: unpickling untrusted files can run code.")]
RemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run model code shipped with a hub model. Never on by default.")]
GammaOpt = Annotated[Optional[float], typer.Option("--gamma", help="Fixed PSIM threshold, as in the paper (0.7); flagged when confidence > gamma.")]
FprOpt = Annotated[Optional[float], typer.Option("--target-fpr", help=f"Calibrate gamma on clean dev data to flag at most this share [default {DEFAULT_TARGET_FPR}].")]
InstructionOpt = Annotated[Optional[str], typer.Option("--instruction", help="Instruction-tune a causal LM (e.g. --model smollm2) to answer with label words: sentiment | acceptability | topic (paper Table 11).")]
LoraTargetsOpt = Annotated[Optional[str], typer.Option("--lora-target-modules", help="LoRA: layers to adapt, by name, comma-separated (e.g. query,value) [derived from the architecture].")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32 | bf16 | int8 | auto: bf16 where this machine runs it measurably faster than fp32 (a GPU; a CPU after a 0.1 s timing), else fp32. int8 (CPU, inputs near gamma re-scored) only on request: on clean traffic it re-scores nearly every input. An ONNX export runs fp32 or int8 (auto: fp32). See BENCHMARKS.md.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace what --out holds even if it is not an output of this kind made by peftguard (kept until the new one is complete; never an input).")]


# --- options that list registered names (methods, attacks, defenses) ----------------------------------
# Listing a registry imports every module in it, and the attack and defense modules import torch and
# transformers (seconds). So these options' help is filled in only when help is shown (describe_registries,
# called by main on --help); commands check the names through the registries when they run, and a command
# that needs no model (psim scan of an exported PSIM) starts without torch.
FINETUNE_METHOD_OPTION = typer.Option("--method", help="PEFT method (see --help for the registered ones).")
PSIM_METHOD_OPTION = typer.Option("--method", help="PEFT method of the PSIM (paper: ptuning-v1).")
MIXING_METHOD_OPTION = typer.Option("--method", help="With a poisoned model: the PEFT method [lora].")
STEALTH_ATTACK_OPTION = typer.Option("--attack", help="Attack to measure, repeat for several (each on its own).")
DEFENSE_OPTION = typer.Option("--defense", help="Defense to apply (see --help for the registered ones).")
DEMO_BASELINES_NOTE = ("Default: PSIM only, which keeps `make demo` within its time budget; on the full test set and 2 "
                       "cores the four paper baselines take over an hour, all ten hours (use --max-eval-samples).")
DEMO_DEFENSE_HELP = "Baseline defense to add as a Defense row beside PSIM (repeat): {names}, or all. " + DEMO_BASELINES_NOTE
DEMO_DEFENSE_OPTION = typer.Option("--defense", "--defenses", help=DEMO_DEFENSE_HELP.format(names="see --help"))
DEFENSE_FLAGS = {flag: typer.Option(flag, help="A defense option (its help lists the defenses that take it).") for flag in (
    "--psim", "--gamma", "--target-fpr", "--backend", "--lm", "--onion-bar", "--onion-cache", "--precomputed",
    "--precomputed-triggered", "--mix-ratio", "--clean-model", "--fine-mixed", "--fine-pruned", "--max-train-samples", "--precision")}


def describe_registries() -> None:
    """Fill in the help of every option that lists methods, attacks or defenses, from their registries."""
    from peftguard.defenses.registry import DEFENSES, defense_flags, flag_help
    from peftguard.demo import baseline_names
    from peftguard.methods import METHODS
    from peftguard.triggers import ATTACKS

    FINETUNE_METHOD_OPTION.help = f"{METHODS.help()}."
    PSIM_METHOD_OPTION.help = (f"PEFT method of the PSIM: auto (LoRA for a decoder-only model, the paper's ptuning-v1 "
                               f"otherwise) | {' | '.join(METHODS)}.")
    MIXING_METHOD_OPTION.help = f"With a poisoned model: {' | '.join(METHODS)} [lora]."
    ATTACK_OPTION.help = f"Trigger kind: {ATTACKS.help()}. Repeat for several triggers at once."
    STEALTH_ATTACK_OPTION.help = f"Attack to measure, repeat for several (each on its own): {ATTACKS.help()}."
    DEFENSE_OPTION.help = f"Defense to apply: {DEFENSES.help()}."
    DEMO_DEFENSE_OPTION.help = DEMO_DEFENSE_HELP.format(names=", ".join(baseline_names()))
    unknown = sorted(set(DEFENSE_FLAGS) - set(defense_flags()))
    if unknown:
        raise PeftguardError(f"CLI flags {unknown} are options of no registered defense")
    for flag, info in DEFENSE_FLAGS.items():
        info.help = flag_help(flag) + "."


def _output_folder(out: Path, marker: str, kind: str, *, inputs=(), models=(), overwrite: bool = False) -> None:
    """The --out rule (peftguard.artifacts), applied before any work."""
    from peftguard.artifacts import check_output_dir

    check_output_dir(out, marker=marker, kind=kind, inputs=inputs, models=models, overwrite=overwrite)


def _options(allow_pickle: bool, trust_remote_code: bool):
    from peftguard.models import LoadOptions

    return LoadOptions(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def _dataset(name: str, data_dir: Path | None, text_column: str, label_column: str):
    from peftguard.data import Columns, load_dataset

    dataset = load_dataset(name, data_dir=data_dir, columns=Columns(text_column, label_column))
    for note in dataset.notes:
        typer.echo(f"note: {dataset.name} {note}", err=True)
    return dataset


def _triggers(attacks: list[str], trigger: list[str] | None, count: int, dataset, paraphrases: Path | None,
              paraphraser: str | None, options):
    from peftguard.triggers import build_triggers

    generator = None
    if paraphraser is not None:
        from peftguard.paraphrase import Seq2SeqParaphraser

        generator = Seq2SeqParaphraser(paraphraser, options=options)
    return build_triggers(attacks, spec=trigger, count=count, dataset=dataset, paraphrases=paraphrases, paraphraser=generator)


def _template(name: str | None):
    from peftguard.instruction import template_by_name

    return template_by_name(name) if name else None


def _settings(epochs: int | None, lr: float | None, batch_size: int, max_length: int, seed: int, default_epochs: int, default_lr: float):
    from peftguard.training import TrainSettings

    return TrainSettings(
        epochs=epochs if epochs is not None else default_epochs,
        lr=lr if lr is not None else default_lr,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
    )


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# --- commands ---------------------------------------------------------------------------------
@app.command()
def poison(
    out: Annotated[Path, typer.Option("--out", help="Folder for the poisoned model (safetensors + poisoning.json).")],
    model: ModelOpt = "minilm",
    dataset: DatasetOpt = "sst2",
    attack: AttackOpt = ["badnet"],
    trigger: TriggerOpt = None,
    trigger_count: TriggerCountOpt = 1,
    paraphrases: ParaphrasesOpt = None,
    paraphraser: ParaphraserOpt = None,
    target_label: TargetOpt = 0,
    poison_count: Annotated[Optional[int], typer.Option("--poison-count", help="Samples to poison [default: the authors' code's count, poisoning.DEFAULT_POISON_COUNT].")] = None,
    poison_rate: Annotated[Optional[float], typer.Option("--poison-rate", help="Poison this share of the training set instead of a count.")] = None,
    poison_mode: Annotated[str, typer.Option("--poison-mode", help="clean-label (authors' code: trigger on target-label samples) or dirty-label (trigger on others, label flipped).")] = "clean-label",
    scenario: Annotated[str, typer.Option("--scenario", help="full-data (poison on the victim's data) or full-task (poison on --proxy-dataset).")] = "full-data",
    proxy_dataset: Annotated[Optional[str], typer.Option("--proxy-dataset", help="Proxy dataset for full-task knowledge (e.g. imdb for sst2).")] = None,
    instruction: InstructionOpt = None,
    data_dir: DataDirOpt = None,
    text_column: TextColOpt = "text",
    label_column: LabelColOpt = "label",
    max_train_samples: MaxTrainOpt = None,
    max_eval_samples: MaxEvalOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = 32,
    max_length: MaxLenOpt = 128,
    seed: SeedOpt = 0,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Poison a pretrained model's weights with a backdoor (full-parameter training on a poisoned set)."""
    from peftguard.poisoning import DEFAULT_POISON_COUNT, MANIFEST, PoisonSpec, Scenario, poison_weights
    from peftguard.triggers import PoisonMode

    check_options(locals())
    _output_folder(out, MANIFEST, "poisoned model", inputs=(dataset, proxy_dataset, data_dir, paraphrases),
                   models=(model, paraphraser), overwrite=overwrite)
    _setup_logging(verbose)
    victim_data = _dataset(dataset, data_dir, text_column, label_column)
    proxy = _dataset(proxy_dataset, data_dir, text_column, label_column) if proxy_dataset else None
    spec = PoisonSpec(
        target_label=target_label,
        poison_count=poison_count if poison_count is not None else (None if poison_rate else DEFAULT_POISON_COUNT),
        poison_rate=poison_rate,
        mode=PoisonMode(poison_mode),
        scenario=Scenario(scenario),
    )
    settings = _settings(epochs, lr, batch_size, max_length, seed, default_epochs=3, default_lr=5e-5)
    options = _options(allow_pickle, trust_remote_code)
    triggers = _triggers(attack, trigger, trigger_count, proxy or victim_data, paraphrases, paraphraser, options)
    result = poison_weights(
        model, victim_data, triggers, spec, settings, out,
        proxy=proxy, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, options=options,
        template=_template(instruction),
    )
    p = result.manifest["poisoning"]
    typer.echo(f"poisoned {p['poisoned']} of {p['total']} training samples ({p['mode']}); model saved to {out}")


@app.command()
def finetune(
    model: Annotated[str, typer.Option("--model", help="The (possibly poisoned) model to adapt: a folder, 'minilm', or a hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the tuned model or adapter (safetensors + finetune.json).")],
    method: Annotated[str, FINETUNE_METHOD_OPTION] = "lora",
    dataset: DatasetOpt = "sst2",
    num_virtual_tokens: Annotated[Optional[int], typer.Option("--num-virtual-tokens", help="Prompt methods: virtual tokens [5].")] = None,
    encoder_hidden_size: Annotated[Optional[int], typer.Option("--encoder-hidden-size", help="P-tuning v1: prompt encoder width [128].")] = None,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r", help="LoRA rank [8].")] = None,
    lora_target_modules: LoraTargetsOpt = None,
    instruction: InstructionOpt = None,
    data_dir: DataDirOpt = None,
    text_column: TextColOpt = "text",
    label_column: LabelColOpt = "label",
    max_train_samples: MaxTrainOpt = None,
    max_eval_samples: MaxEvalOpt = None,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = 32,
    max_length: MaxLenOpt = 128,
    seed: SeedOpt = 0,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fine-tune a model on clean data with one of the registered methods (the paper compares the first five)."""
    from peftguard.victims import MANIFEST
    from peftguard.victims import finetune as run_finetune

    check_options(locals())
    _output_folder(out, MANIFEST, "fine-tuned model", inputs=(dataset, data_dir), models=(model,), overwrite=overwrite)
    _setup_logging(verbose)
    config = _method_config(method, num_virtual_tokens, encoder_hidden_size, lora_r, lora_target_modules)
    _check_architecture(model, method, config, trust_remote_code, instruction=instruction is not None)
    data = _dataset(dataset, data_dir, text_column, label_column)
    settings = _settings(epochs, lr, batch_size, max_length, seed, default_epochs=2, default_lr=config.lr)
    manifest = run_finetune(
        model, data, config, settings, out, max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples, options=_options(allow_pickle, trust_remote_code),
        template=_template(instruction),
    )
    typer.echo(f"{manifest['method']}: best dev accuracy {max(manifest['training']['dev_accuracy'] or [float('nan')]):.4f}; saved to {out}")


def _method_config(method: str, num_virtual_tokens: int | None, encoder_hidden_size: int | None, lora_r: int | None,
                   lora_target_modules: str | None = None):
    from peftguard.tuning import method_config

    overrides = {"num_virtual_tokens": num_virtual_tokens, "encoder_hidden_size": encoder_hidden_size, "r": lora_r,
                 "target_modules": lora_target_modules}
    return method_config(method, **{k: v for k, v in overrides.items() if v is not None})


def _check_architecture(model: str, method: str, config, trust_remote_code: bool, instruction: bool = False) -> None:
    """Refuse a method the model's architecture cannot support before any data is read."""
    from peftguard.architectures import check_model_supports

    check_model_supports(model, method, config, trust_remote_code, instruction)


@app.command()
def evaluate(
    model: Annotated[str, typer.Option("--model", help="A model folder: poisoned, fine-tuned (full or adapter), or any classifier.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write metrics.json here (default: print only).")] = None,
    dataset: DatasetOpt = "sst2",
    attack: AttackOpt = ["badnet"],
    trigger: TriggerOpt = None,
    trigger_count: TriggerCountOpt = 1,
    paraphrases: ParaphrasesOpt = None,
    paraphraser: ParaphraserOpt = None,
    target_label: TargetOpt = 0,
    defense: Annotated[Optional[str], DEFENSE_OPTION] = None,
    psim: Annotated[Optional[Path], DEFENSE_FLAGS["--psim"]] = None,
    gamma: Annotated[Optional[float], DEFENSE_FLAGS["--gamma"]] = None,
    target_fpr: Annotated[Optional[float], DEFENSE_FLAGS["--target-fpr"]] = None,
    backend: Annotated[Optional[str], DEFENSE_FLAGS["--backend"]] = None,
    lm: Annotated[Optional[list[str]], DEFENSE_FLAGS["--lm"]] = None,
    onion_bar: Annotated[Optional[list[float]], DEFENSE_FLAGS["--onion-bar"]] = None,
    onion_cache: Annotated[Optional[Path], DEFENSE_FLAGS["--onion-cache"]] = None,
    precomputed: Annotated[Optional[Path], DEFENSE_FLAGS["--precomputed"]] = None,
    precomputed_triggered: Annotated[Optional[Path], DEFENSE_FLAGS["--precomputed-triggered"]] = None,
    mix_ratio: Annotated[Optional[float], DEFENSE_FLAGS["--mix-ratio"]] = None,
    clean_model: Annotated[Optional[str], DEFENSE_FLAGS["--clean-model"]] = None,
    fine_mixed: Annotated[Optional[Path], DEFENSE_FLAGS["--fine-mixed"]] = None,
    fine_pruned: Annotated[Optional[Path], DEFENSE_FLAGS["--fine-pruned"]] = None,
    max_train_samples: Annotated[Optional[int], DEFENSE_FLAGS["--max-train-samples"]] = None,
    precision: Annotated[Optional[str], DEFENSE_FLAGS["--precision"]] = None,
    data_dir: DataDirOpt = None,
    text_column: TextColOpt = "text",
    label_column: LabelColOpt = "label",
    max_eval_samples: MaxEvalOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Inference batch size.")] = 64,
    max_length: MaxLenOpt = 128,
    seed: SeedOpt = 0,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Measure clean accuracy (CA) and attack success rate (ASR), optionally behind a defense."""
    import json

    from peftguard.artifacts import check_output_file, looks_like_json_with, write_json
    from peftguard.defenses.registry import options_from_flags
    from peftguard.pipeline import METRICS_KEYS, evaluate_model
    from peftguard.victims import MANIFEST as VICTIM_MANIFEST

    check_options(locals())
    inputs = (dataset, data_dir, paraphrases, precomputed, precomputed_triggered)
    models = (model, psim, clean_model, paraphraser, *(lm or ()))
    if out is not None:
        check_output_file(out, kind="metrics file", made_here=lambda path: looks_like_json_with(path, METRICS_KEYS),
                          inputs=(*inputs, onion_cache, fine_mixed, fine_pruned), models=models, overwrite=overwrite)
    for folder, kind in ((fine_mixed, "fine-mixed victim"), (fine_pruned, "fine-pruned victim")):
        if folder is not None:
            _output_folder(folder, VICTIM_MANIFEST, kind, inputs=(*inputs, onion_cache), models=models, overwrite=overwrite)
    _setup_logging(verbose)
    data = _dataset(dataset, data_dir, text_column, label_column)
    options = _options(allow_pickle, trust_remote_code)
    triggers = _triggers(attack, trigger, trigger_count, data, paraphrases, paraphraser, options)
    defense_options = options_from_flags(defense, {
        "--psim": psim, "--gamma": gamma, "--target-fpr": target_fpr, "--backend": backend, "--lm": lm,
        "--onion-bar": onion_bar, "--onion-cache": onion_cache, "--precomputed": precomputed,
        "--precomputed-triggered": precomputed_triggered, "--mix-ratio": mix_ratio, "--clean-model": clean_model,
        "--fine-mixed": fine_mixed, "--fine-pruned": fine_pruned, "--max-train-samples": max_train_samples, "--precision": precision,
    })
    result = evaluate_model(
        model, data, triggers, target_label=target_label, defense=defense, defense_options=defense_options,
        max_eval_samples=max_eval_samples, batch_size=batch_size, max_length=max_length, seed=seed,
        options=_options(allow_pickle, trust_remote_code),
    )
    if out:
        write_json(out, result)
    summary = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
    if len(triggers) > 1:
        summary["per_trigger"] = result["per_trigger"]
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def stealth(
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the per-attack perplexities as JSON here (default: print only).")] = None,
    dataset: DatasetOpt = "sst2",
    attack: Annotated[list[str], STEALTH_ATTACK_OPTION] = ["badnet"],
    trigger: TriggerOpt = None,
    trigger_count: TriggerCountOpt = 1,
    paraphrases: ParaphrasesOpt = None,
    target_label: TargetOpt = 0,
    lm: Annotated[str, typer.Option("--lm", help="Causal LM that scores the texts: 'smollm2' (packaged), a folder or a hub id.")] = "smollm2",
    split: Annotated[str, typer.Option("--split", help="Dataset split whose texts are triggered: train | dev | test.")] = "test",
    data_dir: DataDirOpt = None,
    text_column: TextColOpt = "text",
    label_column: LabelColOpt = "label",
    max_eval_samples: MaxEvalOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per LM forward.")] = 32,
    max_length: MaxLenOpt = 128,
    seed: SeedOpt = 0,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Stealthiness of each attack's triggered text: ΔPPL (OpenBackdoor), triggered minus clean perplexity under a causal LM."""
    import json

    from peftguard.artifacts import check_output_file, looks_like_json_with, write_json
    from peftguard.data import subsample
    from peftguard.defenses.onion import CausalLMScorer
    from peftguard.errors import OptionError
    from peftguard.models import model_reference
    from peftguard.stealth import STEALTH_KEYS, stealthiness

    check_options(locals())
    if split not in ("train", "dev", "test"):
        raise OptionError(f"--split must be train, dev or test, got '{split}'")
    if out is not None:
        check_output_file(out, kind="stealth file", made_here=lambda path: looks_like_json_with(path, STEALTH_KEYS),
                          inputs=(dataset, data_dir, paraphrases), models=(lm,), overwrite=overwrite)
    _setup_logging(verbose)
    data = _dataset(dataset, data_dir, text_column, label_column)
    options = _options(allow_pickle, trust_remote_code)
    triggers = _triggers(attack, trigger, trigger_count, data, paraphrases, None, options)
    examples = subsample(data.split(split).examples, max_eval_samples, seed)
    scorer = CausalLMScorer(lm, options=options, batch_size=batch_size, max_length=max_length, precision="fp32")
    result = {"lm": model_reference(lm), "dataset": data.name, "split": split, "target_label": target_label, "seed": seed,
              "attacks": stealthiness(examples, triggers, scorer, target_label=target_label, seed=seed)}
    if out:
        write_json(out, result)
    typer.echo(json.dumps(result, indent=2))


@psim_app.command("train")
def psim_train(
    model: Annotated[str, typer.Option("--model", help="The (possibly poisoned) weights to guard: a folder, 'minilm', or a hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PSIM (adapter safetensors + psim.json).")],
    dataset: DatasetOpt = "sst2",
    method: Annotated[str, PSIM_METHOD_OPTION] = AUTO_PSIM_METHOD,
    reset_rate: Annotated[float, typer.Option("--reset-rate", help="Share of training labels reset at random (paper: 1.0).")] = 1.0,
    num_virtual_tokens: Annotated[Optional[int], typer.Option("--num-virtual-tokens", help="Virtual tokens [5].")] = None,
    encoder_hidden_size: Annotated[Optional[int], typer.Option("--encoder-hidden-size", help="P-tuning v1 encoder width [128].")] = None,
    lora_target_modules: LoraTargetsOpt = None,
    gamma: GammaOpt = None,
    target_fpr: FprOpt = None,
    data_dir: DataDirOpt = None,
    text_column: TextColOpt = "text",
    label_column: LabelColOpt = "label",
    max_train_samples: MaxTrainOpt = None,
    max_eval_samples: MaxEvalOpt = None,
    epochs: Annotated[Optional[int], typer.Option(
        "--epochs", help="Train exactly this many epochs under a linear schedule (the paper: 1) instead of the "
                         "clean-data budget rule.")] = None,
    max_epochs: Annotated[Optional[int], typer.Option(
        "--max-epochs", help="Budget rule: give up after this many epochs [4].")] = None,
    max_restarts: Annotated[Optional[int], typer.Option(
        "--max-restarts", help="Budget rule: when clean dev confidence is still above the target after one epoch, "
                               f"start again with another seed (seed + {RESTART_SEED_STRIDE} per restart), at most this often "
                               f"[{BudgetRule().max_restarts}]; 0: never.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help=f"Learning rate [{DEFAULT_PSIM_LR:g}].")] = None,
    batch_size: BatchOpt = 32,
    max_length: MaxLenOpt = 128,
    seed: SeedOpt = 0,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Train a PSIM: a PEFT module on the given weights with training labels reset at random.

    By default training stops by a rule that reads only clean dev data: at the first check (every
    1/8 epoch) where the mean clean confidence is within a fifth of the way from chance (1/K) to
    certainty; if it gets stuck above that or runs out of budget, psim.json says under_trained.
    """
    from peftguard.defenses.psim import MANIFEST, resolve_psim_method, train_psim

    check_options(locals())
    _output_folder(out, MANIFEST, "PSIM", inputs=(dataset, data_dir), models=(model,), overwrite=overwrite)
    _setup_logging(verbose)
    if epochs is not None and (max_epochs is not None or max_restarts is not None):
        raise PeftguardError("give --epochs (a fixed schedule) or the budget rule's --max-epochs/--max-restarts, not both")
    method = resolve_psim_method(method, model, _options(allow_pickle, trust_remote_code))
    config = _method_config(method, num_virtual_tokens, encoder_hidden_size, None, lora_target_modules)
    _check_architecture(model, method, config, trust_remote_code)
    data = _dataset(dataset, data_dir, text_column, label_column)
    settings = _settings(epochs, lr, batch_size, max_length, seed, default_epochs=1, default_lr=DEFAULT_PSIM_LR)
    rule_options = {"max_epochs": max_epochs, "max_restarts": max_restarts}
    budget = None if epochs is not None else BudgetRule(**{k: v for k, v in rule_options.items() if v is not None})
    manifest = train_psim(
        model, data, settings, out, config=config, budget=budget, reset_rate=reset_rate, gamma=gamma,
        target_fpr=target_fpr, max_train_samples=max_train_samples, max_eval_samples=max_eval_samples,
        options=_options(allow_pickle, trust_remote_code),
    )
    choice = manifest["gamma_choice"]
    how = "fixed" if choice["how"] == "fixed" else f"calibrated to FPR {choice['target_fpr']} on {choice['calibration_samples']} clean dev samples"
    trained = manifest["training"]
    stop = manifest["budget"]["stop_reason"]
    typer.echo(f"PSIM saved to {out}; {trained['steps']} steps ({stop}), clean dev confidence "
               f"{manifest['dev_confidence_mean']:.3f}; gamma {manifest['gamma']:.4f} ({how})")


@psim_app.command("scan")
def psim_scan(
    psim: Annotated[Path, typer.Option("--psim", help="PSIM folder, or its ONNX export (`psim export`: starts in under a second, no torch).")],
    input: Annotated[str, typer.Option("--input", help="CSV/TSV (text column), JSONL, or plain text lines; '-' reads stdin.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Write results here (.csv or .jsonl); default stdout as CSV.")] = None,
    text_column: TextColOpt = "text",
    gamma: GammaOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Inference batch size.")] = 64,
    precision: PrecisionOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Score inputs with a PSIM: one row per input with its confidence and whether it is flagged."""
    from peftguard.artifacts import check_output_file
    from peftguard.scan import is_scan_output, scan_command

    check_options(locals())
    if out is not None:
        check_output_file(out, kind="scan result", made_here=is_scan_output, inputs=(input,), models=(psim,),
                          overwrite=overwrite)
    _setup_logging(verbose)
    scan_command(psim, input, out, text_column=text_column, gamma=gamma, batch_size=batch_size,
                 allow_pickle=allow_pickle, precision=precision)


@psim_app.command("export")
def psim_export(
    psim: Annotated[Path, typer.Option("--psim", help="PSIM folder (from `psim train` or a grid's PSIM stage).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the export: model.onnx, model.int8.onnx, tokenizer.json, psim-onnx.json.")],
    allow_pickle: AllowPickleOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Export a PSIM to ONNX (float32 and int8) for `psim scan --psim OUT`, which then runs on onnxruntime without torch.

    The export is refused unless its float32 graph gives the PSIM's probabilities to 1e-4 on a check batch.
    Needs the extra: pip install 'peftguard[onnx]'.
    """
    from peftguard.defenses.psim_onnx import MANIFEST, export_psim

    _output_folder(out, MANIFEST, "exported PSIM", models=(psim,), overwrite=overwrite)
    _setup_logging(verbose)
    manifest = export_psim(psim, out, options=_options(allow_pickle, False))
    check = manifest["export_check"]["max_probability_difference"]
    typer.echo(f"exported {psim} to {out}; largest probability change on the check batch: float32 {check['fp32']:.1e}, "
               f"int8 {check['int8']:.3f} (inputs near gamma are re-scored in float32); gamma {manifest['gamma']:.4f}")


@psim_app.command("serve")
def psim_serve(
    psim: Annotated[Path, typer.Option("--psim", help="PSIM folder, or its ONNX export (`psim export`).")],
    victim: Annotated[Optional[Path], typer.Option("--victim", help="A victim folder to answer with its label behind the PSIM [none: flags and confidences only].")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free port, printed).")] = 8321,
    gamma: GammaOpt = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most inputs scored in one forward (requests are batched together).")] = 64,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="How long a batch waits for more requests before it runs.")] = 5.0,
    queue_limit: Annotated[int, typer.Option("--queue-limit", help="Most inputs waiting; beyond it requests get HTTP 503.")] = 1024,
    precision: PrecisionOpt = "auto",
    allow_pickle: AllowPickleOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Serve screening over HTTP: POST /screen {"texts": [...]} → label or "rejected as poisoned", with confidence."""
    from peftguard.serve import ServeSettings, serve_command

    _setup_logging(verbose)
    settings = ServeSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, queue_limit=queue_limit)
    serve_command(psim, victim, host=host, port=port, gamma=gamma, settings=settings, precision=precision,
                  options=_options(allow_pickle, False))


@app.command()
def audit(
    model: Annotated[str, typer.Option("--model", help="The suspect: a model folder (plain, poisoned, fine-tuned), a PEFT adapter folder (audited on its base), 'minilm', or a hub id as owner/name[@revision].")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for audit.json, AUDIT.md, the histogram and the PSIM [runs/audit-<model folder name>].")] = None,
    dataset: DatasetOpt = "sst2",
    reference: Annotated[Optional[str], typer.Option("--reference", help="A known-clean base of the suspect: the words whose embedding rows moved most join the search, and the same audit runs on it (OUT/reference; about doubles the time), each candidate's flag rate there reported beside the suspect's (the verdict stays the suspect's).")] = None,
    lens: Annotated[str, typer.Option("--lens", help="auto: the classifier lens on datasets of more than two labels, the PSIM lens on two-label ones (measured best on the held-apart zoo: REPRODUCTION.md); psim: a PSIM trained on the suspect weights; classifier: the suspect's own predictions (the classic scanners' lens).")] = "auto",
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Candidates reported [10].")] = None,
    vocabulary: Annotated[Optional[Path], typer.Option("--vocabulary", help="Screen only the words in this file (one a line) instead of the whole vocabulary.")] = None,
    pairs: Annotated[Optional[int], typer.Option("--pairs", help="Word pairs most frequent in the clean training texts screened beside the words: how sentence triggers of common words are found [20000, about the vocabulary's size; 0: none].")] = None,
    proposals: Annotated[Optional[int], typer.Option("--proposals", help="PSIM lens: per label, the words the suspect classifier is pushed by most and the clean task does not explain; they and their pairs are judged by the PSIM, the best verified beside the search's [0: off; measured on the zoo's sixth part, where they changed no verdict and were not made the default: REPRODUCTION.md].")] = None,
    data_dir: DataDirOpt = None,
    text_column: TextColOpt = "text",
    label_column: LabelColOpt = "label",
    max_train_samples: Annotated[Optional[int], typer.Option("--max-train-samples", help="PSIM's training subset (random labels) [2000: keeps a MiniLM audit near 10 minutes on 2 cores].")] = None,
    max_eval_samples: Annotated[Optional[int], typer.Option("--max-eval-samples", help="Clean dev subset: PSIM's stopping rule and gamma, the search's inputs and the held-back verification inputs [2000].")] = None,
    max_length: MaxLenOpt = 128,
    batch_size: BatchOpt = 32,
    precision: Annotated[str, typer.Option("--precision", help="fp32 | bf16 | auto: precision of the search's ranking steps (auto: bf16 where the hardware multiplies it, about 2x faster); verification and the verdict are always float32.")] = "auto",
    max_restarts: Annotated[Optional[int], typer.Option("--max-restarts", help=f"PSIM's budget rule, as in psim train: a search still above the clean target after one epoch starts again with another seed, at most this often [{BudgetRule().max_restarts}]; 0: never.")] = None,
    seed: SeedOpt = 0,
    allow_pickle: AllowPickleOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Is this model backdoored, and by what trigger? Exit status 0: no evidence, 1: backdoored, 2: usage or input error.

    On a two-label dataset it trains a PSIM on the suspect weights (clean data only, random labels) and searches the
    vocabulary and short phrases for insertions that make the PSIM confident on clean inputs; with more labels it
    searches for insertions that flip the suspect's own predictions (--lens chooses). The best are verified on
    held-back clean inputs; audit.json and AUDIT.md are written. Nothing is tuned on triggered data.
    """
    from dataclasses import replace

    from peftguard.audit.run import (
        DEFAULT_AUDIT_EVAL_SAMPLES, DEFAULT_AUDIT_TRAIN_SAMPLES, MARKER, AuditRequest, exit_status, read_word_list, run_audit,
    )
    from peftguard.audit.search import SearchSettings

    check_options(locals())
    out = out if out is not None else Path("runs") / f"audit-{Path(model.split('@')[0]).name or 'model'}"
    _output_folder(out, MARKER, "audit", inputs=(dataset, data_dir, vocabulary), models=(model, reference), overwrite=overwrite)
    _setup_logging(verbose)
    data = _dataset(dataset, data_dir, text_column, label_column)
    search = SearchSettings()
    search = search if top_k is None else replace(search, top_k=top_k)
    search = search if pairs is None else replace(search, pair_screen=pairs)
    search = search if proposals is None else replace(search, proposal_words=proposals)
    request = AuditRequest(
        model=model, dataset=data, out=out, reference=reference, lens=lens,  # type: ignore[arg-type]
        max_train_samples=max_train_samples if max_train_samples is not None else DEFAULT_AUDIT_TRAIN_SAMPLES,
        max_eval_samples=max_eval_samples if max_eval_samples is not None else DEFAULT_AUDIT_EVAL_SAMPLES,
        seed=seed, max_length=max_length, batch_size=batch_size, search=search,
        precision=precision, vocabulary=read_word_list(vocabulary) if vocabulary is not None else None,
        psim_budget=BudgetRule() if max_restarts is None else BudgetRule(max_restarts=max_restarts),
        options=_options(allow_pickle, False),
    )
    record = run_audit(request, echo=lambda message: typer.echo(message, err=True))
    best = record["candidates"][0] if record["candidates"] else None
    found = f"; best candidate '{best['text']}' (flag rate {best['flag_rate']:.2f}, forces label {best['forced_label']})" if best else ""
    typer.echo(f"{record['verdict']}: score {record['score']:.3f} (threshold {record['threshold']}){found}; "
               f"{record['seconds']['total']:.0f} s; report in {out / 'AUDIT.md'}")
    raise typer.Exit(exit_status(record))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run folder (as `peftguard run` writes it): stages/, cells.json, report/.")] = Path("runs/demo"),
    config: Annotated[Optional[Path], typer.Option("--config", help="The demo's grid config (default: demo.yaml inside the package, src/peftguard/demo.yaml); the options below override its keys.")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="grid.datasets: sst2|cr|cola|mr|imdb|agnews or a folder.")] = None,
    attack: Annotated[Optional[str], typer.Option("--attack", help="grid.attacks: badnet (rare word) or insent (sentence).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="grid.models: 'minilm', a local model folder, or a hub id.")] = None,
    data_dir: DataDirOpt = None,
    max_train_samples: Annotated[Optional[int], typer.Option("--max-train-samples", help="data.max_train_samples: training subset per stage (the demo's keeps it within 45 minutes on 2 cores).")] = None,
    max_eval_samples: MaxEvalOpt = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="victim.epochs: victim fine-tuning epochs.")] = None,
    poison_epochs: Annotated[Optional[int], typer.Option("--poison-epochs", help="poison.epochs: weight-poisoning epochs.")] = None,
    psim_epochs: Annotated[Optional[int], typer.Option(
        "--psim-epochs", help="psim.epochs: a fixed number of epochs (the paper: 1) instead of the clean-data budget rule.")] = None,
    methods: Annotated[Optional[list[str]], typer.Option("--method", help="grid.methods: fine-tuning method to include (repeat).")] = None,
    defenses: Annotated[Optional[list[str]], DEMO_DEFENSE_OPTION] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Tokens per text in every stage.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="grid.seeds: one seed.")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Run this many stages at once in worker processes, each on cores / workers threads (as `peftguard run --workers`).")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into --out even if it is not a run folder (files of the same names are replaced; never an input).")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """The main job: poison MiniLM on SST-2, fine-tune with all five methods, train a PSIM, print Table 2 (full data knowledge)."""
    from peftguard.demo import demo_config, run_demo
    from peftguard.experiment import CELLS_FILE

    check_options(locals())
    experiment = demo_config(config, tuple(defenses or ()), dataset=dataset, attack=attack, model=model, data_dir=data_dir,
                             max_train_samples=max_train_samples, max_eval_samples=max_eval_samples, epochs=epochs,
                             poison_epochs=poison_epochs, psim_epochs=psim_epochs, methods=tuple(methods or ()),
                             max_length=max_length, seed=seed)
    _output_folder(out, CELLS_FILE, "run folder", inputs=(config, *experiment.grid.datasets, data_dir),
                   models=tuple(experiment.grid.models), overwrite=overwrite)
    _setup_logging(verbose)
    typer.echo(run_demo(out, experiment, workers=workers, echo=lambda message: typer.echo(f"demo: {message}", err=True)))


@defend_app.command("fine-mixing")
def defend_fine_mixing(
    model: Annotated[str, typer.Option("--model", help="A victim folder (its fine-tuning is replayed on mixed weights), or a poisoned model with --method.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the fine-mixed victim (finetune.json; a PEFT victim keeps its mixed base in mixed/).")],
    mix_ratio: Annotated[Optional[float], typer.Option("--mix-ratio", help="Share of weights kept from the suspect model: 0 = clean model, 1 = suspect [a victim: chosen on clean dev data (defenses/fine_mixing.py, RatioSearch); a poisoned model: required].")] = None,
    clean_model: Annotated[Optional[str], typer.Option("--clean-model", help="The clean pretrained model [the base_model in poisoning.json].")] = None,
    method: Annotated[Optional[str], MIXING_METHOD_OPTION] = None,
    dataset: DatasetOpt = "sst2",
    data_dir: DataDirOpt = None,
    text_column: TextColOpt = "text",
    label_column: LabelColOpt = "label",
    max_train_samples: Annotated[Optional[int], typer.Option("--max-train-samples", help="Clean training subset [a victim's own; else all].")] = None,
    max_eval_samples: MaxEvalOpt = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="With a poisoned model: training epochs [2].")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="With a poisoned model: learning rate [per method].")] = None,
    seed: SeedOpt = 0,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fine-mixing (Zhang et al., 2022): mix suspect weights with clean ones, fine-tune on clean data."""
    from peftguard.defenses.fine_mixing import FineMixingConfig, FineMixingDefense, fine_mix
    from peftguard.victims import MANIFEST as VICTIM_MANIFEST

    check_options(locals())
    _output_folder(out, VICTIM_MANIFEST, "fine-mixed victim", inputs=(dataset, data_dir), models=(model, clean_model),
                   overwrite=overwrite)
    _setup_logging(verbose)
    data = _dataset(dataset, data_dir, text_column, label_column)
    mixing = FineMixingConfig(mix_ratio=mix_ratio, clean_model=clean_model, seed=seed)
    options = _options(allow_pickle, trust_remote_code)
    if (Path(model) / VICTIM_MANIFEST).is_file():
        if method is not None or epochs is not None or lr is not None:
            raise PeftguardError(f"{model} is a victim: its method and settings are replayed; --method/--epochs/--lr are for a poisoned model")
        defense = FineMixingDefense(mixing, data, out_dir=out, max_train_samples=max_train_samples,
                                    max_eval_samples=max_eval_samples, options=options)
        defense.defend(model)  # the same folder `evaluate --defense fine-mixing --fine-mixed OUT` makes and reuses
        manifest = defense.manifest
    else:
        config = _method_config(method or "lora", None, None, None)
        settings = _settings(epochs, lr, 32, 128, seed, default_epochs=2, default_lr=config.lr)
        manifest = fine_mix(model, data, config, settings, out, mixing=mixing, max_train_samples=max_train_samples,
                            max_eval_samples=max_eval_samples, options=options)
    record = manifest["defense"]
    chosen = ", chosen on clean dev" if "selection" in record else ""
    typer.echo(f"fine-mixed {manifest['method']} victim in {out} (mix ratio {record['mix_ratio']:g}{chosen}): "
               f"{record['kept_from_suspect']:.3f} of the weights "
               f"from {record['suspect_model']}, the rest from {record['clean_model']}; best dev accuracy "
               f"{max(manifest['training']['dev_accuracy'] or [float('nan')]):.4f}")


@defend_app.command("fine-pruning")
def defend_fine_pruning(
    model: Annotated[str, typer.Option("--model", help="A victim folder (finetune.json): it is pruned, then fine-tuned again with its own method.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the fine-pruned victim (finetune.json; a PEFT victim keeps its pruned base in pruned/).")],
    max_accuracy_drop: Annotated[Optional[float], typer.Option("--max-accuracy-drop", help="Largest fall of clean dev accuracy pruning may cause, fixed in advance [0.04, the paper's].")] = None,
    step: Annotated[Optional[float], typer.Option("--step", help="Share of each layer's FFN neurons pruned per step [0.05].")] = None,
    layers: Annotated[Optional[int], typer.Option("--layers", help="How many of the last transformer layers have their FFN pruned [1].")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="Fine-tuning epochs after pruning, at the victim's own settings [1].")] = None,
    dataset: DatasetOpt = "sst2",
    data_dir: DataDirOpt = None,
    text_column: TextColOpt = "text",
    label_column: LabelColOpt = "label",
    max_train_samples: Annotated[Optional[int], typer.Option("--max-train-samples", help="Clean training subset [the victim's own].")] = None,
    max_eval_samples: MaxEvalOpt = None,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: RemoteCodeOpt = False,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Fine-pruning (Liu et al., 2018): prune FFN neurons dormant on clean dev data, fine-tune on clean data."""
    from peftguard.defenses.fine_pruning import FinePruningDefense
    from peftguard.defenses.registry import make_options
    from peftguard.victims import MANIFEST as VICTIM_MANIFEST

    check_options(locals())
    given = {"max_accuracy_drop": max_accuracy_drop, "step": step, "layers": layers, "epochs": epochs}
    options = make_options("fine-pruning", {**{k: v for k, v in given.items() if v is not None},
                                            "fine_pruned": out, "max_train_samples": max_train_samples})
    _output_folder(out, VICTIM_MANIFEST, "fine-pruned victim", inputs=(dataset, data_dir), models=(model,), overwrite=overwrite)
    _setup_logging(verbose)
    data = _dataset(dataset, data_dir, text_column, label_column)
    defense = FinePruningDefense(options, data, max_eval_samples=max_eval_samples,
                                 load_options=_options(allow_pickle, trust_remote_code))
    defense.defend(model)  # the same folder `evaluate --defense fine-pruning --fine-pruned OUT` makes and reuses
    record = defense.describe()
    typer.echo(f"fine-pruned {record['method']} victim in {out}: {record['pruned_share']:.0%} of the FFN neurons of "
               f"{len(record['neurons_per_layer'])} layer(s) pruned; clean dev accuracy {record['dev_accuracy_before']:.4f} "
               f"-> {record['dev_accuracy_pruned']:.4f} pruned, then fine-tuned")


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Experiment config (YAML): a grid of models, datasets, attacks, methods, defenses, seeds.")],
    out: Annotated[Path, typer.Option("--out", help="Run folder: stages/, cells.json, run.log; rerun to resume.")],
    executor: Annotated[str, typer.Option("--executor", help="local (in this process) or ray (stages as Ray tasks).")] = "local",
    workers: Annotated[int, typer.Option("--workers", min=1, help="local: run this many stages at once in worker processes, each after its dependencies (one large GPU or many cores); a failed stage no longer stops the others.")] = 1,
    address: Annotated[Optional[str], typer.Option("--address", help="Ray cluster address (default: start a local Ray).")] = None,
    cpus_per_stage: Annotated[Optional[int], typer.Option("--cpus-per-stage", help="Threads (and Ray CPUs) per stage [local: all cores, or cores / --workers; ray: 1].")] = None,
    stage_cache: Annotated[Optional[Path], typer.Option("--stage-cache", help="Keep stages in this shared folder, so runs of other configs reuse the stages they have in common.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the config and --out, print the stages and cells, run nothing.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Write the report when the grid finishes.")] = True,
    max_cells: Annotated[int, typer.Option("--max-cells", help="Refuse a grid with more result cells (or PSIM stages) than this.")] = MAX_CELLS,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into --out even if it is not a run folder (files of the same names are replaced).")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run an experiment grid: poison once, then victims and PSIMs, then evaluations; finished stages are reused."""
    from peftguard.config import load_config
    from peftguard.errors import OptionError
    from peftguard.experiment import (CELLS_FILE, check_grid_size, is_done_in, link_stage_cache, plan_grid,
                                      run_on_this_machine, run_ray, write_plan)

    check_options(locals())
    if executor not in ("local", "ray"):
        raise OptionError(f"unknown --executor '{executor}'; choose local or ray")
    if workers > 1 and executor != "local":
        raise OptionError("--workers is for --executor local (Ray schedules its own tasks)")
    _setup_logging(verbose)
    experiment = load_config(config)
    check_grid_size(experiment, max_cells)
    _output_folder(out, CELLS_FILE, "run folder", inputs=(config,), overwrite=overwrite)
    plan = plan_grid(experiment)
    if dry_run:
        stages_root = stage_cache if stage_cache is not None else out / "stages"
        for stage in plan.stages.values():
            typer.echo(f"{stage.name}{' (done)' if is_done_in(stages_root, stage) else ''} <- {', '.join(stage.deps) or '-'}")
        typer.echo(f"{len(plan.stages)} stages, {len(plan.cells)} cells")
        return
    write_plan(out, experiment, plan)  # first: it makes --out a run folder (cells.json), so a rerun resumes
    if stage_cache is not None:
        link_stage_cache(out, stage_cache)
    echo = lambda message: typer.echo(message, err=True)  # noqa: E731
    if executor == "local":
        counts = run_on_this_machine(out, plan, workers=workers, threads=cpus_per_stage, echo=echo)
    else:
        counts = run_ray(out, plan, address=address, cpus_per_stage=cpus_per_stage or 1, echo=echo)
    typer.echo(f"{experiment.name}: {counts['ran']} stages run, {counts['reused']} reused; results in {out}")
    if report:
        from peftguard.report import write_report

        for path in write_report(out):
            typer.echo(f"wrote {path}")


@app.command("report")
def report_command(
    run_dir: Annotated[Path, typer.Argument(help="A run folder written by `peftguard run`.")],
    out: Annotated[Optional[Path], typer.Option("--out", help="Report folder [RUN_DIR/report].")] = None,
    record: Annotated[Optional[Path], typer.Option("--record", help="Instead: write the run's compact, committable record here (table.md, cells.csv, cells/*.json; no plots, no per-input scores), e.g. results/<table>.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into --out/--record even if it is not a report folder (files of the same names are replaced).")] = False,
) -> None:
    """Write a run's results in the paper's table layout (Markdown, CSV, LaTeX) and its plots (PNG)."""
    from peftguard.report import REPORT_MARKER, write_record, write_report

    if record is not None and out is not None:
        raise typer.BadParameter("give --out (a full report) or --record (the committable record), not both")
    target = record if record is not None else out
    if target is not None:
        _output_folder(target, REPORT_MARKER, "report", inputs=(run_dir,), overwrite=overwrite)
    for path in (write_record(run_dir, record) if record is not None else write_report(run_dir, out)):
        typer.echo(f"wrote {path}")


@app.command("schema")
def schema_command() -> None:
    """Print the JSON Schema of experiment configs, for editors: `peftguard schema > experiment.schema.json`."""
    from peftguard.schema import schema_text

    typer.echo(schema_text(), nl=False)


def main() -> None:
    """Entry point: user and usage errors print one line and exit 2; outputs are atomic, so Ctrl-C leaves none half-written."""
    from typer._click import exceptions as click  # typer's own copy of click (typer >= 0.24 vendors it)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        configure_threads()  # torch threads from $PEFTGUARD_THREADS or the cores (peftguard.runtime)
        if "--help" in sys.argv[1:]:
            describe_registries()
        code = app(standalone_mode=False)
    except PeftguardError as exc:
        _fail(str(exc), 2)
    except click.NoArgsIsHelpError as exc:  # a bare command group: its help, as click would show it
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # a malformed option (--batch-size abc): one line, not a usage panel
        hint = f" (see {exc.ctx.command_path} --help)" if isinstance(exc, click.UsageError) and exc.ctx else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except KeyboardInterrupt:  # typer's click has no Abort: Ctrl-C arrives as itself
        typer.echo("Aborted!", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
