"""experiments/run_part.sh: every model of the part built, then audited (PSIM lens first), strengths, summaries."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("xargs") is None, reason="needs bash and xargs")
def test_run_part_builds_each_model_before_auditing_it_and_the_psim_lens_first(tmp_path):
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"  # runs the script's own inline Python; logs every experiment it would start
    stub.write_text(f'#!/usr/bin/env bash\nif [ "$1" = "-" ]; then exec {sys.executable} "$@"; fi\n'
                    f'echo "$*" >> {log}\n')
    stub.chmod(0o755)
    part = "held-apart-7"
    names = [m["name"] for m in yaml.safe_load((REPO / "experiments" / "zoo.yaml").read_text())["models"]
             if m["part"] == part]
    zoo = tmp_path / "zoo"
    subprocess.run(["bash", "experiments/run_part.sh", part, "1", str(zoo), str(tmp_path / "audit"),
                    str(tmp_path / "strength.json")], cwd=REPO, check=True, capture_output=True, timeout=120,
                   env={"PYTHON": str(stub), "PATH": "/usr/bin:/bin"})
    calls = log.read_text().splitlines()
    assert "--only none-such" in calls[0]  # zoo.json first
    builds = [c.split("--only ")[1].split()[0] for c in calls
              if c.startswith("experiments/zoo.py") and "none-such" not in c]
    assert sorted(builds) == sorted(names)
    agnews = [n for n in names if "agnews" in n]
    assert builds[:len(agnews)] == agnews  # the longest audits start first
    for name in names:
        mine = [i for i, c in enumerate(calls) if f"--only {name}" in c]
        lenses = [" psim" if "--lens psim" in calls[i] else " classifier" if "--lens classifier" in calls[i] else ""
                  for i in mine]
        steps = [calls[i].split()[0] + lens for i, lens in zip(mine, lenses)]
        assert steps == ["experiments/zoo.py", "experiments/audit_zoo.py psim", "experiments/zoo_strength.py",
                         "experiments/audit_zoo.py classifier"], (name, steps)
    psim_audits = [i for i, c in enumerate(calls) if "--lens psim" in c and "--only" in c]
    classifier_audits = [i for i, c in enumerate(calls) if "--lens classifier" in c and "--only" in c]
    assert max(psim_audits) < min(classifier_audits)  # with one slot, every PSIM-lens audit before any classifier one
    assert calls[-2].startswith("experiments/zoo_strength.py") and "--only" not in calls[-2]
    assert calls[-1].startswith("experiments/audit_zoo.py") and calls[-1].endswith("--summarize-only")
