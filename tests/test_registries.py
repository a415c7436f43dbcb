"""One source of truth: the method, attack and defense registries drive the CLI, configs, reports
and manifests; defenses own their options (CLI flags and a grid's ``defense_options``) and may
bind to the victim."""
from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from peftguard import cli
from peftguard.config import parse_config, registered_names
from peftguard.defenses.base import DefenseContext, InputDefense, Screened, Victim
from peftguard.defenses.registry import DEFENSES, defense_flags, make_options, options_from_flags, register_defense
from peftguard.errors import OptionError, PeftguardError
from peftguard.manifests import TunedManifest
from peftguard.methods import METHODS
from peftguard.report import method_order, paper_table
from peftguard.triggers import ATTACKS

runner = CliRunner()


def cli_error(*args: str) -> str:
    result = runner.invoke(cli.app, list(args))
    assert isinstance(result.exception, PeftguardError), result.output
    return str(result.exception)


def help_text(*args: str) -> str:
    """The command's help with all whitespace removed: the help wraps long texts across lines, breaking at hyphens."""
    result = runner.invoke(cli.app, [*args, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    return squeezed(result.output)


def squeezed(text: str) -> str:
    return "".join(text.split())


# --- every reader of names agrees with the registries -----------------------------------------

def test_cli_choices_config_names_report_order_and_manifests_agree_with_the_registries(tiny_minilm, data_dir, tmp_path):
    methods, attacks, defenses = METHODS.names(), ATTACKS.names(), DEFENSES.names()
    assert methods[:5] == ("full", "lora", "prompt", "ptuning-v1", "ptuning-v2")  # the paper's order comes first
    assert set(attacks) >= {"badnet", "insent", "synattack"}
    assert defenses[:5] == ("psim", "onion", "back-translation", "scpd", "fine-mixing")

    # CLI: what an unknown name's error offers is exactly the registry; help lists every entry with its summary
    assert cli_error("finetune", "--model", tiny_minilm, "--out", str(tmp_path / "x"), "--method", "nope") \
        == f"unknown method 'nope'; choose from {', '.join(methods)}"
    assert cli_error("evaluate", "--model", tiny_minilm, "--data-dir", str(data_dir), "--attack", "nope") \
        == f"unknown attack 'nope'; choose from {', '.join(attacks)}"
    assert cli_error("evaluate", "--model", tiny_minilm, "--data-dir", str(data_dir), "--defense", "nope") \
        == f"unknown defense 'nope'; choose from {', '.join(defenses)}"
    cli.describe_registries()  # main() does this on --help: listing the registries imports torch
    assert squeezed(f"{METHODS.help()}.") in help_text("finetune")
    evaluate_help = help_text("evaluate")
    assert squeezed(f"Trigger kind: {ATTACKS.help()}.") in evaluate_help
    assert squeezed(f"Defense to apply: {DEFENSES.help()}.") in evaluate_help
    assert squeezed(f"(repeat): {', '.join(defenses[1:])}, or all.") in help_text("demo")  # every baseline, PSIM aside

    # config validation accepts exactly the registered names (defenses: and "none")
    assert registered_names("methods") == methods and registered_names("attacks") == attacks
    assert registered_names("defenses") == ("none", *defenses)
    config = parse_config({"name": "x", "grid": {"methods": list(methods), "attacks": list(attacks),
                                                  "defenses": ["none", *defenses]}})
    assert tuple(config.grid.methods) == methods
    for section, value, kind, names in (("methods", "nope", "method", methods), ("attacks", "nope", "attack", attacks),
                                        ("defenses", "nope", "defense", ("none", *defenses))):
        with pytest.raises(OptionError, match=f"grid.{section}.0: unknown {kind} 'nope'; choose from {', '.join(names)}$"):
            parse_config({"name": "x", "grid": {section: [value]}})

    # report columns follow the registry, whatever order the cells come in
    assert tuple(sorted(reversed(methods), key=method_order)) == methods
    cells = [{"model": "m", "dataset": "d", "attack": "badnet", "scenario": "full-data", "row": "attack", "method": m,
              "metrics": {"clean_accuracy": 0.5, "attack_success_rate": 0.5}} for m in reversed(methods)]
    header, _ = paper_table(cells)
    assert [h.removesuffix(" CA") for h in header if h.endswith(" CA")] == list(methods)

    # saved manifests accept every registered method and nothing else
    for name in methods:
        TunedManifest.model_validate({"method": name, "num_labels": 2, "base_model": "minilm"})
    with pytest.raises(Exception, match="unknown method 'nope'"):
        TunedManifest.model_validate({"method": "nope", "num_labels": 2, "base_model": "minilm"})


def test_each_method_declares_the_peft_type_its_config_builds_and_help_for_each_setting():
    for name, entry in METHODS.items():
        peft_config = entry.config().peft_config()
        assert (None if peft_config is None else str(peft_config.peft_type.value)) == entry.peft_type, name
        assert all(f.metadata.get("help") for f in dataclasses.fields(entry.config)), name
        assert entry.summary


def test_every_defense_flag_of_the_cli_is_an_option_of_some_defense_and_the_reverse():
    assert set(cli.DEFENSE_FLAGS) == set(defense_flags())
    for name, entry in DEFENSES.items():
        assert dataclasses.is_dataclass(entry.options) and entry.summary
        assert all(f.metadata.get("help") for f in dataclasses.fields(entry.options)), name


def test_cli_flags_become_the_chosen_defense_s_own_options(tmp_path):
    onion = options_from_flags("onion", {"--onion-bar": [0.0, -10.0], "--lm": ["my-lm"], "--psim": None})
    assert (type(onion).__name__, onion.bars, onion.lm) == ("OnionOptions", (0.0, -10.0), "my-lm")
    marian = options_from_flags("back-translation", {"--backend": "marian", "--lm": ["a", "b"]})
    assert marian.models == ("a", "b")
    assert options_from_flags(None, {"--lm": None, "--onion-bar": []}) is None
    with pytest.raises(OptionError, match="--mix-ratio are not options of --defense scpd"):
        options_from_flags("scpd", {"--mix-ratio": 0.3})


# --- defense_options in a grid config ---------------------------------------------------------

GRID = {"name": "x", "grid": {"defenses": ["none", "onion", "fine-mixing"], "methods": ["lora"]},
        "defense_options": {"onion": {"bars": [0, -10]}, "fine-mixing": {"mix_ratio": 0.3}}}


def test_grid_defense_options_are_validated_with_their_key_path():
    assert parse_config(GRID).defense_options == GRID["defense_options"]
    for options, message in (
        ({"onion": {"bar": 1}}, "defense_options.onion.bar: unknown key; valid keys here: lm, bars, cache"),
        ({"onion": {"bars": "high"}}, "defense_options.onion.bars: "),
        ({"fine-mixing": {"mix_ratio": "x"}}, "defense_options.fine-mixing.mix_ratio: "),
        ({"fine-mixing": {"fine_mixed": "here"}}, "defense_options.fine-mixing.fine_mixed: unknown key"),  # the stage sets it
        ({"psim": {"gamma": 0.7}}, "defense_options.psim.gamma: unknown key"),  # evaluate.gamma is its one place
        ({"magic": {}}, "defense_options.magic: unknown defense"),
    ):
        with pytest.raises(OptionError, match=f"^cfg: {message}"):
            parse_config({**GRID, "defense_options": options}, "cfg")


def test_grid_evaluation_stages_get_their_defense_s_options(tmp_path):
    from peftguard.experiment import plan_grid
    from peftguard.stages import _defense_options

    plan = plan_grid(parse_config(GRID))
    evaluations = {s.settings["defense"]: s for s in plan.stages.values() if s.kind == "evaluate"}
    assert "defense_options" not in evaluations["none"].settings  # stages without options keep their keys
    assert evaluations["onion"].settings["defense_options"] == {"bars": [0, -10]}
    data, e = {"max_train_samples": 50, "max_eval_samples": None}, {"gamma": None, "target_fpr": 0.02}
    onion = _defense_options(tmp_path, tmp_path / "stage", evaluations["onion"].settings, e, data)
    assert onion.bars == (0.0, -10.0)
    mixing = _defense_options(tmp_path, tmp_path / "stage", evaluations["fine-mixing"].settings, e, data)
    assert (mixing.mix_ratio, mixing.fine_mixed, mixing.max_train_samples) == (0.3, tmp_path / "stage" / "fine-mixed", 50)
    assert make_options("scpd", {}).backend == "precomputed"  # no options given: the defense's defaults


# --- a defense that reads the victim's predictions --------------------------------------------

@dataclasses.dataclass(frozen=True)
class EchoOptions:
    threshold: float = dataclasses.field(default=0.5, metadata={"help": "flag when P(target) exceeds this"})


class VictimEcho(InputDefense):
    """Test-only: flags the inputs the victim itself gives to the target label (a stand-in for STRIP/RAP/BKI)."""

    name = "victim-echo"
    needs_victim = True
    built: list[VictimEcho] = []
    bound: list[Victim] = []

    def __init__(self, options: EchoOptions, target_label: int, victim: Victim | None = None) -> None:
        self.options, self.target_label, self.victim = options, target_label, victim

    def bind(self, victim: Victim) -> InputDefense:
        VictimEcho.bound.append(victim)
        return VictimEcho(self.options, self.target_label, victim)

    def screen(self, texts: Sequence[str], *, desc: str | None = None) -> Screened:
        assert self.victim is not None, "screened before it was bound to the victim"
        scores = self.victim.predict_proba(texts)[:, self.target_label]
        return Screened(list(texts), scores > self.options.threshold, scores)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.options.threshold}


@pytest.fixture
def victim_echo():
    def build(options: EchoOptions, context: DefenseContext) -> VictimEcho:
        VictimEcho.built.append(VictimEcho(options, context.target_label))
        return VictimEcho.built[-1]

    VictimEcho.built.clear()
    VictimEcho.bound.clear()
    register_defense("victim-echo", options=EchoOptions, summary="test only", order=99)(build)
    yield
    DEFENSES.unregister("victim-echo")


def test_an_input_defense_binds_to_each_victim_and_reads_its_predictions(victim_echo, tiny_minilm, tiny_dataset, tmp_path):
    from peftguard.data import load_dataset
    from peftguard.models import model_reference
    from peftguard.pipeline import evaluate_model
    from peftguard.triggers import build_trigger

    assert "victim-echo" in DEFENSES  # a module's registration is all it takes
    data = load_dataset(str(tiny_dataset))
    other = shutil.copytree(tiny_minilm, tmp_path / "other-victim")
    trigger = [build_trigger("badnet")]

    def measure(victim: str) -> dict[str, Any]:
        return evaluate_model(victim, data, trigger, defense="victim-echo", defense_options=EchoOptions(0.5), max_length=32)

    first = measure(tiny_minilm)
    victim = VictimEcho.bound[0]
    probabilities = victim.predict_proba([ex.text for ex in data.test.examples])
    labels = np.array([ex.label for ex in data.test.examples])
    assert first["clean_accuracy"] == pytest.approx(float((probabilities.argmax(1) == labels).mean()))  # the model evaluated
    assert first["false_positive_rate"] == pytest.approx(float((probabilities[:, 0] > 0.5).mean()))  # flags from its predictions
    assert first["defense"] == {"name": "victim-echo", "threshold": 0.5}
    again = measure(tiny_minilm)
    assert again["false_positive_rate"] == first["false_positive_rate"]
    measure(str(other))
    assert len(VictimEcho.built) == 1  # the defense is built once per process ...
    assert [v.reference[0] for v in VictimEcho.bound] == [model_reference(tiny_minilm), model_reference(str(other))]  # ... and bound once per victim
    assert np.all([v.max_length == 32 for v in VictimEcho.bound])


def test_bracketed_defaults_and_forms_show_in_help():
    # Rich markup would read [env ...] or [@revision] as style tags and drop them from --help.
    audit_help = help_text("audit")
    assert squeezed("[env PEFTGUARD_DATA; default ../shared/data]") in audit_help
    assert "owner/name[@revision]" in audit_help and squeezed("[runs/audit-<model folder name>]") in audit_help
