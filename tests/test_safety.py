"""Untrusted checkpoints: pickles refused by default and never unpickled, symlinks out of a model folder refused,
damaged weights named, broken (NaN) models never trained on or measured silently."""
import pickle
import sys
from pathlib import Path

import pytest

from peftguard.errors import UnsafeCheckpointError
from peftguard.models import LoadOptions, load_classifier


class _PlantsAFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle_checkpoint(folder: Path, marker: Path, tiny_minilm: str) -> None:
    import shutil

    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(tiny_minilm) / name, folder / name)
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weights": _PlantsAFile(marker)}, handle)


def test_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path, tiny_minilm):
    marker = tmp_path / "pwned"
    plant_pickle_checkpoint(tmp_path / "model", marker, tiny_minilm)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_classifier(str(tmp_path / "model"), 2)
    message = str(err.value)
    assert "pickle" in message.lower() and "safetensors" in message and "--allow-pickle" in message
    assert not marker.exists()


def test_allow_pickle_still_uses_weights_only(tmp_path, tiny_minilm):
    marker = tmp_path / "pwned"
    plant_pickle_checkpoint(tmp_path / "model", marker, tiny_minilm)
    with pytest.raises(UnsafeCheckpointError) as error:
        load_classifier(str(tmp_path / "model"), 2, LoadOptions(allow_pickle=True))
    assert not marker.exists()  # weights_only=True refuses to build arbitrary objects
    assert "weights_only=True" in str(error.value) and "from_tf" not in str(error.value)


