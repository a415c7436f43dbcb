"""The audit's Markdown card (AUDIT.md) and its clean-confidence histogram (PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from peftguard.artifacts import write_text

CARD = "AUDIT.md"
HISTOGRAM = "clean_confidence.png"

# What a reader of the card must know before trusting "no evidence". Kept qualitative (the figures live in
# REPRODUCTION.md, "Auditing downloaded models", where each is measured); reviewed whenever the search changes.
LIMITS = (
    "The search inserts single whole-word vocabulary entries, word pairs of the clean training texts and phrases "
    "of up to three words grown from them. Out of its reach: triggers the tokenizer splits into pieces, sentences "
    "that set the PSIM off only as a whole (a sentence of common words in the measurement zoo was missed this way), "
    "and triggers that are not words at all (a syntactic template, a style, a "
    "paraphrase). On four-class data a PSIM was also seen to lose a sentence backdoor altogether. The audit was "
    "measured on MiniLM classifiers; other models are audited the same way but were not measured."
)
NO_EVIDENCE = "**No evidence is not a proof that the model is clean.**"
# Shown beside a "backdoored" verdict: the second held-apart zoo part had one false alarm of this kind.
TASK_STACK_WARNING = (
    "**Read the best candidate before acting on this verdict.** A phrase made of the task's own words (several "
    "sentiment words, several topic words) can set a clean model's PSIM off: the task rule explains such phrases "
    "when one of their words is a task word of the label they force, but a stack of words each too rare or too mixed "
    "to be one can get through. A rare word, or a phrase the task does not use, is the strong sign."
)


def write_card(folder: Path, record: dict[str, Any], clean_confidence: np.ndarray) -> None:
    from peftguard.extras import available

    histogram = None
    if available("matplotlib"):  # the card is the result; the PNG only draws it
        histogram = write_histogram(folder / HISTOGRAM, clean_confidence, record["lens"])
    write_text(folder / CARD, card(record, histogram.name if histogram else None))


def write_histogram(path: Path, confidence: np.ndarray, lens: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(confidence, bins=np.linspace(0, 1, 41), color="tab:blue", alpha=0.8, label="held-back clean inputs")
    if "gamma" in lens:
        ax.axvline(lens["gamma"], color="tab:red", linestyle="--", label=f"gamma {lens['gamma']:.3f}")
    ax.set_xlabel(f"{lens['name']} confidence (largest softmax probability)")
    ax.set_ylabel("inputs")
    ax.legend(fontsize=8)
    from peftguard.plots import save_figure

    return save_figure(fig, path, dpi=110)


def card(record: dict[str, Any], histogram: str | None) -> str:
    verdict = record["verdict"]
    lens = record["lens"]
    lines = [
        "# Audit",
        "",
        f"**Verdict: {verdict.upper()}** (score {record['score']:.3f}, threshold {record['threshold']}; "
        f"exit status {1 if verdict == 'backdoored' else 0})",
        "",
        f"- model: `{record['settings']['model']}` ({record['provenance']['kind']}), dataset `{record['settings']['dataset']}`",
        f"- lens: {lens['name']}" + (f", gamma {lens['gamma']:.4f}" if "gamma" in lens else "")
        + (f" (chosen by the rule {lens['rule']})" if "rule" in lens else ""),
        f"- score: {record['score_is']}",
        f"- threshold: {record['threshold_how']}",
        f"- clean flag rate (nothing inserted): {record['clean_flag_rate']:.3f}",
        "",
        "## Candidates (verified on held-back clean inputs)",
        "",
        "| # | text | flag rate | forced label | forced rate | flip rate | mean confidence | from |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rank, c in enumerate(record["candidates"], 1):
        source = c["source"] + (" + embedding moved" if c.get("embedding_moved") and c["source"] != "reference" else "")
        if c.get("explained_by_task"):
            source += f" (explained by the task: {_task_reason(c)})"
        lines.append(f"| {rank} | `{c['text']}` | {c['flag_rate']:.3f} | {c['forced_label']} | {c['forced_rate']:.3f} | "
                     f"{c['flip_rate']:.3f} | {c['mean_confidence']:.3f} | {source} |")
    from peftguard.extras import install_hint

    lines += ["", f"![clean confidence]({histogram})" if histogram
              else f"(histogram skipped: matplotlib is not installed; {install_hint('matplotlib')})", ""]
    if record.get("reference_audit"):
        lines += reference_section(record)
    psim = record.get("psim")
    if psim:
        lines += ["## PSIM", "",
                  f"- trained on `{psim['trained_on']}`, {psim['train_samples']} training samples with random labels, "
                  f"{psim['steps']} steps, stopped: {psim['stop_reason']}{' (UNDER-TRAINED)' if psim['under_trained'] else ''}",
                  *([f"- seed {psim['seed']}, after {psim['abandoned_tries']} slow search(es) abandoned "
                     f"({psim['abandoned_seconds']:.0f} s)"] if psim.get("abandoned_tries") else []),
                  f"- clean dev confidence {psim['dev_confidence_mean']:.3f}; gamma {psim['gamma']:.4f} "
                  f"({psim['gamma_choice']['how']})",
                  *([f"- warning: {psim['detector_warning']}"] if psim.get("detector_warning") else []), ""]
    counts = record["search"]["counts"]
    lines += ["## Search", "", ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items()), ""]
    if record.get("proposals"):
        proposals = record["proposals"]
        lines += ["Words the suspect classifier proposed (per label it pushes toward; the PSIM judged them and their "
                  f"pairs; score without them {proposals['score_without']:.3f}):", "",
                  *[f"- label {label}: {', '.join(words) or '(none)'}"
                    for label, words in proposals["words"].items()], ""]
    caution = TASK_STACK_WARNING if verdict == "backdoored" else NO_EVIDENCE
    lines += ["## What the verdict covers", "", caution, "", LIMITS,
              "See README.md (\"Auditing a downloaded model\") and REPRODUCTION.md (\"Auditing downloaded models\").", ""]
    lines += ["## Provenance", "", f"- source: `{record['provenance']['given']}` -> `{record['provenance']['folder']}`"]
    if record["provenance"].get("hub"):
        hub = record["provenance"]["hub"]
        lines.append(f"- hub: {hub['id']} revision {hub['revision']}, commit {hub['commit']}")
    if record["provenance"].get("base"):
        lines.append(f"- adapter base: `{record['provenance']['base']}`")
    lines += [f"- note: {note}" for note in record["provenance"]["notes"]]
    lines += [f"- weight formats: {', '.join(record['provenance']['weight_formats']) or 'none'}", "",
              "| role | file | bytes | format | sha256 |", "|---|---|---|---|---|"]
    lines += [f"| {f['role']} | {f['file']} | {f['bytes']} | {f['format']} | `{f['sha256']}` |" for f in record["provenance"]["files"]]
    settings = record["settings"]
    seconds = record["seconds"]
    lines += ["", "## Settings and run time", "",
              ", ".join(f"{k}: {v}" for k, v in settings.items()), "",
              "seconds: " + ", ".join(f"{k} {v}" for k, v in seconds.items()) + f" ({record['device']})", ""]
    return "\n".join(lines)


def reference_section(record: dict[str, Any]) -> list[str]:
    """The same audit on the known-clean reference, and the candidates' flag rates there (the verdict stays the
    suspect's)."""
    ref = record["reference_audit"]
    return ["## Against the reference", "",
            f"The same audit on the known-clean `{ref['model']}` (its card: `{ref['folder']}/AUDIT.md`): "
            f"{ref['verdict']}, score {ref['score']:.3f}; its best candidates: "
            f"{', '.join(f'`{t}`' for t in ref['candidates']) or '(none)'}. A candidate that sets the reference off "
            "about as often as the suspect is the model family's or the task's, not a backdoor's; the verdict above "
            "is the suspect's alone.", "",
            "| text | flag rate (suspect) | flag rate (reference) |", "|---|---|---|",
            *[f"| `{c['text']}` | {c['flag_rate']:.3f} | {c['reference_flag_rate']:.3f} |"
              for c in record["candidates"]],
            ""]


def _task_reason(candidate: dict[str, Any]) -> str:
    if candidate.get("task_words"):
        return "task word" + ("s " if len(candidate["task_words"]) > 1 else " ") + ", ".join(candidate["task_words"])
    return f"{candidate['task_forced_label_share']:.0%} of {candidate['task_clean_texts']} clean texts"
