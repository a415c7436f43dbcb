"""A PSIM exported to ONNX, scanned through ONNX Runtime without torch or transformers.

``peftguard psim scan`` in a fresh process spends about 5 s importing torch, transformers and peft
before it scores one input (BENCHMARKS.md). ``peftguard psim export`` writes, once, a folder that a
scan can run on with onnxruntime, tokenizers and numpy alone (about 0.2 s of imports):

* ``model.onnx``: the PSIM's whole forward pass, input ids and attention mask to probabilities. The
  prompt methods' virtual tokens are a constant of the graph (the prompt encoder's output does not
  depend on the input); LoRA and IA3 are merged into the weights;
* ``model.int8.onnx``: the same graph with int8 linear layers (onnxruntime's dynamic quantization,
  int8 per-channel weights, 8-bit activations);
* ``tokenizer.json`` and ``psim-onnx.json`` (gamma, how it was chosen, sha256 of every file, and the
  export check below).

Decisions are the torch path's: the export is refused unless the float32 graph gives the torch
model's probabilities (to ``EXPORT_TOLERANCE``) on a batch of random token sequences of mixed lengths,
padding included; at int8, inputs whose confidence lands within ``INT8_RECHECK_MARGIN`` of gamma are
scored again by the float32 graph, as :class:`~peftguard.defenses.psim.PSIM` does with torch's int8.

Untrusted files: graphs are read into memory and given to onnxruntime as bytes, so a graph cannot
load tensor data from a path (inside the folder or out of it), and each file must match the sha256
that ``psim-onnx.json`` records. P-tuning v2 (per-layer key/value prefixes) is not exported.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from peftguard.errors import OptionError, PeftguardError
from peftguard.precision import INT8_RECHECK_MARGIN

if TYPE_CHECKING:
    from peftguard.models import LoadOptions

log = logging.getLogger(__name__)

MANIFEST = "psim-onnx.json"
FP32_GRAPH = "model.onnx"
INT8_GRAPH = "model.int8.onnx"
TOKENIZER = "tokenizer.json"
GRAPHS = {"fp32": FP32_GRAPH, "int8": INT8_GRAPH}
EXPORT_TOLERANCE = 1e-4  # largest |onnxruntime - torch| probability the float32 graph may show on the check batch
OPSET = 17
NOT_EXPORTED = {"ptuning-v2": "P-tuning v2 feeds every attention layer key/value prefixes, which the export does not fold in"}


def is_exported_psim(folder: str | Path) -> bool:
    """Whether ``folder`` holds a PSIM written by :func:`export_psim` (not a torch PSIM folder)."""
    return (Path(folder) / MANIFEST).is_file()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# --- export (torch side) ---------------------------------------------------------------------------------

def export_psim(psim_dir: str | Path, out: str | Path, *, options: LoadOptions, seed: int = 0) -> dict[str, Any]:
    """Write the ONNX export of the PSIM in ``psim_dir`` to the folder ``out``; returns its manifest."""
    import torch

    from peftguard.artifacts import atomic_dir, write_json
    from peftguard.defenses.psim import MANIFEST as PSIM_MANIFEST
    from peftguard.extras import require
    from peftguard.tuning import load_tuned

    require("onnx", "psim export")
    ort = require("onnxruntime", "psim export")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    psim_dir = Path(psim_dir)
    model, tokenizer, psim_manifest = load_tuned(psim_dir, PSIM_MANIFEST, options)
    method = psim_manifest["method"]
    if method in NOT_EXPORTED:
        raise PeftguardError(f"{psim_dir}: a {method} PSIM cannot be exported: {NOT_EXPORTED[method]}")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token_id is None:
        raise PeftguardError(f"{psim_dir}: the export needs a fast tokenizer with a padding token (tokenizer.json)")
    graph = _graph_module()(model).eval()
    ids, mask = _check_batch(tokenizer, seed)
    with torch.inference_mode():
        expected = torch.softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1).numpy()
        traced = graph(ids, mask).numpy()
    _check_close(float(np.abs(traced - expected).max()), "the export wrapper", psim_dir)
    with atomic_dir(out) as tmp:
        _export_graph(graph, ids, mask, tmp / FP32_GRAPH)
        with _without_preprocessing_advice():
            quantize_dynamic(str(tmp / FP32_GRAPH), str(tmp / INT8_GRAPH), weight_type=QuantType.QInt8, per_channel=True)
        _save_tokenizer(backend, tmp / TOKENIZER)
        feed = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy().astype(np.int64)}
        differences = {}
        for precision, name in GRAPHS.items():
            session = _session(ort, (tmp / name).read_bytes(), threads=1)
            differences[precision] = float(np.abs(session.run(None, feed)[0] - expected).max())
        _check_close(differences["fp32"], "the float32 ONNX graph", psim_dir)
        manifest = {
            "kind": "psim-onnx",
            "source": {"psim": str(psim_dir.resolve()), "psim_json_sha256": sha256_file(psim_dir / PSIM_MANIFEST),
                       "method": method, "base_model": psim_manifest.get("base_model"), "dataset": psim_manifest.get("dataset")},
            "num_labels": int(psim_manifest["num_labels"]),
            "max_length": int(psim_manifest["settings"]["max_length"]),
            "pad_token_id": int(tokenizer.pad_token_id),
            "gamma": psim_manifest["gamma"],
            "gamma_choice": psim_manifest["gamma_choice"],
            "export_check": {"sequences": int(ids.shape[0]), "longest": int(ids.shape[1]), "tolerance": EXPORT_TOLERANCE,
                             "max_probability_difference": differences},
            "onnx_opset": OPSET,
            "onnxruntime_version": ort.__version__,
            "torch_version": torch.__version__,
            "files": {name: sha256_file(tmp / name) for name in (FP32_GRAPH, INT8_GRAPH, TOKENIZER)},
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """onnxruntime's quantizer advises shape-inference pre-processing on the root logger at every call; the export
    check measures the int8 graph instead, so the advice is noise here."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing")

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _check_close(difference: float, what: str, psim_dir: Path) -> None:
    if not difference <= EXPORT_TOLERANCE:
        raise PeftguardError(f"{psim_dir}: {what} changes the PSIM's probabilities by up to {difference:.2g} "
                             f"(more than {EXPORT_TOLERANCE:g}); this architecture or method cannot be exported")


