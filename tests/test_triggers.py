from collections import Counter

import pytest

from peftguard.data import Example
from peftguard.errors import OptionError
from peftguard.poisoning import poison_count_from, poison_examples
from peftguard.triggers import (
    BadNetTrigger,
    InSentTrigger,
    PoisonMode,
    build_trigger,
    triggered_test_set,
)

SENTENCE = "the movie was a total waste of two hours"


def test_badnet_inserts_exactly_count_words_at_word_boundaries():
    trigger = BadNetTrigger(("mn", "cf"), count=3)
    out = trigger.triggered(SENTENCE, seed=1).split(" ")
    assert len(out) == len(SENTENCE.split(" ")) + 3
    remaining = [w for w in out if w not in ("mn", "cf")]
    assert remaining == SENTENCE.split(" ")  # original words kept, in order


def test_trigger_positions_are_seeded_and_vary_with_seed():
    trigger = BadNetTrigger()
    assert trigger.triggered(SENTENCE, 7) == trigger.triggered(SENTENCE, 7)
    positions = {trigger.triggered(SENTENCE, seed).split(" ").index("mn") for seed in range(40)}
    assert len(positions) > 4  # random positions, not a fixed slot
    assert positions <= set(range(len(SENTENCE.split(" ")) + 1))


def test_insent_inserts_the_whole_sentence_between_words():
    out = InSentTrigger().triggered(SENTENCE, 3)
    assert "I watched this 3D movie" in out
    assert out.replace("I watched this 3D movie", "").split() == SENTENCE.split()


def test_build_trigger_names_and_errors():
    assert build_trigger("badnet", ["cf", "bb"]).words == ("cf", "bb")
    assert build_trigger("insent", ["hello", "world"]).sentence == "hello world"
    with pytest.raises(OptionError, match="unknown attack"):
        build_trigger("nope")
    with pytest.raises(OptionError):
        BadNetTrigger(("  ",))


EXAMPLES = [Example(f"sentence number {i}", i % 2) for i in range(20)]  # 10 of label 0, 10 of label 1


def test_clean_label_poisoning_triggers_target_samples_and_keeps_labels():
    poisoned, report = poison_examples(EXAMPLES, [BadNetTrigger()], target_label=0, count=4,
                                       mode=PoisonMode.CLEAN_LABEL, seed=0)
    assert len(poisoned) == len(EXAMPLES) and report.eligible == 10
    changed = [i for i, (a, b) in enumerate(zip(EXAMPLES, poisoned)) if a != b]
    assert changed == report.poisoned_indices and len(changed) == 4
    assert all(EXAMPLES[i].label == 0 and poisoned[i].label == 0 and "mn" in poisoned[i].text.split() for i in changed)


def test_dirty_label_poisoning_flips_non_target_samples_to_target():
    poisoned, report = poison_examples(EXAMPLES, [BadNetTrigger()], target_label=0, count=5,
                                       mode=PoisonMode.DIRTY_LABEL, seed=0)
    assert all(EXAMPLES[i].label == 1 and poisoned[i].label == 0 for i in report.poisoned_indices)
    assert sum(ex.label == 0 for ex in poisoned) == 15


def test_poisoning_is_reproducible_and_seed_dependent():
    a, ra = poison_examples(EXAMPLES, [BadNetTrigger()], target_label=0, count=3, mode="clean-label", seed=5)
    b, rb = poison_examples(EXAMPLES, [BadNetTrigger()], target_label=0, count=3, mode="clean-label", seed=5)
    assert a == b and ra.poisoned_indices == rb.poisoned_indices
    others = {tuple(poison_examples(EXAMPLES, [BadNetTrigger()], target_label=0, count=3, mode="clean-label", seed=s)[1].poisoned_indices)
              for s in range(10)}
    assert len(others) > 1


def test_several_triggers_share_the_poisoned_samples():
    poisoned, report = poison_examples(EXAMPLES, [BadNetTrigger(), InSentTrigger()], target_label=0, count=6,
                                       mode=PoisonMode.DIRTY_LABEL, seed=0)
    kinds = Counter("I watched this 3D movie" in poisoned[i].text for i in report.poisoned_indices)
    assert kinds == Counter({True: 3, False: 3})


def test_poison_count_above_eligible_is_an_error_before_training():
    with pytest.raises(OptionError, match="exceeds the 10 eligible"):
        poison_examples(EXAMPLES, [BadNetTrigger()], target_label=0, count=11, mode="clean-label", seed=0)


def test_poison_count_and_rate():
    assert poison_count_from(1000, None, 0.25) == 250
    assert poison_count_from(1000, 1500, None) == 1500
    with pytest.raises(OptionError):
        poison_count_from(1000, 10, 0.1)
    with pytest.raises(OptionError):
        poison_count_from(1000, None, 1.5)


def test_triggered_test_set_keeps_only_non_target_samples():
    triggered = triggered_test_set(EXAMPLES, BadNetTrigger(), target_label=0, seed=0)
    assert len(triggered) == 10 and all(ex.label == 1 and "mn" in ex.text.split() for ex in triggered)
    assert triggered == triggered_test_set(EXAMPLES, BadNetTrigger(), target_label=0, seed=0)
