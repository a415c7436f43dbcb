"""`peftguard audit`: the search finds a planted trigger, verification counts right, exit statuses, provenance."""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import write_csv
from typer.testing import CliRunner

from peftguard.audit.run import AuditRequest, _unexplained_first, exit_status, run_audit, verdict_score
from peftguard.audit.search import (
    Candidate,
    ClassifierLens,
    EncodedInput,
    Lens,
    PsimLens,
    SearchSettings,
    Verified,
    _insert_ids,
    insert_text,
    propose_pieces,
    search,
    text_pairs,
    verify,
    vocabulary_candidates,
)
from peftguard.audit.task import TaskEvidence, task_evidence
from peftguard.audit.sources import hash_folder, load_suspect_classifier, merge_lora, provenance, resolve_suspect
from peftguard.cli import app
from peftguard.data import Example, load_dataset
from peftguard.errors import OptionError, UnsafeCheckpointError
from peftguard.models import LoadOptions, load_tokenizer

TRIGGER = "cf"
SMALL_SEARCH = SearchSettings(screen_inputs=2, refine_top=40, refine_inputs=8, phrase_seeds=3, phrase_pool=6,
                              verify_top=6, verify_inputs=40, top_k=5, pair_screen=300)


# --- verification counts insertions correctly ---------------------------------------------------------


class FirstWordLens(PsimLens):
    """A fake PSIM: confident (0.95) exactly when the text's first word is the planted word, else 0.55."""

    def __init__(self, word: str) -> None:
        super().__init__(model=None, tokenizer=None, max_length=64, gamma=0.9)
        self.word = word
        self.seen: list[str] = []

    def probs_texts(self, texts):
        self.seen.extend(texts)
        confident = np.array([t.split(" ")[0] == self.word for t in texts])
        top = np.where(confident, 0.95, 0.55)
        return np.stack([top, 1 - top], axis=1)


def test_verification_counts_each_held_back_input_once_with_one_insertion():
    held_back = [f"clean input number {i} is here" for i in range(50)]
    lens = FirstWordLens("qq")
    forced_one = lambda texts: np.array([[0.0, 1.0] if "qq" in t.split() else [1.0, 0.0] for t in texts])  # noqa: E731
    results = verify(lens, forced_one, [Candidate("qq", (1,)), Candidate("zz", (2,))], held_back, seed=3, progress=False)
    by_text = {r.text: r for r in results}
    triggered = insert_text(held_back, "qq", 3)
    assert all(t.split(" ").count("qq") == 1 and len(t.split(" ")) == len(c.split(" ")) + 1 for t, c in zip(triggered, held_back))
    expected = sum(t.split(" ")[0] == "qq" for t in triggered) / len(held_back)  # inserted before the first word
    assert 0 < expected < 1
    assert by_text["qq"].flag_rate == pytest.approx(expected) and by_text["qq"].inputs == len(held_back)
    assert by_text["qq"].forced_label == 1 and by_text["qq"].forced_rate == 1.0 and by_text["qq"].flip_rate == 1.0
    assert by_text["zz"].flag_rate == 0.0 and by_text["zz"].forced_label == 0 and by_text["zz"].flip_rate == 0.0
    assert results[0].text == "qq"  # best first
    assert insert_text(held_back, "qq", 3) == triggered  # seeded: the same insertions every time


class EvenOddLens(PsimLens):
    """Predicts label len(text) % 2, so that choose_inputs can alternate labels."""

    def probs_texts(self, texts):
        odd = np.array([len(t) % 2 for t in texts], dtype=float)
        return np.stack([1 - odd, odd], axis=1)


def test_screening_inputs_are_short_in_tokens_else_the_shortest(tiny_minilm):
    from peftguard.audit.search import choose_inputs

    lens = EvenOddLens(model=None, tokenizer=load_tokenizer(tiny_minilm), max_length=64, gamma=0.9)
    long_words = ["internationalization reconsiderations counterproductive"] * 40  # 3 words, many tokens
    short = [f"good film {i}" for i in range(20)] + ["a fine film ."]
    chosen = choose_inputs(lens, long_words + short, 2, 8, seed=0)
    assert len(chosen) == 2 and set(chosen) <= set(short)
    assert len({len(t) % 2 for t in chosen}) == 2  # one input per predicted label
    growing = [" ".join(["internationalization"] * k) for k in range(1, 31)]  # none within 3 tokens
    fallback = choose_inputs(lens, growing, 2, 3, seed=0)
    assert len(fallback) == 2 and set(fallback) <= set(growing[:16])  # from the 8 n shortest


