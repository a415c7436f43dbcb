"""Atomic writes: an artifact is either complete on disk or absent.

Files and folders are written under a temporary name beside their destination and renamed into
place; a Ctrl-C or crash leaves at most a ``.NAME.tmp-PID-*`` entry, never a half-written artifact.
Temporaries carry the writer's process id, and the next write of the same artifact removes those
whose writer is gone (a run killed with SIGKILL cannot clean up after itself).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block finishes.

    An existing ``path`` is kept untouched until the new folder is complete, then swapped for it
    in one step (``renameat2(RENAME_EXCHANGE)`` on Linux). Where that is unavailable it is moved
    aside as ``.NAME.old-PID`` first; a writer killed between those two renames leaves the old
    folder there, and :func:`recover_interrupted` (run by every later write or output check) puts it back.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not (path.exists() or path.is_symlink()):
        os.replace(tmp, path)
    elif _exchange(tmp, path):
        _remove(tmp)  # now holds the old folder
    else:
        old = _old_name(path, os.getpid())
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)


def _old_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.old-{pid}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    rename = _renameat2()
    if rename is None:
        return False
    at_cwd, exchange = -100, 2  # AT_FDCWD, RENAME_EXCHANGE
    if rename(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), exchange) == 0:
        return True
    return False  # EINVAL (a filesystem without exchange), ENOSYS: fall back to two renames


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # glibc before 2.28, musl
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_interrupted(path: str | Path) -> bool:
    """Put back an artifact whose writer died between moving it aside and renaming the new one in.

    Returns True when ``path`` was missing and its ``.NAME.old-PID`` (of a dead writer) was restored.
    """
    path = Path(path).absolute()
    if path.exists() or path.is_symlink() or not path.parent.is_dir():
        return False
    pattern = re.compile(rf"\.{re.escape(path.name)}\.old-(\d+)")
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _process_alive(int(match.group(1))):
            os.replace(entry, path)
            return True
    return False


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the ``.NAME.tmp-PID-*`` and ``.NAME.old-PID`` entries beside ``path`` whose process is gone."""
    path = Path(path).absolute()
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:tmp|old)-(\d+)(?:-.*)?")
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    recover_interrupted(path)  # an old artifact a killed writer moved aside is restored, not removed
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _process_alive(int(match.group(1))):
            _remove(entry)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or a number no pid can be)
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# --- where a command may write ---------------------------------------------------------------------
#
# One rule for every --out: a command writes only to a path that does not exist, an empty folder,
# or an output of the same kind made by this tool (recognised by its marker file or content).
# Anything else is refused before any work unless the user passes --overwrite. An output may never
# be, hold or lie inside one of the command's inputs, whatever the flags; a folder output may never
# be the current directory or one above it.

OVERWRITE_HINT = "choose a new or empty --out, or pass --overwrite to replace it"


Inputs = Iterable[str | Path | None]


def check_output_dir(
    out: str | Path, *, marker: str, kind: str, inputs: Inputs = (), models: Inputs = (), overwrite: bool = False
) -> Path:
    """Refuse an ``--out`` folder this command must not write; return it resolved.

    ``marker`` is the file (a manifest) that a ``kind`` output made by this tool always holds.
    ``inputs`` may not be replaced (be or lie inside ``out``); ``models`` (model and PSIM folders)
    may not be written into either.
    """
    from peftguard.errors import OutputError

    resolved = Path(out).resolve()
    _check_not_an_input(out, resolved, inputs, models)
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise OutputError(f"--out {out} is the current directory or holds it; give a new folder for the {kind}")
    recover_interrupted(resolved)
    _check_parent_is_a_folder(out, resolved)
    if overwrite or not resolved.exists():
        return resolved
    if not resolved.is_dir():
        raise OutputError(f"--out {out} is a file, not a {kind} folder; {OVERWRITE_HINT}")
    entries = sorted(entry.name for entry in resolved.iterdir())
    if not entries or (resolved / marker).is_file():
        return resolved
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    raise OutputError(f"--out {out} holds files that are not a {kind} made by peftguard ({shown}); {OVERWRITE_HINT}")


def check_output_file(
    out: str | Path, *, kind: str, made_here: Callable[[Path], bool], inputs: Inputs = (), models: Inputs = (),
    overwrite: bool = False,
) -> Path:
    """Refuse an ``--out`` file this command must not write (a folder, an input, a user's file); return it resolved.

    ``made_here(path)`` tells an existing file of the same ``kind`` written by this tool.
    """
    from peftguard.errors import OutputError

    resolved = Path(out).resolve()
    _check_not_an_input(out, resolved, inputs, models)
    if resolved.is_dir():
        raise OutputError(f"--out {out} is a folder; give a file name for the {kind} (e.g. {Path(out) / 'out.json'})")
    _check_parent_is_a_folder(out, resolved)
    if resolved.exists() and resolved.stat().st_size and not overwrite and not _safely(made_here, resolved):
        raise OutputError(f"--out {out} is a file that is not a {kind} made by peftguard; {OVERWRITE_HINT}")
    return resolved


def _safely(made_here: Callable[[Path], bool], path: Path) -> bool:
    try:
        return made_here(path)
    except (OSError, ValueError, RecursionError):
        return False


def _check_not_an_input(out: str | Path, resolved: Path, inputs: Inputs, models: Inputs) -> None:
    from peftguard.errors import OutputError

    for given, sealed in [*((i, False) for i in inputs), *((m, True) for m in models)]:
        if given is None or not Path(given).exists():
            continue  # embedded model names, hub ids, stdin
        source = Path(given).resolve()
        if resolved == source or source.is_relative_to(resolved):
            raise OutputError(f"--out {out} would replace the input {given}; choose another --out")
        if sealed and resolved.is_relative_to(source):
            raise OutputError(f"--out {out} lies inside the input model folder {given}; choose a folder outside it")


def _check_parent_is_a_folder(out: str | Path, resolved: Path) -> None:
    from peftguard.errors import OutputError

    for ancestor in resolved.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputError(f"--out {out}: {ancestor} is a file, so nothing can be written below it")
            return


def looks_like_json_with(path: Path, keys: Iterable[str]) -> bool:
    """Whether ``path`` holds a JSON object with every one of ``keys`` (how a written metrics file is told)."""
    if path.stat().st_size > 50_000_000:
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    return isinstance(data, dict) and all(key in data for key in keys)
