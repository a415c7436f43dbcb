from collections import Counter

import numpy as np
import pytest

from peftguard.data import Example
from peftguard.defenses.psim import choose_gamma, reset_labels
from peftguard.errors import DataError, OptionError
from peftguard.scan import read_inputs

EXAMPLES = [Example(f"text {i}", 0) for i in range(4000)]


def test_reset_all_labels_is_uniform_over_the_label_set():
    reset = reset_labels(EXAMPLES, num_labels=4, rate=1.0, seed=0)
    counts = Counter(ex.label for ex in reset)
    assert set(counts) == {0, 1, 2, 3}
    assert all(abs(c - 1000) < 120 for c in counts.values())  # ~4.7 sigma for binomial(4000, 1/4)
    assert [ex.text for ex in reset] == [ex.text for ex in EXAMPLES]


def test_partial_reset_touches_only_that_share_and_is_seeded():
    reset = reset_labels(EXAMPLES, num_labels=2, rate=0.3, seed=1)
    changed = sum(ex.label != 0 for ex in reset)
    # 1200 labels redrawn; about half of them land on 1 (the others stay 0 by chance)
    assert 500 < changed < 700
    assert reset == reset_labels(EXAMPLES, num_labels=2, rate=0.3, seed=1)
    assert reset != reset_labels(EXAMPLES, num_labels=2, rate=0.3, seed=2)
    assert reset_labels(EXAMPLES, num_labels=2, rate=0.0, seed=1) == EXAMPLES


def test_reset_rate_out_of_range():
    with pytest.raises(OptionError):
        reset_labels(EXAMPLES, 2, 1.5, 0)


def test_choose_gamma_fixed_calibrated_and_errors():
    assert choose_gamma(None, 0.7, None).gamma == 0.7
    scores = np.linspace(0.5, 1.0, 200)
    choice = choose_gamma(scores, None, None)
    assert choice.how == "target-fpr" and choice.target_fpr == 0.02 and (scores > choice.gamma).sum() == 4
    with pytest.raises(OptionError):
        choose_gamma(scores, 1.2, None)
    with pytest.raises(OptionError):
        choose_gamma(scores, 0.7, 0.05)


def test_scan_reads_csv_jsonl_and_lines(tmp_path):
    (tmp_path / "a.csv").write_text('text,other\n"x, y",1\nz,2\n', encoding="utf-8")
    assert read_inputs(str(tmp_path / "a.csv")) == ["x, y", "z"]
    (tmp_path / "a.jsonl").write_text('{"text": "hi"}\n', encoding="utf-8")
    assert read_inputs(str(tmp_path / "a.jsonl")) == ["hi"]
    (tmp_path / "a.txt").write_text("one\n\ntwo\r\n", encoding="utf-8")
    assert read_inputs(str(tmp_path / "a.txt")) == ["one", "two"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "no inputs"),
        ("bad.txt", b"ok\n\xff\xfe bad\n", "line 2.*UTF-8"),
        ("cols.csv", b"sentence\nhello\n", "column 'text'"),
        ("nul.txt", b"a\x00b\n", "NUL"),
    ],
)
def test_scan_input_errors_are_clear(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_inputs(str(path))
    with pytest.raises(DataError, match=name):
        read_inputs(str(path))


@pytest.mark.parametrize("mean, num_labels, expected", [
    (0.59, 2, False),  # within a fifth of the way from 1/2 to 1
    (0.61, 2, True),
    (0.39, 4, False),  # within a fifth of the way from 1/4 to 1
    (0.41, 4, True),
])
def test_under_trained_is_the_budget_rules_target_for_fixed_schedules(mean, num_labels, expected):
    from peftguard.defenses.psim import under_trained

    assert under_trained(mean, num_labels) is expected


def test_auto_picks_lora_for_a_decoder_and_the_papers_psim_for_an_encoder(tiny_minilm, tmp_path):
    from transformers import LlamaConfig

    from peftguard.defenses.psim import default_psim_method

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)
    assert default_psim_method(str(tmp_path)) == "lora"  # a decoder-only model, read from its config alone
    assert default_psim_method(tiny_minilm) == "ptuning-v1"  # BERT has a masked-LM form: an encoder