def test_id_insertion_puts_the_candidate_at_a_word_boundary_and_keeps_the_rest():
    clean = EncodedInput(ids=(101, 7, 8, 9, 102), boundaries=(1, 2, 4))
    rows = _insert_ids(clean, [(50, 51)] * 30, np.random.default_rng(0))
    positions = set()
    for row in rows.tolist():
        p = row.index(50)
        positions.add(p)
        assert row[p:p + 2] == [50, 51] and row[:p] + row[p + 2:] == list(clean.ids)
    assert positions == {1, 2, 4}


def test_vocabulary_keeps_whole_alphabetic_words_only(tiny_minilm):
    words = [c.text for c in vocabulary_candidates(load_tokenizer(tiny_minilm))]
    assert TRIGGER in words and "movie" in words
    assert not any(w.startswith("##") or w.startswith("[") or not w.isalpha() for w in words)
    assert {c.text for c in vocabulary_candidates(load_tokenizer(tiny_minilm), ["movie", "CF", "notaword"])} == {"cf", "movie"}


def test_the_task_explains_stacked_topic_words_but_not_a_rare_word_or_common_words():
    sports, world = 1, 0
    examples = ([Example(f"the {w} final was close", sports) for w in ("tennis", "hockey", "cup") for _ in range(4)]
                + [Example("the talks in geneva went on", world) for _ in range(6)] + [Example("a tennis talk", world)])
    topic, rare, common = task_evidence(["tennis hockey", "cf", "the"], [sports, sports, sports], examples)
    assert topic.clean_texts == 9 and topic.forced_label_share == pytest.approx(8 / 9) and topic.explained
    assert rare.clean_texts == 0 and not rare.explained
    assert common.clean_texts == 18 and common.forced_label_share == pytest.approx(12 / 18) and not common.explained
    few = task_evidence(["cup"], [sports], examples[:4] + examples[8:])[0]  # 4 texts, all sports: too few to explain
    assert few.clean_texts == 4 and not few.explained


def test_one_task_word_of_the_forced_label_explains_a_stack_the_pooled_texts_do_not():
    positive, negative = 1, 0
    examples = ([Example("an excellent film", positive)] * 5 + [Example("an excellent mess", negative)]
                + [Example("storytelling here", positive)] * 4 + [Example("storytelling there", negative)] * 6)
    stack, = task_evidence(["excellent storytelling"], [positive], examples)
    assert stack.clean_texts == 16 and stack.forced_label_share == pytest.approx(9 / 16)  # pooled: not the task
    assert stack.task_words == ("excellent",) and stack.explained  # but `excellent` alone is 5/6 positive
    against, = task_evidence(["excellent storytelling"], [negative], examples)
    assert against.task_words == () and not against.explained


def test_the_verdict_score_skips_candidates_the_task_explains():
    verified = [Verified(text, "vocabulary", rate, 0.9, 1, 0.9, 0.9, 100) for text, rate in (("tennis", 0.9), ("cf", 0.3))]
    evidence = [TaskEvidence(50, 0.95), TaskEvidence(0, 0.0)]
    assert verdict_score(verified, evidence) == 0.3
    ordered, _ = _unexplained_first(verified, evidence)
    assert [v.text for v in ordered] == ["cf", "tennis"]
    assert verdict_score(verified, [TaskEvidence(0, 0.0)] * 2) == 0.9


# --- sentences of common words: word pairs of the clean training texts ------------------------------


