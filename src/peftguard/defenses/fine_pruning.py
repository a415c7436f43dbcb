"""Fine-pruning (Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018): prune the neurons that clean inputs leave dormant, then fine-tune.

A backdoor tends to live in neurons that clean inputs do not use. The paper ranks the neurons of
the network's last convolutional layer by their mean activation on clean validation data, prunes
them in increasing order of activation until clean validation accuracy has fallen by a margin set
in advance, and fine-tunes the pruned network on clean training data, which
also repairs what pruning cost.

Here the neurons are those of the feed-forward block (FFN) of the victim's last transformer
layer(s): the inputs of its down projection (BERT ``output.dense``, Llama ``down_proj``), measured
with the victim as deployed (its adapter or prompt included) on the evaluation's clean dev subset,
averaged over real (non-padding) positions. A pruned neuron's weights into and out of the FFN are
set to zero; they stay zero under fine-tuning (their gradient is zero), and are set to zero again
after it. The kept share is the largest share, in steps of ``step``, whose clean dev accuracy is at
most ``max_accuracy_drop`` below the victim's. The victim's own fine-tuning method then trains
``epochs`` more epochs on its clean training subset, at its own settings (the LoRA matrices and
head, the prompt encoder and head, or every weight for full fine-tuning); the base weights a PEFT
method freezes keep their pruned zeros.

Departures from the paper:

* The default margin, 4 points of clean dev accuracy, is our reading of the paper's setting, not
  checked against its text here; it is fixed a priori, never fitted.
* Transformer FFN neurons instead of convolutional channels (the paper studies CNNs).
* Pruning advances in steps of ``step`` of each layer's neurons (one dev pass each), not one neuron
  at a time; the last step within the accuracy bound is kept.
* The accuracy bound is checked on the evaluation's clean dev subset, which also chooses the best
  fine-tuning epoch, as for every victim here.
* Refused (one-line error) where it cannot apply: a victim whose adapter wraps the FFN's own
  projections (LoRA aimed at them, IA3 on the down projection: its update would bring pruned neurons
  back or rescale them), a model whose config gives no
  ``intermediate_size``, and instruction-tuned LMs (label words), as for Fine-mixing.
* Prompt methods (prompt tuning, P-tuning v1/v2): peft saves only the prompt's output embeddings
  (not P-tuning's encoder MLP), so the fine-tuning after pruning trains those embeddings and the
  head directly.
"""
from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftguard.artifacts import atomic_dir
from peftguard.data import Example, TextDataset, subsample
from peftguard.defenses.base import DefenseContext, ModelDefense
from peftguard.defenses.fine_mixing import ReplayPlan, replay_plan, replayed_victim_manifest
from peftguard.defenses.registry import register_defense
from peftguard.errors import OptionError
from peftguard.instruction import read_template
from peftguard.inference import collate, encode, flush_denormals, predict_proba
from peftguard.manifests import read_manifest
from peftguard.models import LoadOptions, load_classifier, load_tokenizer, model_reference
from peftguard.training import seed_everything, train_classifier, training_record
from peftguard.tuning import METHODS, check_adapter_fits, method_name, write_tuned
from peftguard.victims import MANIFEST as VICTIM_MANIFEST

PRUNED_FOLDER = "pruned"  # inside a fine-pruned PEFT victim: the pruned base its adapter sits on
PRUNED_MANIFEST = "fine_pruning.json"


@dataclass(frozen=True)
class FinePruningOptions:
    max_accuracy_drop: float = field(default=0.04, metadata={
        "help": "largest fall of clean dev accuracy pruning may cause, fixed in advance (0.04: our reading of the paper)"})
    step: float = field(default=0.05, metadata={"help": "share of each layer's FFN neurons pruned per step"})
    layers: int = field(default=1, metadata={"help": "how many of the last transformer layers have their FFN pruned"})
    epochs: int = field(default=1, metadata={"help": "fine-tuning epochs after pruning, at the victim's own settings"})
    fine_pruned: Path | None = field(default=None, metadata={
        "help": "keep the fine-pruned victim here (reused if it holds the same one) [temporary]", "flag": "--fine-pruned",
        "grid": False})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "clean training subset [the victim's]", "flag": "--max-train-samples", "grid": False})

    def __post_init__(self) -> None:
        if not 0 <= self.max_accuracy_drop < 1:
            raise OptionError(f"fine-pruning max_accuracy_drop must be in [0, 1), got {self.max_accuracy_drop}")
        if not 0 < self.step <= 1:
            raise OptionError(f"fine-pruning step must be in (0, 1], got {self.step}")
        if self.layers < 1 or self.epochs < 1:
            raise OptionError(f"fine-pruning needs layers >= 1 and epochs >= 1, got {self.layers}, {self.epochs}")


