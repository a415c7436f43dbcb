"""How grid stages are named and where they live: a leaf module both the planner and the stage runners read.

A stage's name is its kind and a hash of its settings and upstream names, so a changed setting gets a
new folder and an unchanged one is found again; ``stage.json`` in that folder marks it finished.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAGE_FILE = "stage.json"
STAGE_KINDS = ("poison", "victim", "psim", "evaluate")
_STAGE_NAME = re.compile(rf"^({'|'.join(STAGE_KINDS)})-[0-9a-f]{{12}}$")


@dataclass(frozen=True)
class Stage:
    kind: str  # one of STAGE_KINDS
    settings: dict[str, Any]
    deps: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        blob = json.dumps({"kind": self.kind, "settings": self.settings, "deps": self.deps}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.key}"


def is_stage_name(reference: str) -> bool:
    """True for a stage's name (as opposed to a model reference such as 'minilm')."""
    return bool(_STAGE_NAME.match(reference))


def stage_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / "stages" / name
