"""Every command the documents print is runnable as written from a fresh clone (checked without running it).

The commands are read from README.md, REPRODUCTION.md and BENCHMARKS.md: fenced and indented code blocks,
and inline code spans that start with ``peftguard``, ``python experiments/`` or ``python bench/``.

* ``peftguard run CONFIG ...``: the command line parses (``--out`` given, every flag known), the config
  exists and is planned in-process as ``--dry-run`` plans it; where the surrounding text states training
  or test sample counts, they are the config's.
* ``peftguard demo ...``: the command line parses and its config is built and planned the same way.
* any other ``peftguard`` command: the subcommand exists and its command line parses (every flag known,
  values of the right type, required options given). A bare mention without any option (``peftguard
  psim scan`` in prose) names a subcommand only, so only that it exists is checked.
* ``python experiments/X.py`` / ``python bench/X.py``: the file exists and its ``build_parser()`` accepts
  the arguments as written (types, required options), without running the script.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

DOCUMENTS = ("README.md", "REPRODUCTION.md", "BENCHMARKS.md")
PLACEHOLDER = "PLACEHOLDER"  # stands for a `<described value>` in a documented command
SHELL_ENDS = ("|", ">", ">>", "&&", ";", "||", "2>&1", "<")


@dataclass(frozen=True)
class Documented:
    document: str
    line: int
    text: str  # the command as the document prints it, continuations joined
    context: str  # the paragraph it sits in (for stated sizes)
    block: bool  # a code block (meant to be copied) rather than a span in prose

    @property
    def where(self) -> str:
        return f"{self.document}:{self.line}"


def documented_commands(name: str, text: str) -> list[Documented]:
    """The commands of one Markdown document, fenced and indented blocks first, then inline spans."""
    found: list[Documented] = []
    lines = text.splitlines()
    prose = list(lines)
    fenced = False
    for number, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            prose[number] = ""
            continue
        indented = not fenced and line.startswith("    ") and (number == 0 or not lines[number - 1].strip()
                                                                 or lines[number - 1].startswith("    "))
        if fenced or indented:
            prose[number] = ""
    blocks: dict[int, list[tuple[int, str]]] = {}
    for block, number, command in _join_blocks(lines):
        if _command_kind(command):
            blocks.setdefault(block, []).append((number, command))
    for commands in blocks.values():
        for number, command in commands:  # the prose above a block of several commands describes none alone
            context = _paragraph_before(lines, number) if len(commands) == 1 else ""
            found.append(Documented(name, number + 1, command, context, True))
    body = "\n".join(prose)
    for match in re.finditer(r"`([^`]+)`", body):
        command = " ".join(match.group(1).split())
        if _command_kind(command):
            number = body.count("\n", 0, match.start())
            found.append(Documented(name, number + 1, command, _paragraph_around(prose, number), False))
    return found


def _join_blocks(lines: list[str]) -> list[tuple[int, int, str]]:
    """Lines of fenced and indented code blocks, backslash continuations joined: (block, line index, line)."""
    out: list[tuple[int, int, str]] = []
    fenced, pending, start, block, previous = False, "", 0, 0, -2
    for number, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        indented = not fenced and line.startswith("    ") and bool(line.strip())
        if not (fenced or indented):
            continue
        if number != previous + 1:
            block += 1
        previous = number
        if not pending:
            start = number
        stripped = line.strip()
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        out.append((block, start, pending + stripped))
        pending = ""
    return out


def _paragraph_around(lines: list[str], number: int) -> str:
    start = number
    while start > 0 and lines[start - 1].strip():
        start -= 1
    stop = number
    while stop + 1 < len(lines) and lines[stop + 1].strip():
        stop += 1
    return " ".join(" ".join(lines[start:stop + 1]).split())


def _paragraph_before(lines: list[str], number: int) -> str:
    """The prose paragraph just above a code block (blank lines and the block's own lines skipped)."""
    above = number - 1
    while above >= 0 and (not lines[above].strip() or lines[above].startswith("    ")
                          or lines[above].lstrip().startswith("```")):
        above -= 1
    return _paragraph_around(lines, above) if above >= 0 else ""


def _settings(command: str) -> list[str]:
    """The environment variables a command line sets before its program (``NAME=value program ...``)."""
    names = []
    for word in shlex.split(re.sub(r"<[^<>]*>", PLACEHOLDER, command), comments=True):
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", word):
            break
        names.append(word.split("=", 1)[0])
    return names


def _words(command: str) -> list[str]:
    """The command's words: environment settings and interpreters dropped, placeholders kept as one word,
    cut at the first shell operator or comment."""
    command = re.sub(r"<[^<>]*>", PLACEHOLDER, command)
    words = shlex.split(command, comments=True)
    cut = next((i for i, w in enumerate(words) if w in SHELL_ENDS or w.startswith((">", "2>"))), len(words))
    words = words[:cut]
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if words and words[0] in ("python", ".venv/bin/python", "python3") and words[1:3] == ["-m", "peftguard"]:
        words = ["peftguard", *words[3:]]
    if words and words[0] == ".venv/bin/peftguard":
        words = ["peftguard", *words[1:]]
    return words


def _command_kind(command: str) -> str | None:
    try:
        words = _words(command)
    except ValueError:
        return None
    if not words:
        return None
    if words[0] == "peftguard":
        return "peftguard"
    if words[0] in ("python", ".venv/bin/python", "python3") and len(words) > 1 and \
            words[1].startswith(("experiments/", "bench/")) and words[1].endswith(".py"):
        return "script"
    if words[0].startswith("experiments/") and words[0].endswith(".sh"):
        return "shell"
    return None


def all_commands() -> list[Documented]:
    commands = []
    for name in DOCUMENTS:
        commands += documented_commands(name, (REPO / name).read_text(encoding="utf-8"))
    return commands


COMMANDS = all_commands()


# --- peftguard commands ---------------------------------------------------------------------------

def _click_command(words: list[str]):
    """(the click command, its name, the rest of the words) for ``peftguard ...`` words."""
    import typer

    from peftguard import cli

    command = typer.main.get_command(cli.app)
    name, rest = "peftguard", words[1:]
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        assert rest[0] in command.commands, f"no subcommand '{rest[0]}' under `{name}`"
        name, command, rest = f"{name} {rest[0]}", command.commands[rest[0]], rest[1:]
    return command, name, rest


def parse_peftguard(words: list[str]):
    """The parsed parameters of a ``peftguard`` command line, as the CLI would receive them."""
    command, name, rest = _click_command(words)
    rest = [w for w in rest if w != "--help"]  # --help only prints; the command path is what matters
    if words.count("--help") or (hasattr(command, "commands") and not rest):
        return name, None
    context = command.make_context(name, rest)
    return name, context.params


def check_peftguard(documented: Documented) -> None:
    words = _words(documented.text)
    bare = not any(w.startswith("-") for w in words[1:]) and len(words) <= 3
    if bare and not documented.block:  # a subcommand named in prose
        _click_command(words)
        return
    name, params = parse_peftguard(words)
    if name == "peftguard run":
        config_path = REPO / params["config"]
        assert config_path.is_file(), f"config {params['config']} does not exist"
        config = plan_config(config_path, params["max_cells"])
        check_stated_sizes(documented, config)
    elif name == "peftguard demo":
        from peftguard.demo import demo_config

        options = {k: params[k] for k in ("dataset", "attack", "model", "data_dir", "max_train_samples",
                                          "max_eval_samples", "epochs", "poison_epochs", "psim_epochs",
                                          "max_length", "seed")}
        config = demo_config(params["config"], tuple(params["defenses"] or ()), methods=tuple(params["methods"] or ()),
                             **options)
        _plan(config, 10_000)
        check_stated_sizes(documented, config)


def plan_config(path: Path, max_cells: int):
    from peftguard.config import load_config

    config = load_config(path)
    _plan(config, max_cells)
    return config


def _plan(config, max_cells: int) -> None:
    from peftguard.experiment import check_grid_size, plan_grid

    check_grid_size(config, max_cells)
    plan = plan_grid(config)
    assert plan.cells and plan.stages


# --- stated sizes ---------------------------------------------------------------------------------

TRAIN = re.compile(r"\b(\d+) (?:of (?:the |[\w-]+'s )?\d+ )?(?:(?:SST-2|IMDB|AG News|CR|CoLA) )?(?:training )?samples\b")
TEST = re.compile(r"\b(\d+)(?: (?:clean|SST-2|IMDB|AG News|CR|CoLA))? test samples\b|\bfull (\d+)-sample test set\b")


def stated_sizes(context: str) -> tuple[set[int], set[int], bool]:
    """Training and test sample counts the text states, and whether it says "full test set"."""
    train = {int(m.group(1)) for m in TRAIN.finditer(context)}
    test = {int(m.group(1) or m.group(2)) for m in TEST.finditer(context)}
    full = bool(re.search(r"\bfull (?:\d+-sample |SST-2 )?test set\b", context))
    return train, test, full


def check_stated_sizes(documented: Documented, config) -> None:
    """A count the paragraph states for this command is the config's (train: per stage; test: the subset)."""
    train, test, full = stated_sizes(documented.context)
    if train:
        assert train == {config.data.max_train_samples}, (
            f"{documented.where} states {sorted(train)} training samples; the config trains on "
            f"{config.data.max_train_samples}")
    subset = config.data.max_eval_samples
    if subset is None:
        assert not test or full or test <= full_test_sizes(config), (
            f"{documented.where} states {sorted(test)} test samples; the config tests on the full test set")
    elif test:
        assert test == {subset}, f"{documented.where} states {sorted(test)} test samples; the config tests on {subset}"
        assert not full, f"{documented.where} says the full test set; the config tests on {subset} samples"


def full_test_sizes(config) -> set[int]:
    from peftguard.data import default_data_dir, load_dataset

    if default_data_dir() is None:
        return set()
    return {len(load_dataset(name).test) for name in config.grid.datasets}


# --- scripts ----------------------------------------------------------------------------------------

def script_parser(path: Path):
    """``build_parser()`` of a script, imported without running it (its imports and sys.path restored)."""
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    spec = importlib.util.spec_from_file_location(f"documented_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            if name == "common":  # bench/common.py: not to be mistaken for another module of that name later
                del sys.modules[name]
    assert hasattr(module, "build_parser"), f"{path.relative_to(REPO)} has no build_parser() to check its options"
    return module.build_parser()


def check_script(documented: Documented) -> None:
    words = _words(documented.text)
    path = REPO / words[1]
    assert path.is_file(), f"{words[1]} does not exist"
    parser = script_parser(path)
    try:
        parser.parse_args(words[2:])
    except SystemExit as exc:
        pytest.fail(f"{documented.where}: `{documented.text}` does not parse: exit {exc.code} (see stderr)")


def check_shell(documented: Documented) -> None:
    """A shell script: it exists, can be run as written, and reads every variable the command sets."""
    import os

    words = _words(documented.text)
    path = REPO / words[0]
    assert path.is_file() and os.access(path, os.X_OK), f"{words[0]} does not exist or is not executable"
    script = path.read_text(encoding="utf-8")
    unread = [name for name in _settings(documented.text) if name not in ("PYTHONPATH", "PEFTGUARD_THREADS")
              and "${" + name not in script and "$" + name not in script]
    assert not unread, f"{words[0]} reads no {unread}"


@pytest.mark.parametrize("documented", COMMANDS, ids=lambda d: f"{d.where} {_words(d.text)[1] if len(_words(d.text)) > 1 else ''}")
def test_documented_command_is_runnable_as_written(documented: Documented) -> None:
    try:
        kind = _command_kind(documented.text)
        if kind == "peftguard":
            check_peftguard(documented)
        elif kind == "shell":
            check_shell(documented)
        else:
            check_script(documented)
    except AssertionError as exc:
        raise AssertionError(f"{documented.where}: `{documented.text}`: {exc}") from None
    except Exception as exc:  # a click usage error or a config error: the command would fail as written
        pytest.fail(f"{documented.where}: `{documented.text}`: {type(exc).__name__}: {exc}")


# --- the checker itself ----------------------------------------------------------------------------

def test_extraction_finds_block_inline_and_continued_commands() -> None:
    text = ("Run `peftguard run configs/x.yaml --out runs/x\n--stage-cache c` (600 training samples).\n\n"
            "```bash\npeftguard report runs/x   # comment\npython bench/a.py --poisoned <a folder> \\\n    --repeats 1\n```\n\n"
            "    PYTHONPATH=src .venv/bin/python experiments/b.py --out f\n")
    found = {d.text: d for d in documented_commands("doc.md", text)}
    assert set(found) == {"peftguard run configs/x.yaml --out runs/x --stage-cache c",
                          "peftguard report runs/x   # comment",
                          "python bench/a.py --poisoned <a folder> --repeats 1",
                          "PYTHONPATH=src .venv/bin/python experiments/b.py --out f"}
    assert _words("python bench/a.py --poisoned <a folder> --repeats 1") == [
        "python", "bench/a.py", "--poisoned", PLACEHOLDER, "--repeats", "1"]
    assert "600 training samples" in found["peftguard run configs/x.yaml --out runs/x --stage-cache c"].context


def test_a_command_without_its_required_option_or_with_an_unknown_flag_fails() -> None:
    from peftguard.errors import PeftguardError

    for words in (["peftguard", "run", "configs/table2.yaml"], ["peftguard", "run", "configs/table2.yaml", "--out", "x",
                                                                "--no-such-flag"],
                  ["peftguard", "psim", "nope"]):
        with pytest.raises((Exception, AssertionError)) as error:
            parse_peftguard(words)
        assert not isinstance(error.value, PeftguardError)
    assert parse_peftguard(["peftguard", "run", "configs/table2.yaml", "--out", "x"])[1]["out"] == Path("x")


def test_stated_sizes_are_read_and_compared() -> None:
    train, test, full = stated_sizes("victims on 600 SST-2 training samples; 400 SST-2 test samples; the full "
                                     "1821-sample test set; 292-297 of 600 truncated")
    assert (train, test, full) == ({600}, {400, 1821}, True)
    from peftguard.config import parse_config

    config = parse_config({"name": "x", "data": {"max_train_samples": 600, "max_eval_samples": 400}})
    wrong = Documented("doc.md", 1, "peftguard run x", "on 2000 training samples, 400 test samples", False)
    with pytest.raises(AssertionError, match="2000"):
        check_stated_sizes(wrong, config)
    check_stated_sizes(Documented("doc.md", 1, "peftguard run x", "on 600 samples, 400 test samples", False), config)


def test_every_document_has_commands_checked() -> None:
    assert {d.document for d in COMMANDS} == set(DOCUMENTS)
    assert any(_words(d.text)[:2] == ["peftguard", "run"] for d in COMMANDS)


def test_a_script_command_without_a_required_option_fails() -> None:
    """The Figure 3(c) command as REPRODUCTION.md printed it before (no --out) is caught."""
    documented = Documented("doc.md", 1, "python experiments/psim_lr_sweep.py --poisoned runs/probe/poisoned --lrs 2e-5",
                            "", True)
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check_script(documented)