@dataclass
class FeedForward:
    """One transformer layer's FFN: the projections into its neurons (rows) and out of them (columns)."""

    block: str  # module path of the transformer layer
    down: str  # module path of the projection out of the neurons
    ups: list[str]  # module paths of the projections into the neurons (up, and gate where there is one)


def feed_forwards(model: torch.nn.Module, layers: int) -> list[FeedForward]:
    """The FFNs of the last ``layers`` transformer layers of ``model`` (a classifier, bare or peft-wrapped)."""
    config = model.config
    inner, hidden = getattr(config, "intermediate_size", None), getattr(config, "hidden_size", None)
    if not inner or not hidden:
        raise OptionError(f"fine-pruning reads the FFN size from the model config (intermediate_size, hidden_size); "
                          f"{type(model).__name__} gives none")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    by_block: dict[str, FeedForward] = {}
    for name, module in linears.items():
        block = _block_of(name)
        if block is None:
            continue
        if (module.in_features, module.out_features) == (inner, hidden):
            by_block.setdefault(block, FeedForward(block, "", [])).down = name
        elif (module.in_features, module.out_features) == (hidden, inner):
            by_block.setdefault(block, FeedForward(block, "", [])).ups.append(name)
    found = [ffn for ffn in by_block.values() if ffn.down and ffn.ups]
    if not found:
        raise OptionError(f"fine-pruning found no feed-forward layers of size {hidden}->{inner}->{hidden} in {type(model).__name__}")
    found.sort(key=lambda ffn: int(ffn.block.rsplit(".", 1)[1]))
    chosen = found[-layers:]
    wrapped = [name for ffn in chosen for name in (ffn.down, *ffn.ups) if name.endswith(".base_layer")]
    if wrapped:
        raise OptionError(f"the victim's adapter wraps the FFN projection {wrapped[0].removesuffix('.base_layer')}: its update "
                          "would bring pruned neurons back; fine-pruning needs an FFN the victim's method leaves frozen")
    return chosen


def _block_of(name: str) -> str | None:
    """The path of the numbered transformer layer a module sits in (``...layer.11``), if any."""
    match = re.match(r"(.*?\.\d+)\.", name)
    return match.group(1) if match else None