def test_cli_refusal_is_one_line_without_traceback(tmp_path, tiny_minilm, data_dir):
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    plant_pickle_checkpoint(tmp_path / "model", marker, tiny_minilm)
    run = subprocess.run(
        [sys.executable, "-m", "peftguard.cli", "evaluate", "--model", str(tmp_path / "model"),
         "--data-dir", str(data_dir), "--max-eval-samples", "10"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "refusing pickled checkpoint" in run.stderr
    assert not marker.exists()


# --- symlinks in model folders -----------------------------------------------------------------------
def copy_model(tiny_minilm: str, folder: Path, *, skip: tuple[str, ...] = ()) -> Path:
    import shutil

    folder.mkdir(parents=True)
    for path in Path(tiny_minilm).iterdir():
        if path.name not in skip:
            shutil.copy(path, folder / path.name)
    return folder


def test_a_secret_behind_a_symlinked_vocab_never_reaches_an_artifact(tmp_path, tiny_minilm, tiny_dataset, monkeypatch, capsys):
    from peftguard.cli import main

    secret = tmp_path / "outside" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text((Path(tiny_minilm) / "vocab.txt").read_text() + "SECRETKEYMATERIAL\n")  # loads as a vocabulary
    model = copy_model(tiny_minilm, tmp_path / "model", skip=("vocab.txt", "tokenizer.json"))
    (model / "vocab.txt").symlink_to(secret)
    out = tmp_path / "victim"
    monkeypatch.setattr(sys, "argv", ["peftguard", "finetune", "--model", str(model), "--dataset", str(tiny_dataset),
                                      "--out", str(out), "--max-length", "16", "--epochs", "1"])
    with pytest.raises(SystemExit) as exit_:
        main()
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert f"{model / 'vocab.txt'}: a symlink to {secret}, outside the model folder" in stderr
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != secret
              and b"SECRETKEYMATERIAL" in p.read_bytes()]
    assert leaked == [] and not out.exists()


def test_a_symlinked_weights_file_pointing_outside_is_refused(tmp_path, tiny_minilm):
    from peftguard.errors import PeftguardError

    model = copy_model(tiny_minilm, tmp_path / "model", skip=("model.safetensors",))
    (model / "model.safetensors").symlink_to(Path(tiny_minilm) / "model.safetensors")
    with pytest.raises(PeftguardError) as error:
        load_classifier(str(model), 2)
    assert "model.safetensors: a symlink to" in str(error.value) and "\n" not in str(error.value)


def test_a_symlink_that_stays_inside_the_folder_is_fine(tmp_path, tiny_minilm):
    model = copy_model(tiny_minilm, tmp_path / "model")
    (model / "vocab.txt").rename(model / "words.txt")
    (model / "vocab.txt").symlink_to("words.txt")
    assert load_classifier(str(model), 2).config.num_labels == 2


# --- damaged weights ---------------------------------------------------------------------------------
def _wrong_shapes(tiny_minilm: str) -> bytes:
    from safetensors.torch import load_file, save

    tensors = load_file(Path(tiny_minilm) / "model.safetensors")
    name = next(n for n in tensors if n.endswith("word_embeddings.weight"))
    tensors[name] = tensors[name][:, :32].contiguous()
    return save(tensors)


DAMAGED = {
    "random-bytes": lambda tiny: bytes(range(256)) * 8,
    "empty": lambda tiny: b"",
    "truncated": lambda tiny: (Path(tiny) / "model.safetensors").read_bytes()[:5000],
    "huge-header": lambda tiny: (2**40).to_bytes(8, "little") + b"{}",
    "wrong-shapes": _wrong_shapes,
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_damaged_safetensors_is_a_one_line_error_naming_the_file(damage, tmp_path, tiny_minilm):
    from peftguard.errors import PeftguardError

    model = copy_model(tiny_minilm, tmp_path / "model", skip=("model.safetensors",))
    (model / "model.safetensors").write_bytes(DAMAGED[damage](tiny_minilm))
    with pytest.raises(PeftguardError) as error:
        load_classifier(str(model), 2)
    message = str(error.value)
    assert "model.safetensors" in message and "\n" not in message, message
    if damage == "wrong-shapes":
        assert "size mismatch" in message


# --- --allow-pickle adds pickle, never removes safetensors -------------------------------------------
def test_allow_pickle_still_loads_safetensors(tiny_minilm):
    assert load_classifier(tiny_minilm, 2, LoadOptions(allow_pickle=True)).config.num_labels == 2


def test_pickled_adapter_on_a_safetensors_base_loads_only_with_allow_pickle(tmp_path, tiny_minilm):
    import torch
    from safetensors.torch import load_file

    from peftguard.models import load_tokenizer
    from peftguard.tuning import load_tuned, make_tunable, method_config, save_tuned

    folder = tmp_path / "victim"
    model = make_tunable(load_classifier(tiny_minilm, 2), method_config("lora"))
    save_tuned(model, load_tokenizer(tiny_minilm), folder, "finetune.json",
               {"kind": "victim", "method": "lora", "base_model": tiny_minilm, "num_labels": 2})
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(UnsafeCheckpointError):
        load_tuned(folder, "finetune.json")
    loaded, _, manifest = load_tuned(folder, "finetune.json", LoadOptions(allow_pickle=True))
    assert manifest["method"] == "lora" and loaded.config.num_labels == 2


# --- a broken model is never trained on or measured silently -----------------------------------------
def test_nan_weights_stop_training_and_inference(tiny_minilm):
    import torch

    from peftguard.data import Example
    from peftguard.errors import PeftguardError
    from peftguard.models import load_tokenizer
    from peftguard.training import TrainSettings, predict_proba, train_classifier

    model, tokenizer = load_classifier(tiny_minilm, 2), load_tokenizer(tiny_minilm)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(PeftguardError, match="non-finite outputs"):
        predict_proba(model, tokenizer, ["a text"], 4, 16)
    examples = [Example(f"text {i}", i % 2) for i in range(4)]
    with pytest.raises(PeftguardError, match=r"loss became nan at epoch 1, step 1.*not saved"):
        train_classifier(model, tokenizer, examples, None, TrainSettings(epochs=1, batch_size=2, max_length=16))


def test_a_hub_id_offline_fails_at_once(monkeypatch):
    import time

    from peftguard.errors import PeftguardError
    from peftguard.models import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(PeftguardError, match="not in the hub cache"):
        resolve_model("nobody-here/no-such-model")
    assert time.perf_counter() - started < 5
