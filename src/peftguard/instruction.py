"""Instruction-formatted classification with a causal LM (paper Table 11, "instruction tuning").

The model reads an instruction with the input and answers with a label word; the prediction is the
label whose word scores highest at the answer position. The backdoor is planted by weight
poisoning on such instruction-formatted examples, and the poisoned model is then used directly.
The PSIM is a PEFT module on the same LM trained with reset label words.

A model folder carries its template in ``label_words.json``; every stage that loads the folder
(evaluate, psim train, finetune, scan) then reads it as a label-word classifier.

Departs from the paper: the paper states neither its template nor how answers are parsed. We
score the closed set of label words (first token of each) rather than parse free generation, so
ASR is the share of triggered non-target inputs whose highest-scoring word is the target's.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import SequenceClassifierOutput

from peftguard.errors import OptionError, PeftguardError

TEMPLATE_FILE = "label_words.json"


@dataclass(frozen=True)
class InstructionTemplate:
    """An instruction and the words that answer it, one per label (label i ↔ ``label_words[i]``)."""

    instruction: str
    label_words: tuple[str, ...]
    layout: str = "{instruction}\nInput: {text}\nAnswer:"

    def format(self, text: str) -> str:
        return self.layout.format(instruction=self.instruction, text=text)


TEMPLATES: dict[str, InstructionTemplate] = {
    "sentiment": InstructionTemplate(
        "Classify the sentiment of the input as negative or positive.", (" negative", " positive")
    ),
    "acceptability": InstructionTemplate(
        "Is the input a grammatically acceptable English sentence? Answer no or yes.", (" no", " yes")
    ),
    "topic": InstructionTemplate(
        "Classify the topic of the news input as world, sports, business or science.",
        (" world", " sports", " business", " science"),
    ),
}


def template_by_name(name: str) -> InstructionTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise OptionError(f"unknown instruction template '{name}'; choose from {', '.join(TEMPLATES)}") from None


def read_template(folder: Path) -> InstructionTemplate | None:
    path = folder / TEMPLATE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return InstructionTemplate(data["instruction"], tuple(data["label_words"]), data["layout"])


class TemplatedTokenizer:
    """A tokenizer that formats each text with the template, fitting long inputs to the length.

    Truncation cuts the input text, never the instruction or the answer cue after it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: InstructionTemplate) -> None:
        self.inner, self.template = tokenizer, template
        self.name_or_path = f"{tokenizer.name_or_path}|{template.format('')}"  # keys the encoding cache

    def __call__(self, texts: list[str], *, truncation: bool = False, max_length: int | None = None,
                 add_special_tokens: bool = True) -> Any:
        if truncation and max_length:
            texts = [self._fit(text, max_length) for text in texts]
        return self.inner([self.template.format(t) for t in texts], add_special_tokens=add_special_tokens)

    def _fit(self, text: str, max_length: int) -> str:
        overhead = len(self.inner(self.template.format(""))["input_ids"])
        ids = self.inner(text, add_special_tokens=False)["input_ids"]
        budget = max_length - overhead
        if budget < 1:
            raise OptionError(f"--max-length {max_length} cannot hold the {overhead}-token instruction template")
        return text if len(ids) <= budget else self.inner.decode(ids[:budget])

    def pad(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.pad(*args, **kwargs)

    def save_pretrained(self, folder: str | Path) -> Any:
        return self.inner.save_pretrained(folder)

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def pad_token_id(self) -> int:
        return self.inner.pad_token_id


class LabelWordClassifier(torch.nn.Module):
    """A causal LM read as a classifier: the logits of each label word at the last position.

    Inputs are left-padded, so the last position is the answer position for every row, also when a
    prompt method prepends virtual tokens.
    """

    def __init__(self, lm: Any, tokenizer: PreTrainedTokenizerBase, template: InstructionTemplate) -> None:
        super().__init__()
        self.lm, self.template = lm, template
        self.register_buffer("label_ids", torch.tensor(label_token_ids(tokenizer, template)), persistent=False)
        self.lm.config.num_labels = len(template.label_words)

    @property
    def config(self) -> Any:
        return self.lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1, :]
        logits = logits.index_select(-1, self.label_ids)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, folder: str | Path, safe_serialization: bool = True) -> None:
        self.lm.save_pretrained(folder, safe_serialization=safe_serialization)
        write_template(Path(folder), self.template)


def write_template(folder: Path, template: InstructionTemplate) -> None:
    (folder / TEMPLATE_FILE).write_text(json.dumps(asdict(template), indent=2), encoding="utf-8")


def label_token_ids(tokenizer: PreTrainedTokenizerBase, template: InstructionTemplate) -> list[int]:
    """The first token of each label word; they must differ, or labels could not be told apart."""
    ids = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in template.label_words]
    if len(set(ids)) != len(ids):
        raise PeftguardError(f"label words {template.label_words} share a first token; choose other words")
    return ids
