"""What is being audited: the suspect model resolved to files on disk, hashed, and made loadable.

``--model`` may be an embedded name (``minilm``), a model folder (plain, poisoned by this tool, or a
fully fine-tuned victim), a PEFT adapter folder (a victim of this tool, or any folder with
``adapter_config.json``), or a hub id, optionally pinned as ``owner/name@revision``. An adapter is
audited on its base: a LoRA adapter is merged into it (the merged weights are what PSIM reads);
prompt-type adapters add nothing to the base's weights, so PSIM reads the base itself, while the
classifier (forced labels, the classifier lens) is the base with the adapter attached.

Every file of the suspect (and of an adapter's base) is hashed (sha256) before anything is
loaded, so the record says exactly which bytes were audited. Pickled weights are refused as
everywhere else (``models.check_weight_files``) unless ``--allow-pickle``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftguard.errors import PeftguardError, UnsafeCheckpointError
from peftguard.manifests import read_manifest
from peftguard.models import (
    EMBEDDED_MODELS,
    PICKLE_SUFFIXES,
    LoadOptions,
    check_contained,
    check_weight_files,
    load_classifier,
    load_tokenizer,
    resolve_model,
)
from peftguard.runtime import compute_device
from peftguard.victims import MANIFEST as VICTIM_MANIFEST

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class Suspect:
    """The resolved suspect: where its files are, what PSIM trains on, how to load it as a classifier."""

    given: str
    kind: str  # embedded | folder | poisoned | victim | adapter | hub
    folder: Path
    psim_weights: str  # the model PSIM trains on (a folder; the merged weights for a LoRA adapter)
    base: str | None = None  # an adapter's base model
    method: str = "full"
    hub: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_adapter(self) -> bool:
        return self.base is not None


def split_revision(ref: str) -> tuple[str, str | None]:
    """``owner/name@revision`` -> (``owner/name``, ``revision``); a local path is never split."""
    if "@" in ref and not Path(ref).exists() and "/" in ref.split("@", 1)[0]:
        name, revision = ref.rsplit("@", 1)
        if not name or not revision:
            raise PeftguardError(f"model '{ref}': give a hub id as owner/name@revision")
        return name, revision
    return ref, None


def resolve_suspect(ref: str, options: LoadOptions) -> Suspect:
    """Find the suspect's files (a hub id is looked up in the local cache first) and check them."""
    name, revision = split_revision(ref)
    if name in EMBEDDED_MODELS:
        return _from_folder(ref, Path(resolve_model(name)), "embedded", options)
    path = Path(name)
    if revision is None and (path.exists() or path.is_symlink() or name.startswith((".", "/", "~")) or name.count("/") != 1):
        return _from_folder(ref, Path(resolve_model(name)), "folder", options)
    folder, commit = hub_snapshot(name, revision, options)
    suspect = _from_folder(ref, folder, "hub", options)
    suspect.hub = {"id": name, "revision": revision or "main", "commit": commit}
    return suspect