def _check_batch(tokenizer: Any, seed: int) -> tuple[Any, Any]:
    """Random token sequences of mixed lengths between the special tokens, right-padded: the export check."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocabulary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    lengths = [3, 9, 17, 30, 5, 24, 12, 40]
    rows = [tokenizer.build_inputs_with_special_tokens(
        vocabulary[torch.randint(len(vocabulary), (n,), generator=generator)].tolist()) for n in lengths]
    batch = tokenizer.pad({"input_ids": rows}, padding="longest", return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def _graph_module() -> type:
    import torch

    class ForwardGraph(torch.nn.Module):
        """input ids, attention mask -> probabilities; a prompt method's virtual tokens are a constant."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            from peft import PeftModel

            self.prompt = None
            if isinstance(model, PeftModel) and model.peft_config[model.active_adapter].is_prompt_learning:
                self.classifier = model.base_model
                self.word_embeddings = model.word_embeddings
                with torch.no_grad():
                    self.prompt = torch.nn.Parameter(model.get_prompt(batch_size=1).detach().clone(), requires_grad=False)
            elif isinstance(model, PeftModel):
                self.classifier = model.merge_and_unload()
            else:
                self.classifier = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            if self.prompt is None:
                logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask).logits
            else:
                batch = input_ids.shape[0]
                embeds = torch.cat((self.prompt.expand(batch, -1, -1), self.word_embeddings(input_ids)), dim=1)
                virtual = torch.ones(batch, self.prompt.shape[1], dtype=attention_mask.dtype)
                logits = self.classifier(inputs_embeds=embeds, attention_mask=torch.cat((virtual, attention_mask), dim=1)).logits
            return torch.softmax(logits.float(), dim=-1)

    return ForwardGraph


def _export_graph(graph: Any, ids: Any, mask: Any, path: Path) -> None:
    import warnings

    import torch

    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "probabilities": {0: "batch"}}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice; it exports these models exactly
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (ids, mask), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask"], output_names=["probabilities"], dynamic_axes=axes)


def _save_tokenizer(backend: Any, path: Path) -> None:
    """tokenizer.json without the truncation or padding of the tokenizer's last call (the scanner sets its own)."""
    import copy

    backend = copy.deepcopy(backend)
    backend.no_truncation()
    backend.no_padding()
    backend.save(str(path))