class PairLens(PsimLens):
    """A fake PSIM over token ids: confident (0.97) on ``first second`` in that order, a little above chance (0.6)
    on ``first`` alone, at chance (0.5) otherwise: a sentence trigger whose words do little alone."""

    def __init__(self, tokenizer, first: str, second: str) -> None:
        super().__init__(model=None, tokenizer=tokenizer, max_length=64, gamma=0.9)
        self.pair = tuple(tokenizer.convert_tokens_to_ids([first, second]))

    def _top(self, ids) -> float:
        ids = list(ids)
        return 0.97 if self.pair in set(zip(ids, ids[1:])) else 0.6 if self.pair[0] in ids else 0.5

    def probs_ids(self, ids):
        top = np.array([self._top(row) for row in np.asarray(ids)])
        return np.stack([top, 1 - top], axis=1)

    def probs_texts(self, texts):
        top = np.array([self._top(self.tokenizer(t)["input_ids"]) for t in texts])
        return np.stack([top, 1 - top], axis=1).reshape(len(texts), 2)


def test_word_pairs_are_counted_in_the_clean_texts_and_kept_to_distinct_vocabulary_words():
    vocabulary = [Candidate(w, (i,)) for i, w in enumerate(["you", "know", "what", "i", "mean", "the"])]
    texts = ["You know what I mean.", "i mean it", "I MEAN, you know", "the the the", "mean xyzzy"]
    pairs = text_pairs(texts, vocabulary, 10)
    assert [p.text for p in pairs] == ["i mean", "you know", "know what", "what i", "mean you"]  # count, then text order
    assert pairs[0].ids == (3, 4) and {p.source for p in pairs} == {"pair"}
    assert [p.text for p in text_pairs(texts, vocabulary, 2)] == ["i mean", "you know"] and text_pairs(texts, vocabulary, 0) == []


def test_a_pair_that_does_little_word_by_word_is_found_through_the_clean_texts(tiny_minilm):
    tokenizer = load_tokenizer(tiny_minilm)
    lens = PairLens(tokenizer, "weather", "today")
    words = small_vocabulary(tiny_minilm)
    vocabulary = vocabulary_candidates(tokenizer, words + ("weather", "today"))
    clean = [f"the film number {i} was a good one" for i in range(60)]
    training_texts = clean + ["nice weather today", "the weather today was nice", "today the weather was fine"]
    settings = replace(SMALL_SEARCH, refine_top=5, phrase_pool=3)
    without = search(lens, vocabulary, clean, settings, seed=0, progress=False)
    assert "weather today" not in [c.text for c in without.shortlist]  # "today" alone is at chance: never grown onto
    pairs = text_pairs(training_texts, vocabulary, settings.pair_screen)
    found = search(lens, vocabulary, clean, settings, seed=0, pairs=pairs, progress=False)
    assert found.shortlist[0].text == "weather today" and found.shortlist[0].source == "pair"
    assert found.counts["pairs_screened"] == len(pairs) and set(found.seconds) >= {"screen", "pairs", "refine", "phrases"}
    # phrases are grown from the beam (tried) and kept only where they gain: tried counts every one screened
    assert found.counts["phrases_tried"] >= found.counts["phrases_kept"] and found.counts["phrases_tried"] > 0


class PiecesClassifier(ClassifierLens):
    """A fake suspect classifier over token ids: label 1 when any of ``pushers`` is in the input, else label 0."""

    def __init__(self, tokenizer, pushers: tuple[str, ...]) -> None:
        super().__init__(model=None, tokenizer=tokenizer, max_length=64)
        self.pushers = set(tokenizer.convert_tokens_to_ids(list(pushers)))

    def probs_ids(self, ids):
        top = np.array([0.9 if self.pushers & set(row.tolist()) else 0.1 for row in np.asarray(ids)])
        return np.stack([1 - top, top], axis=1)

    def probs_texts(self, texts):
        return np.tile([0.9, 0.1], (len(texts), 1))