def hub_snapshot(hub_id: str, revision: str | None, options: LoadOptions) -> tuple[Path, str]:
    """A hub model's local snapshot folder and its commit; downloaded only when the hub can be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    from peftguard.models import _hub_reachable

    patterns = None if options.allow_pickle else ["*.json", "*.safetensors", "*.txt", "*.model", "*.md"]
    try:
        folder = snapshot_download(hub_id, revision=revision, local_files_only=True, allow_patterns=patterns)
    except HFValidationError:
        raise PeftguardError(f"model '{hub_id}' is neither a folder nor a valid hub id") from None
    except Exception:  # not cached (the error type varies across huggingface_hub versions)
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not _hub_reachable():
            at = f"@{revision}" if revision else ""
            raise PeftguardError(f"model '{hub_id}{at}' is not a local folder and not in the hub cache, and the hub cannot "
                                 "be reached from here; give a local model folder") from None
        try:
            folder = snapshot_download(hub_id, revision=revision, allow_patterns=patterns)
        except Exception as exc:  # unknown repo or revision, network failure
            raise PeftguardError(f"cannot fetch '{hub_id}' at revision {revision or 'main'}: {_first_line(exc)}") from None
    return Path(folder), Path(folder).name


def _from_folder(given: str, folder: Path, kind: str, options: LoadOptions) -> Suspect:
    check_contained(folder)
    if (folder / VICTIM_MANIFEST).is_file():
        manifest = read_manifest(folder / VICTIM_MANIFEST)
        if manifest["method"] != "full":
            return _adapter(given, folder, str(manifest["base_model"]), str(manifest["method"]), options)
        kind = "victim"
    elif (folder / ADAPTER_CONFIG).is_file():
        return _adapter(given, folder, _adapter_base(folder), _adapter_method(folder), options)
    elif (folder / "poisoning.json").is_file():
        kind = "poisoned"
    check_weight_files(folder, options)
    suspect = Suspect(given, kind, folder, str(folder))
    _note_pickles(suspect, folder, options)
    return suspect


def _adapter(given: str, folder: Path, base: str, method: str, options: LoadOptions) -> Suspect:
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled and not options.allow_pickle:
            raise UnsafeCheckpointError(f"{folder}: refusing pickled adapter {', '.join(sorted(pickled))} (unpickling can run "
                                        "code); convert it to safetensors or pass --allow-pickle")
        if not pickled:
            raise PeftguardError(f"{folder}: no adapter weights ({ADAPTER_WEIGHTS})")
    suspect = Suspect(given, "adapter", folder, psim_weights=base, base=base, method=method)
    if method != "lora":
        suspect.notes.append(f"a {method} adapter adds no weights to its base: PSIM is trained on the base {base}; "
                             "forced labels come from the base with the adapter attached")
    _note_pickles(suspect, folder, options)
    return suspect


def _adapter_base(folder: Path) -> str:
    base = read_manifest(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise PeftguardError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path: the adapter's base is unknown")
    return base


def _adapter_method(folder: Path) -> str:
    peft_type = read_manifest(folder / ADAPTER_CONFIG).get("peft_type")
    methods = {"LORA": "lora", "PROMPT_TUNING": "prompt", "P_TUNING": "ptuning-v1", "PREFIX_TUNING": "ptuning-v2"}
    if peft_type not in methods:
        raise PeftguardError(f"{folder / ADAPTER_CONFIG}: adapter type {peft_type!r} is not one this tool audits "
                             f"({', '.join(methods)})")
    return methods[peft_type]


def _note_pickles(suspect: Suspect, folder: Path, options: LoadOptions) -> None:
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled and not options.allow_pickle:
        suspect.notes.append(f"pickled files present but not loaded: {', '.join(pickled)}")


# --- loading ---------------------------------------------------------------------------------------


def load_suspect_classifier(suspect: Suspect, num_labels: int, options: LoadOptions) -> tuple[Any, Any]:
    """The suspect as the classifier a user would run: (model in eval mode on the compute device, tokenizer)."""
    if not suspect.is_adapter:
        from peftguard.pipeline import load_model

        model, tokenizer, _ = load_model(str(suspect.folder), num_labels, options)  # on the compute device
        return model, tokenizer
    from peftguard.tuning import attach_adapter

    base = load_classifier(suspect.base or "", num_labels, options)
    model = attach_adapter(suspect.folder, base, {"base_model": suspect.base, "num_labels": num_labels})
    model.eval().to(compute_device())
    return model, load_tokenizer(str(suspect.folder) if (suspect.folder / "tokenizer_config.json").is_file() else suspect.base or "",
                                 options)


def merge_lora(suspect: Suspect, num_labels: int, out_dir: Path, options: LoadOptions) -> None:
    """Merge a LoRA adapter into its base and save the result as a model folder; PSIM trains on it."""
    from peftguard.artifacts import atomic_dir

    model, tokenizer = load_suspect_classifier(suspect, num_labels, options)
    merged = model.merge_and_unload()
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        getattr(tokenizer, "inner", tokenizer).save_pretrained(tmp)
    suspect.psim_weights = str(out_dir)
    suspect.notes.append(f"LoRA adapter merged into its base {suspect.base}; PSIM is trained on the merged weights ({out_dir.name}/)")


# --- hashes ------------------------------------------------------------------------------------------


FORMATS = {".safetensors": "safetensors", ".json": "json", ".txt": "text", ".model": "sentencepiece", ".gguf": "gguf",
           **{suffix: "pickle" for suffix in PICKLE_SUFFIXES}}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_folder(folder: Path, role: str) -> list[dict[str, Any]]:
    """Every file under ``folder`` (links inside it included), sorted by name, with its sha256 and format."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts)
    return [{"role": role, "file": str(p.relative_to(folder)), "bytes": p.stat().st_size,
             "format": FORMATS.get(p.suffix, "other"), "sha256": sha256_file(p)} for p in files]


def provenance(suspect: Suspect, reference: str | None) -> dict[str, Any]:
    """The resolved source and the hash of every file read: the suspect's, an adapter's base's, the reference's."""
    files = hash_folder(suspect.folder, "suspect")
    record: dict[str, Any] = {"given": suspect.given, "kind": suspect.kind, "folder": str(suspect.folder),
                              "method": suspect.method, "hub": suspect.hub, "notes": list(suspect.notes)}
    if suspect.base is not None:
        record["base"] = suspect.base
        base_folder = _local_folder(suspect.base)
        if base_folder is not None:
            files += hash_folder(base_folder, "base")
    if reference is not None:
        record["reference"] = reference
        reference_folder = _local_folder(reference)
        if reference_folder is not None:
            files += hash_folder(reference_folder, "reference")
    record["files"] = files
    record["weight_formats"] = sorted({f["format"] for f in files if f["format"] in ("safetensors", "pickle", "gguf")})
    return record


def _local_folder(ref: str) -> Path | None:
    try:
        location = Path(resolve_model(ref))
    except PeftguardError:
        return None
    return location if location.is_dir() else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