@torch.inference_mode()
def mean_activations(model: Any, tokenizer: Any, ffns: Sequence[FeedForward], texts: Sequence[str], *,
                     batch_size: int = 64, max_length: int = 128) -> list[np.ndarray]:
    """Each FFN neuron's mean activation over the real positions of ``texts`` (virtual prompt tokens included)."""
    flush_denormals()
    model.eval()
    sums: list[torch.Tensor | float] = [0.0] * len(ffns)
    counts = [0.0] * len(ffns)
    current: dict[str, torch.Tensor] = {}

    def hook(index: int):
        def record(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            activation, mask = inputs[0].float(), current["mask"]
            extra = activation.shape[1] - mask.shape[1]  # prompt methods prepend virtual tokens, always attended
            if extra > 0:
                mask = torch.cat([torch.ones(mask.shape[0], extra), mask], dim=1)
            sums[index] = sums[index] + (activation * mask[..., None]).sum(dim=(0, 1))
            counts[index] += float(mask.sum())
        return record

    handles = [model.get_submodule(ffn.down).register_forward_pre_hook(hook(i)) for i, ffn in enumerate(ffns)]
    try:
        ids, _ = encode(tokenizer, list(texts), max_length)
        for start in range(0, len(ids), batch_size):
            batch = collate(tokenizer, ids[start:start + batch_size])
            current["mask"] = batch["attention_mask"].float()
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    if not all(counts):
        raise OptionError("fine-pruning measured no FFN activations on the clean dev inputs (empty dev set?)")
    return [(total / count).numpy() for total, count in zip(sums, counts)]


class Pruner:
    """Zeroes the lowest-activation FFN neurons of a model, at any share, from its original weights."""

    def __init__(self, model: torch.nn.Module, ffns: Sequence[FeedForward], activations: Sequence[np.ndarray]) -> None:
        self.model, self.ffns = model, list(ffns)
        self.orders = [np.argsort(a, kind="stable") for a in activations]  # least active first
        self.original = {name: self._weights(name) for ffn in self.ffns for name in (ffn.down, *ffn.ups)}

    def _weights(self, name: str) -> dict[str, torch.Tensor]:
        module = self.model.get_submodule(name)
        return {k: v.detach().clone() for k, v in (("weight", module.weight), ("bias", module.bias)) if v is not None}

    def pruned(self, share: float) -> dict[str, list[int]]:
        """The neurons pruned at ``share``: per FFN block, the indices (least active first)."""
        return {ffn.block: order[: int(round(share * len(order)))].tolist() for ffn, order in zip(self.ffns, self.orders)}

    @torch.no_grad()
    def apply(self, share: float) -> dict[str, list[int]]:
        """The original weights with the neurons of ``share`` zeroed; returns them."""
        chosen = self.pruned(share)
        for name, tensors in self.original.items():
            module = self.model.get_submodule(name)
            for key, value in tensors.items():
                getattr(module, key).copy_(value)
        zero_neurons(self.model, self.ffns, chosen)
        return chosen


@torch.no_grad()
def zero_neurons(model: torch.nn.Module, ffns: Sequence[FeedForward], chosen: dict[str, list[int]]) -> None:
    """Zero the weights into (rows and biases of the up/gate projections) and out of (down columns) ``chosen`` neurons."""
    for ffn in ffns:
        index = torch.tensor(chosen.get(ffn.block, []), dtype=torch.long)
        if len(index) == 0:
            continue
        model.get_submodule(ffn.down).weight[:, index] = 0
        for name in ffn.ups:
            up = model.get_submodule(name)
            up.weight[index, :] = 0
            if up.bias is not None:
                up.bias[index] = 0


def accuracy(model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int, max_length: int) -> float:
    probabilities = predict_proba(model, tokenizer, [ex.text for ex in examples], batch_size, max_length)
    return float((probabilities.argmax(1) == np.array([ex.label for ex in examples])).mean())


def choose_share(pruner: Pruner, measure: Any, bound: float, step: float) -> tuple[float, list[dict[str, float]]]:
    """The largest share (in steps of ``step``) whose accuracy stays within ``bound`` of the unpruned one; the trace."""
    baseline = measure()
    trace, kept = [{"share": 0.0, "dev_accuracy": baseline}], 0.0
    for k in range(1, int(np.floor(1 / step + 1e-9)) + 1):
        share = min(1.0, k * step)
        pruner.apply(share)
        trace.append({"share": share, "dev_accuracy": measure()})
        if baseline - trace[-1]["dev_accuracy"] > bound:
            break
        kept = share
    return kept, trace


def fine_pruning_plan(victim: str | Path) -> ReplayPlan:
    """How ``victim`` was tuned (its method and settings, which the fine-tuning after pruning reuses)."""
    if not (Path(victim) / VICTIM_MANIFEST).is_file():
        raise OptionError(f"{victim} is not a victim folder (no {VICTIM_MANIFEST}); fine-pruning prunes a fine-tuned victim "
                          "and tunes it again with its own method (`peftguard finetune` makes one)")
    if read_template(Path(victim)) is not None:
        raise OptionError(f"{victim} is an instruction-tuned LM; fine-pruning here handles classifiers only")
    return replay_plan(victim)


def load_trainable_victim(victim: str | Path, num_labels: int, options: LoadOptions) -> tuple[Any, Any, dict[str, Any], torch.nn.Module]:
    """The victim ready to train with its own method: (model, tokenizer, manifest, base classifier)."""
    from peft import PeftConfig, PeftModel

    folder = Path(victim)
    manifest = read_manifest(folder / VICTIM_MANIFEST)
    if METHODS[manifest["method"]].peft_type is None:
        model = load_classifier(str(folder), num_labels, options)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model, load_tokenizer(str(folder), options), manifest, model
    base = load_classifier(manifest["base_model"], num_labels, options)
    check_adapter_fits(folder, base, manifest)
    if not PeftConfig.from_pretrained(str(folder)).is_prompt_learning:
        return PeftModel.from_pretrained(base, folder, is_trainable=True), load_tokenizer(str(folder), options), manifest, base
    # peft saves a prompt method's output embeddings only (P-tuning's encoder MLP is not kept) and will not
    # load them trainable: load them as saved and train those embeddings and the head directly.
    model = PeftModel.from_pretrained(base, folder)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("prompt_encoder" in name or "modules_to_save" in name)
    return model, load_tokenizer(str(folder), options), manifest, base


def fine_prune(victim: str, dataset: TextDataset, out_dir: str | Path, *, options: FinePruningOptions = FinePruningOptions(),
               plan: ReplayPlan | None = None, max_train_samples: int | None = None, max_eval_samples: int | None = None,
               request: dict[str, Any] | None = None, load_options: LoadOptions = LoadOptions()) -> dict[str, Any]:
    """Prune the victim folder ``victim``'s dormant FFN neurons, fine-tune it, save it as a victim folder.

    A PEFT victim keeps its pruned base in ``<out_dir>/pruned``; a full victim holds all weights itself.
    """
    plan = plan or fine_pruning_plan(victim)
    settings = dataclasses.replace(plan.settings, epochs=options.epochs)
    started = time.perf_counter()
    seed_everything(settings.seed)
    model, tokenizer, source, base = load_trainable_victim(victim, dataset.num_labels, load_options)
    full = base is model
    ffns = feed_forwards(model, options.layers)
    dev = subsample(dataset.dev.examples, max_eval_samples, settings.seed)
    train = subsample(dataset.train.examples, max_train_samples or plan.train_samples, settings.seed)
    activations = mean_activations(model, tokenizer, ffns, [ex.text for ex in dev], max_length=settings.max_length)
    pruner = Pruner(model, ffns, activations)

    def measure() -> float:
        return accuracy(model, tokenizer, dev, settings.batch_size * 2, settings.max_length)

    share, trace = choose_share(pruner, measure, options.max_accuracy_drop, options.step)
    chosen = pruner.apply(share)
    in_base = [_relative(ffn, base) for ffn in ffns]  # the same FFNs, named as in the bare base model
    pruned = {plain.block: chosen[ffn.block] for ffn, plain in zip(ffns, in_base)}
    pruned_accuracy = measure()
    report = train_classifier(model, tokenizer, train, dev, settings, desc=f"fine-pruning {method_name(plan.config)}")
    zero_neurons(model, ffns, chosen)  # removed neurons stay removed, as in the paper
    out_dir = Path(out_dir).resolve()
    record = {
        "name": "fine-pruning", "source_victim": model_reference(victim), "request": request,
        "layers": [ffn.block for ffn in in_base], "neurons_per_layer": [len(a) for a in activations],
        "pruned_share": share, "pruned": pruned, "max_accuracy_drop": options.max_accuracy_drop, "step": options.step,
        "dev_accuracy_before": trace[0]["dev_accuracy"], "dev_accuracy_pruned": pruned_accuracy, "trace": trace,
    }
    with atomic_dir(out_dir) as tmp:
        if not full:  # the pruned base: a fresh copy of the victim's base with the same neurons zeroed
            clean_base = load_classifier(source["base_model"], dataset.num_labels, load_options)
            zero_neurons(clean_base, in_base, pruned)
            write_tuned(tmp / PRUNED_FOLDER, clean_base, tokenizer, PRUNED_MANIFEST, {"kind": "fine-pruned-model", **record})
        base_model = str(out_dir / PRUNED_FOLDER) if not full else source["base_model"]
        manifest = replayed_victim_manifest(plan.config, base_model, dataset, len(train),
                                            {**record, "seconds": round(time.perf_counter() - started, 2)},
                                            training_record(model, settings, report))
        write_tuned(tmp, model, tokenizer, VICTIM_MANIFEST, manifest)
    return manifest


def _relative(ffn: FeedForward, base: torch.nn.Module) -> FeedForward:
    """``ffn`` with its module paths as they are in the bare ``base`` (peft prefixes them)."""
    names = {name for name, _ in base.named_modules()}

    def strip(path: str) -> str:
        parts = path.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in names:
                return ".".join(parts[i:])
        raise OptionError(f"fine-pruning cannot find {path} in the victim's base model")

    return FeedForward(strip(ffn.block), strip(ffn.down), [strip(up) for up in ffn.ups])


class FinePruningDefense(ModelDefense):
    """Fine-pruning as a model-level defense: a victim folder in, a fine-pruned victim folder out.

    ``out_dir`` is reused when it already holds a fine-pruned victim of the same victim and settings.
    """

    name = "fine-pruning"

    def __init__(self, options: FinePruningOptions, dataset: TextDataset, *, max_eval_samples: int | None = None,
                 load_options: LoadOptions = LoadOptions()) -> None:
        self.options, self.dataset, self.max_eval_samples, self.load_options = options, dataset, max_eval_samples, load_options
        self._tmp = None if options.fine_pruned else tempfile.TemporaryDirectory(prefix="peftguard-fine-pruning-")
        self.out_dir = Path(options.fine_pruned) if options.fine_pruned else Path(self._tmp.name) / "victim"
        self.manifest: dict[str, Any] | None = None

    def defend(self, victim: str) -> str:
        plan = fine_pruning_plan(victim)
        samples = self.options.max_train_samples if self.options.max_train_samples is not None else plan.train_samples
        settings = {k: v for k, v in asdict(self.options).items() if k not in ("fine_pruned", "max_train_samples")}
        request = {"victim": model_reference(victim), "dataset": self.dataset.name, "max_train_samples": samples,
                   "max_eval_samples": self.max_eval_samples, **settings}
        existing = self.out_dir / VICTIM_MANIFEST
        if existing.is_file():
            manifest = read_manifest(existing)
            if manifest.get("defense", {}).get("request") != request:
                raise OptionError(f"{self.out_dir} holds another fine-pruned victim; choose another --fine-pruned folder or remove it")
            self.manifest = manifest  # made earlier with the same settings: reuse it
            return str(self.out_dir)
        self.manifest = fine_prune(victim, self.dataset, self.out_dir, options=self.options, plan=plan,
                                   max_train_samples=samples, max_eval_samples=self.max_eval_samples,
                                   request=request, load_options=self.load_options)
        return str(self.out_dir)

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "max_accuracy_drop": self.options.max_accuracy_drop, "step": self.options.step,
               "layers": self.options.layers, "epochs": self.options.epochs,
               "fine_pruned": None if self._tmp else str(self.out_dir)}
        if self.manifest is not None:
            made = self.manifest["defense"]
            out |= {key: made[key] for key in ("pruned_share", "neurons_per_layer", "dev_accuracy_before",
                                                "dev_accuracy_pruned", "seconds")}
            out |= {"method": self.manifest["method"], "train_samples": self.manifest["train_samples"],
                    "training_seconds": self.manifest["training"]["seconds"]}
        return out


@register_defense("fine-pruning", options=FinePruningOptions,
                  summary="prune FFN neurons dormant on clean data, fine-tune again (Liu et al., 2018)", order=5)
def build_fine_pruning(options: FinePruningOptions, context: DefenseContext) -> FinePruningDefense:
    """Fine-pruning measured on the evaluation's clean dev subset; a grid stage keeps the new victim in its own folder."""
    return FinePruningDefense(options, context.dataset, max_eval_samples=context.max_eval_samples, load_options=context.options)