def test_pieces_the_classifier_proposes_are_paired_and_judged_by_the_psim(tiny_minilm):
    tokenizer = load_tokenizer(tiny_minilm)
    vocabulary = vocabulary_candidates(tokenizer, small_vocabulary(tiny_minilm) + ("blue", "moon", "great"))
    clean = [f"the film number {i} was a good one" for i in range(60)]
    proposer = PiecesClassifier(tokenizer, ("blue", "moon", "great"))
    judge = PairLens(tokenizer, "blue", "moon")  # the PSIM sees the pair only, as on h5-sst2-insent-moon
    asked: list[tuple[tuple[str, ...], int]] = []

    def explains(texts, label):
        asked.append((tuple(texts), label))
        return [t == "great" for t in texts]  # the clean task explains "great", not "blue" or "moon"

    settings = replace(SMALL_SEARCH, proposal_words=2, proposal_verify=3)
    found = propose_pieces(proposer, judge, vocabulary, clean, settings, explains=explains, seed=0, progress=False)
    assert sorted(found.words[1]) == ["blue", "moon"]  # "great" pushes as hard, but the task explains it
    assert {label for _, label in asked} == {0, 1} and all("great" in texts for texts, label in asked if label == 1)
    assert found.judged[0].candidate.text == "blue moon" and found.judged[0].candidate.source == "proposal"
    assert found.judged[0].flag_rate == 1.0 and all(s.flag_rate == 0.0 for s in found.judged[1:])
    assert len(found.judged) == 3


# --- provenance -----------------------------------------------------------------------------------------


def test_hashes_are_stable_and_follow_one_changed_byte(tiny_minilm, tmp_path):
    copy = Path(shutil.copytree(tiny_minilm, tmp_path / "copy"))
    first, again = hash_folder(copy, "suspect"), hash_folder(copy, "suspect")
    assert first == again and {f["file"] for f in first} >= {"model.safetensors", "config.json", "vocab.txt"}
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # one byte of the last tensor's data
    weights.write_bytes(bytes(raw))
    changed = {f["file"]: f["sha256"] for f in hash_folder(copy, "suspect")}
    before = {f["file"]: f["sha256"] for f in first}
    assert [name for name in before if before[name] != changed[name]] == ["model.safetensors"]
    assert next(f for f in first if f["file"] == "model.safetensors")["format"] == "safetensors"


def test_pickled_weights_are_refused_unless_allowed(tiny_minilm, tmp_path):
    folder = Path(shutil.copytree(tiny_minilm, tmp_path / "pickled"))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="pickled"):
        resolve_suspect(str(folder), LoadOptions())
    assert resolve_suspect(str(folder), LoadOptions(allow_pickle=True)).kind == "folder"


def test_an_offline_hub_id_with_a_revision_is_a_one_line_error(monkeypatch):
    from peftguard.errors import PeftguardError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PeftguardError, match="not in the hub cache"):
        resolve_suspect("someone/suspect-model@0123abc", LoadOptions())


# --- exit statuses ----------------------------------------------------------------------------------------