# --- scan (no torch) -------------------------------------------------------------------------------------

def _session(ort: Any, graph: bytes, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: its optimizer's notes are not the user's concern
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class OnnxPSIM:
    """An exported PSIM: the confidence of each input, through onnxruntime (same interface as ``PSIM``)."""

    def __init__(self, folder: str | Path, *, batch_size: int = 64, precision: str = "auto") -> None:
        from peftguard.extras import require
        from peftguard.manifests import read_manifest
        from peftguard.runtime import thread_count

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder / MANIFEST)
        self.precision = resolve_onnx_precision(precision)
        self.batch_size = batch_size
        self.max_length = int(self.manifest["max_length"])
        self.recheck_margin = INT8_RECHECK_MARGIN
        self.activation_bits = 8 if self.precision == "int8" else None  # onnxruntime's dynamic int8: u8 activations
        self._ort = require("onnxruntime", "scanning an exported PSIM")
        self._threads = thread_count()
        self._sessions: dict[str, Any] = {}
        self.tokenizer = self._tokenizer()
        self._session_for(self.precision)

    @property
    def num_labels(self) -> int:
        return int(self.manifest["num_labels"])

    def _verified(self, name: str) -> bytes:
        """A file of the folder, read once, if it is the one the manifest names (no link out of the folder)."""
        path = self.folder / name
        if path.is_symlink() and not path.resolve().is_relative_to(self.folder.resolve()):
            raise PeftguardError(f"{path}: a symlink out of the exported PSIM's folder")
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise PeftguardError(f"{path}: cannot read: {exc.strerror}") from None
        expected = self.manifest["files"].get(name)
        if hashlib.sha256(content).hexdigest() != expected:
            raise PeftguardError(f"{path}: does not match the sha256 in {MANIFEST} (changed since the export)")
        return content

    def _tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(self._verified(TOKENIZER).decode("utf-8"))
        tokenizer.enable_truncation(self.max_length)
        return tokenizer

    def _session_for(self, precision: str) -> Any:
        if precision not in self._sessions:
            self._sessions[precision] = _session(self._ort, self._verified(GRAPHS[precision]), self._threads)
        return self._sessions[precision]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]

    def probabilities(self, texts: Sequence[str], precision: str | None = None, desc: str | None = None) -> np.ndarray:
        """Softmax probabilities in input order; batches of similar lengths, each padded to its longest."""
        from tqdm.auto import tqdm

        session = self._session_for(precision or self.precision)
        ids = self.encode(texts)
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros((len(ids), self.num_labels), dtype=np.float32)
        pad = int(self.manifest["pad_token_id"])
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, leave=False, unit="batch", disable=desc is None):
            chunk = order[start : start + self.batch_size]
            longest = max(len(ids[i]) for i in chunk)
            input_ids = np.full((len(chunk), longest), pad, dtype=np.int64)
            mask = np.zeros((len(chunk), longest), dtype=np.int64)
            for row, i in enumerate(chunk):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            out[chunk] = session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]
        if not np.isfinite(out).all():
            raise PeftguardError(f"{self.folder}: the graph gives non-finite outputs (NaN or inf); re-export the PSIM")
        return out

    def confidences(self, texts: Sequence[str], *, desc: str | None = None, gamma: float | None = None) -> np.ndarray:
        """Largest probability per text; at int8, those within the re-check margin of ``gamma`` from the float32 graph."""
        gamma = float(self.manifest["gamma"]) if gamma is None else gamma
        texts = list(texts)
        scores = self.probabilities(texts, desc=desc).max(1)
        if self.precision == "int8":
            near = np.flatnonzero(np.abs(scores - gamma) < self.recheck_margin)
            if len(near):
                scores[near] = self.probabilities([texts[i] for i in near], "fp32").max(1)
        return scores


def resolve_onnx_precision(name: str) -> str:
    """fp32 or int8; ``auto``: fp32. int8 (asked for, on a CPU with VNNI) re-scores inputs near gamma in the fp32 graph,
    which on clean traffic is nearly every input (``psim.AUTO_PRECISIONS`` says why), so it is not the default."""
    if name == "auto":
        return "fp32"
    if name not in GRAPHS:
        raise OptionError(f"--precision {name!r}: an exported PSIM runs fp32 or int8 (or auto)")
    return name

