"""IA3, added as a sixth method through the method registry alone (peftguard/methods/ia3.py)."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from peftguard.cli import app, describe_registries
from peftguard.config import parse_config
from peftguard.data import load_dataset
from peftguard.methods import METHODS
from peftguard.report import paper_table
from peftguard.training import TrainSettings
from peftguard.tuning import load_tuned, method_config
from peftguard.victims import MANIFEST, finetune


def test_ia3_trains_saves_and_loads_as_an_adapter(tiny_minilm, tiny_dataset, tmp_path):
    data = load_dataset(str(tiny_dataset))
    config = method_config("ia3")
    manifest = finetune(tiny_minilm, data, config, TrainSettings(epochs=1, lr=config.lr, batch_size=4, max_length=32),
                        tmp_path / "ia3")
    assert manifest["method"] == "ia3"
    assert 0 < manifest["parameters"]["trainable"] < manifest["parameters"]["total"] / 10  # the vectors and the head
    model, _, loaded = load_tuned(tmp_path / "ia3", MANIFEST)
    assert loaded["method"] == "ia3" and type(model).__name__ == "PeftModelForSequenceClassification"
    assert (tmp_path / "ia3" / "adapter_model.safetensors").is_file()


def test_ia3_is_in_the_cli_config_validation_and_report_order(tiny_minilm, data_dir, tmp_path):
    assert METHODS.names()[-1] == "ia3" and METHODS["ia3"].peft_type == "IA3"
    describe_registries()  # as main() does on --help
    result = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "400"})
    assert "ia3 (learned rescaling" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["finetune", "--model", tiny_minilm, "--out", str(tmp_path / "x"), "--method", "adapterx"])
    assert str(result.exception).endswith("ptuning-v2, ia3")
    assert parse_config({"name": "x", "grid": {"methods": ["ia3", "lora"]}}).grid.methods == ["ia3", "lora"]
    cells = [{"model": "m", "dataset": "d", "attack": "badnet", "scenario": "full-data", "row": "attack", "method": m,
              "metrics": {"clean_accuracy": 0.5, "attack_success_rate": 0.5}} for m in ("ia3", "lora", "full")]
    header, _ = paper_table(cells)
    assert [h for h in header if h.endswith(" CA")] == ["full CA", "lora CA", "ia3 CA"]
    with pytest.raises(Exception, match="has no setting"):
        method_config("ia3", r=4)