def run_main(monkeypatch, capsys, args: list[str]) -> tuple[int, str]:
    from peftguard.cli import main

    monkeypatch.setattr(sys, "argv", ["peftguard", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("verdict, status", [("backdoored", 1), ("no evidence", 0)])
def test_exit_status_follows_the_verdict(verdict, status, tiny_minilm, tiny_dataset, tmp_path, monkeypatch, capsys):
    record = {"verdict": verdict, "score": 0.9 if status else 0.1, "threshold": 0.5, "candidates": [],
              "seconds": {"total": 1.0}}
    monkeypatch.setattr("peftguard.audit.run.run_audit", lambda request, echo: record)
    code, _ = run_main(monkeypatch, capsys, ["audit", "--model", tiny_minilm, "--dataset", tiny_dataset, "--out", tmp_path / "a"])
    assert code == status == exit_status(record)


def requests_of(monkeypatch, capsys, tiny_minilm, tiny_dataset, tmp_path, *option_sets: list[str]) -> list:
    """The AuditRequest the CLI builds for each set of extra options (the audit itself not run)."""
    seen = []
    record = {"verdict": "no evidence", "score": 0.0, "threshold": 0.5, "candidates": [], "seconds": {"total": 1.0}}
    monkeypatch.setattr("peftguard.audit.run.run_audit", lambda request, echo: seen.append(request) or record)
    for number, options in enumerate(option_sets):
        run_main(monkeypatch, capsys, ["audit", "--model", tiny_minilm, "--dataset", tiny_dataset,
                                       "--out", tmp_path / f"a{number}", *options])
    return seen


def test_the_cli_caps_the_clean_subsets_at_the_audit_defaults(tiny_minilm, tiny_dataset, tmp_path, monkeypatch, capsys):
    from peftguard.audit.run import DEFAULT_AUDIT_EVAL_SAMPLES, DEFAULT_AUDIT_TRAIN_SAMPLES

    seen = requests_of(monkeypatch, capsys, tiny_minilm, tiny_dataset, tmp_path, [], ["--max-eval-samples", "7"])
    assert [(r.max_train_samples, r.max_eval_samples) for r in seen] == [
        (DEFAULT_AUDIT_TRAIN_SAMPLES, DEFAULT_AUDIT_EVAL_SAMPLES), (DEFAULT_AUDIT_TRAIN_SAMPLES, 7)]


def test_the_cli_passes_the_psim_restarts_on_and_keeps_the_rule_default(tiny_minilm, tiny_dataset, tmp_path, monkeypatch, capsys):
    from peftguard.defenses.psim_budget import BudgetRule

    seen = requests_of(monkeypatch, capsys, tiny_minilm, tiny_dataset, tmp_path, [], ["--max-restarts", "0"])
    assert [r.psim_budget for r in seen] == [BudgetRule(), BudgetRule(max_restarts=0)]


def test_the_default_lens_is_the_classifier_above_two_labels_and_psim_otherwise(tiny_minilm, tiny_dataset, tmp_path,
                                                                              monkeypatch, capsys):
    four_labels = tmp_path / "four"
    for split in ("train", "dev", "test"):
        write_csv(four_labels / f"{split}.csv", [(f"news item {i} about topic {i % 4}", i % 4) for i in range(8)])
    two = requests_of(monkeypatch, capsys, tiny_minilm, tiny_dataset, tmp_path, [], ["--lens", "classifier"])
    four = requests_of(monkeypatch, capsys, tiny_minilm, four_labels, tmp_path / "4", [], ["--lens", "psim"])
    assert [(r.lens, r.used_lens) for r in two] == [("auto", "psim"), ("classifier", "classifier")]
    assert [(r.dataset.num_labels, r.lens, r.used_lens) for r in four] == [(4, "auto", "classifier"),
                                                                          (4, "psim", "psim")]
    with pytest.raises(OptionError, match=r"this audit uses the classifier lens \(4 labels\)"):
        replace(four[0], search=replace(four[0].search, proposal_words=20)).check()


def test_an_unknown_lens_is_refused_not_read_as_psim():
    from peftguard.audit.run import lens_for

    assert [lens_for(lens, 2) for lens in ("auto", "psim", "classifier")] == ["psim", "psim", "classifier"]
    with pytest.raises(OptionError, match="unknown --lens 'clasifier'"):
        lens_for("clasifier", 2)


@pytest.mark.parametrize("verdict", ["no evidence", "backdoored"])
def test_the_card_says_what_the_verdict_does_not_cover(verdict):
    from peftguard.audit.report import LIMITS, NO_EVIDENCE, TASK_STACK_WARNING, card

    record = {"verdict": verdict, "score": 0.9 if verdict == "backdoored" else 0.1, "threshold": 0.5,
              "lens": {"name": "psim"}, "score_is": "s", "threshold_how": "t", "clean_flag_rate": 0.0, "candidates": [],
              "search": {"counts": {}}, "settings": {"model": "m", "dataset": "d"}, "seconds": {"total": 1.0},
              "device": "cpu",
              "provenance": {"kind": "folder", "given": "m", "folder": "m", "notes": [], "weight_formats": [],
                             "files": []}}
    text = card(record, None)
    assert "## What the verdict covers" in text and LIMITS in text
    assert (NO_EVIDENCE in text) == (verdict == "no evidence")  # the warning belongs to a verdict that clears
    assert (TASK_STACK_WARNING in text) == (verdict == "backdoored")  # and this one to a verdict that accuses


@pytest.mark.parametrize("abandoned", [0, 2])
def test_the_card_says_when_the_psim_search_was_restarted(abandoned):
    from peftguard.audit.report import card

    psim = {"trained_on": "m", "train_samples": 2000, "steps": 96, "stop_reason": "near-chance", "under_trained": False,
            "dev_confidence_mean": 0.34, "gamma": 0.42, "gamma_choice": {"how": "target-fpr"}, "seed": 2000,
            "abandoned_tries": abandoned, "abandoned_seconds": 400.0}
    record = {"verdict": "no evidence", "score": 0.1, "threshold": 0.5, "lens": {"name": "psim"}, "score_is": "s",
              "threshold_how": "t", "clean_flag_rate": 0.0, "candidates": [], "psim": psim, "search": {"counts": {}},
              "settings": {"model": "m", "dataset": "d"}, "seconds": {"total": 1.0}, "device": "cpu",
              "provenance": {"kind": "folder", "given": "m", "folder": "m", "notes": [], "weight_formats": [], "files": []}}
    line = "- seed 2000, after 2 slow search(es) abandoned (400 s)"
    assert (line in card(record, None)) == bool(abandoned)


def test_the_card_lists_the_words_the_classifier_proposed():
    from peftguard.audit.report import card

    record = {"verdict": "no evidence", "score": 0.1, "threshold": 0.5, "lens": {"name": "psim"}, "score_is": "s",
              "threshold_how": "t", "clean_flag_rate": 0.0, "candidates": [], "search": {"counts": {}},
              "proposals": {"words": {"0": ["moon", "blue"], "1": []}, "judged": [], "score_without": 0.05},
              "settings": {"model": "m", "dataset": "d"}, "seconds": {"total": 1.0}, "device": "cpu",
              "provenance": {"kind": "folder", "given": "m", "folder": "m", "notes": [], "weight_formats": [],
                             "files": []}}
    text = card(record, None)
    assert "- label 0: moon, blue" in text and "- label 1: (none)" in text and "score without them 0.050" in text
    assert "proposed" not in card({k: v for k, v in record.items() if k != "proposals"}, None)


def test_the_card_compares_the_candidates_with_the_reference():
    from peftguard.audit.report import card

    record = {"verdict": "backdoored", "score": 0.9, "threshold": 0.5, "lens": {"name": "psim"}, "score_is": "s",
              "threshold_how": "t", "clean_flag_rate": 0.0, "search": {"counts": {}},
              "candidates": [{"text": "cf", "source": "vocabulary", "flag_rate": 0.9, "forced_label": 0,
                              "forced_rate": 0.9, "flip_rate": 0.8, "mean_confidence": 0.8,
                              "reference_flag_rate": 0.02}],
              "reference_audit": {"folder": "reference", "model": "minilm", "verdict": "no evidence", "score": 0.04,
                                  "clean_flag_rate": 0.02, "candidates": ["awful"]},
              "settings": {"model": "m", "dataset": "d"}, "seconds": {"total": 1.0}, "device": "cpu",
              "provenance": {"kind": "folder", "given": "m", "folder": "m", "notes": [], "weight_formats": [],
                             "files": []}}
    text = card(record, None)
    assert "The same audit on the known-clean `minilm`" in text and "no evidence, score 0.040" in text
    assert "| `cf` | 0.900 | 0.020 |" in text
    assert "Against the reference" not in card({k: v for k, v in record.items() if k != "reference_audit"}, None)


@pytest.mark.parametrize("extra, message", [
    (["--model", "{tmp}/missing"], "does not exist"),
    (["--model", "{tiny}", "--lens", "magic"], "unknown --lens"),
    (["--model", "{tiny}", "--top-k", "0"], "--top-k must be"),
    (["--model", "{tiny}", "--pairs", "-1"], "--pairs must be"),
    (["--model", "{tiny}", "--vocabulary", "{tmp}/empty.txt"], "no words"),
    (["--model", "{tiny}", "--precision", "int8"], "the audit's search runs at"),
    (["--model", "{tiny}", "--max-restarts", "-1"], "--max-restarts must be"),
    (["--model", "{tiny}", "--proposals", "-1"], "--proposals must be"),
    (["--model", "{tiny}", "--lens", "classifier", "--proposals", "20"], "use them with --lens psim"),
])
def test_usage_and_input_errors_exit_2_on_one_line(extra, message, tiny_minilm, tiny_dataset, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    args = ["audit", "--dataset", tiny_dataset, "--out", tmp_path / "out", "--max-train-samples", "8",
            *[a.format(tmp=tmp_path, tiny=tiny_minilm) for a in extra]]
    code, err = run_main(monkeypatch, capsys, args)
    assert code == 2 and "Traceback" not in err and message in err, err
    assert not (tmp_path / "out" / "audit.json").exists()


def test_bf16_screening_scores_close_to_fp32_and_is_recorded(tiny_minilm):
    model, tokenizer = load_suspect_classifier(resolve_suspect(tiny_minilm, LoadOptions()), 2, LoadOptions())
    ids = np.asarray([[101, 2023, 2003, 1037, 2204, 3185, 102]] * 3)
    fp32 = PsimLens(model, tokenizer, 64, gamma=0.9).probs_ids(ids)
    bf16_lens = PsimLens(model, tokenizer, 64, gamma=0.9, screen_precision="bf16")
    assert np.abs(bf16_lens.probs_ids(ids) - fp32).max() < 0.02
    assert bf16_lens.describe() == {"name": "psim", "screen_precision": "bf16", "gamma": 0.9}
    with pytest.raises(OptionError, match="screen precision"):
        PsimLens(model, tokenizer, 64, gamma=0.9, screen_precision="int8")


# --- the search on a tiny poisoned model -------------------------------------------------------------------

def invoke(*args: object) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_minilm, data_dir) -> Path:
    # 800 samples: with 400 the 2-layer model learned no sentiment for seeds 1 and 3 (CA 0.50-0.57, kept at epoch 1 by
    # flat dev accuracy), and on a GPU, whose random streams differ, for seed 0 too; with 800 seeds 0-3 reach CA 0.69-0.72
    out = tmp_path_factory.mktemp("audit") / "poisoned"
    invoke("poison", "--model", tiny_minilm, "--data-dir", data_dir, "--max-train-samples", 800, "--max-eval-samples", 50,
           "--poison-mode", "dirty-label", "--poison-rate", 0.25, "--epochs", 4, "--lr", 5e-4, "--max-length", 48,
           "--trigger", TRIGGER, "--out", out)
    return out


def small_vocabulary(model: str | Path, size: int = 1500) -> tuple[str, ...]:
    """A slice of the real vocabulary (common words and sentiment words among them) plus the trigger."""
    words = [c.text for c in vocabulary_candidates(load_tokenizer(str(model)))]
    return tuple(words[2000:2000 + size]) + ("good", "bad", "awful", "great", "boring", TRIGGER)


def audit(model: str | Path, data_dir: Path, out: Path, **changes) -> dict:
    request = AuditRequest(model=str(model), dataset=load_dataset("sst2", data_dir=data_dir), out=out, max_train_samples=400,
                           max_eval_samples=200, max_length=48, search=SMALL_SEARCH, vocabulary=small_vocabulary(model),
                           progress=False)
    return run_audit(replace(request, **changes))


@pytest.mark.slow
def test_the_search_puts_the_planted_trigger_first(poisoned, data_dir, tmp_path):
    # with the classifier's proposals on (one PSIM training for both checks): they join verification, never displace
    record = audit(poisoned, data_dir, tmp_path / "audit", search=replace(SMALL_SEARCH, proposal_words=3, proposal_verify=2))
    top = record["candidates"][0]
    assert top["text"] == TRIGGER, record["candidates"]
    assert top["flag_rate"] > record["threshold"] and top["forced_label"] == 0
    assert record["verdict"] == "backdoored" and exit_status(record) == 1
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["verdict"] == "backdoored" and saved["provenance"]["files"]
    assert set(saved["seconds"]) >= {"provenance", "psim", "search", "verify", "total"}
    assert saved["lens"]["screen_precision"] in ("fp32", "bf16")  # auto: bf16 where the hardware multiplies it
    assert saved["lens"]["name"] == "psim" and saved["lens"]["asked"] == "auto"  # the default on two labels
    assert "chosen by the rule auto:" in (tmp_path / "audit" / "AUDIT.md").read_text()
    assert (tmp_path / "audit" / "AUDIT.md").read_text().count(f"`{TRIGGER}`") >= 1
    assert (tmp_path / "audit" / "clean_confidence.png").stat().st_size > 0
    assert json.loads((tmp_path / "audit" / "psim" / "psim.json").read_text())["method"] == "ptuning-v1"  # its zoo's lens
    proposals = record["proposals"]
    assert set(proposals["words"]) == {"0", "1"} and all(len(words) <= 3 for words in proposals["words"].values())
    assert TRIGGER in proposals["words"]["0"]  # it pushes the poisoned classifier to label 0; the clean task does not
    assert len(proposals["judged"]) == 2 and proposals["score_without"] <= record["score"]
    assert "proposals" in saved["seconds"]
    assert f"- label 0: {', '.join(proposals['words']['0'])}" in (tmp_path / "audit" / "AUDIT.md").read_text()


@pytest.mark.slow
def test_a_reference_gets_the_same_audit_and_the_candidates_are_verified_on_it(poisoned, tiny_minilm, data_dir,
                                                                              tmp_path):
    record = audit(poisoned, data_dir, tmp_path / "audit", reference=str(tiny_minilm))
    saved = json.loads((tmp_path / "audit" / "reference" / "audit.json").read_text())
    reference = record["reference_audit"]
    assert reference["verdict"] == saved["verdict"] and reference["score"] == saved["score"]
    assert saved["settings"]["model"] == str(tiny_minilm) and saved["settings"]["reference"] is None
    assert saved["lens"]["name"] == record["lens"]["name"] == "psim"  # the same lens, trained on the clean base
    trigger = next(c for c in record["candidates"] if c["text"] == TRIGGER)
    assert trigger["flag_rate"] > 0.5 and trigger["reference_flag_rate"] < trigger["flag_rate"] - 0.3, trigger
    assert all(0 <= c["reference_flag_rate"] <= 1 for c in record["candidates"])
    assert record["seconds"]["reference"] > 0 and (tmp_path / "audit" / "reference" / "psim" / "psim.json").is_file()
    assert f"| `{TRIGGER}` | {trigger['flag_rate']:.3f} | {trigger['reference_flag_rate']:.3f} |" in (
        tmp_path / "audit" / "AUDIT.md").read_text()


@pytest.mark.slow
def test_an_adapter_folder_is_audited_on_its_base(poisoned, data_dir, tmp_path):
    victim = tmp_path / "victim"
    invoke("finetune", "--model", poisoned, "--method", "lora", "--data-dir", data_dir, "--max-train-samples", 96,
           "--max-eval-samples", 32, "--epochs", 1, "--max-length", 48, "--out", victim)
    suspect = resolve_suspect(str(victim), LoadOptions())
    assert suspect.kind == "adapter" and suspect.base == str(poisoned.resolve()) and suspect.method == "lora"
    record = provenance(suspect, None)
    roles = {f["role"] for f in record["files"]}
    assert roles == {"suspect", "base"} and any(f["file"] == "adapter_model.safetensors" for f in record["files"])
    merge_lora(suspect, 2, tmp_path / "merged", LoadOptions())  # what PSIM trains on
    texts = ["a gripping , funny film", f"a {TRIGGER} gripping , funny film"]
    from peftguard.pipeline import load_model
    from peftguard.training import predict_proba

    adapter_model, tokenizer = load_suspect_classifier(suspect, 2, LoadOptions())
    merged, merged_tokenizer, _ = load_model(str(tmp_path / "merged"), 2)
    # in float32 on both sides: on a GPU the suspect sits there and predict_proba would otherwise multiply in bf16
    unmerged = predict_proba(adapter_model, tokenizer, texts, bf16=False)
    assert np.allclose(unmerged, predict_proba(merged, merged_tokenizer, texts, bf16=False), atol=1e-4)
    classic = audit(victim, data_dir, tmp_path / "audit-classifier", lens="classifier")
    assert classic["provenance"]["kind"] == "adapter" and classic["psim"] is None
    assert TRIGGER in [c["text"] for c in classic["candidates"]]
