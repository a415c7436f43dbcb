"""Check that rebuilt zoo models are the files a recorded audit saw: sha256 of every weight file against its provenance.

    python experiments/zoo_provenance_check.py --zoo runs/zoo --audits results/audit_zoo/held_apart_4 \
        --out results/audit_zoo/held_apart_4_rebuild_check.json

A checkout loses runs/ (the built zoo); the committed audits keep the sha256 of each file they read. Rebuilding a
model from experiments/zoo.yaml gives the same bytes on one machine (REPRODUCTION.md, "Run to run"), and this script
says whether it did, so that a new audit of a rebuilt model (another lens, say) is of the model the recorded audit
judged. Only weight files are compared (their manifests record training time and differ run to run).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from peftguard.audit.sources import sha256_file

WEIGHT_FORMATS = ("safetensors",)


def check(model_folder: Path, recorded: dict[str, Any]) -> dict[str, Any]:
    """Compare the weight files with the recorded provenance: the suspect's, and a LoRA victim's poisoned base's (a
    folder beside the victim's in the zoo; a packaged base such as minilm is not rebuilt and not compared)."""
    folders = {"suspect": model_folder}
    if "/" in str(recorded.get("base")):  # a folder, not a packaged name
        folders["base"] = model_folder.parent / Path(recorded["base"]).name
    weights = [f for f in recorded["files"] if f["role"] in folders and f["format"] in WEIGHT_FORMATS]
    files = []
    for entry in weights:
        path = folders[entry["role"]] / entry["file"]
        now = sha256_file(path) if path.is_file() else None
        files.append({"role": entry["role"], "file": entry["file"], "recorded": entry["sha256"], "rebuilt": now,
                      "same": now == entry["sha256"]})
    return {"folder": str(model_folder), "files": files, "same": bool(files) and all(f["same"] for f in files)}


def build_parser() -> argparse.ArgumentParser:
    """The command line (apart from main, so that tests check the documented commands without running them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True,
                        help="the built zoo (its zoo.json names each model's folder)")
    parser.add_argument("--audits", type=Path, required=True, help="a folder of recorded NAME.audit.json files")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    folders = {m["name"]: Path(m["model"]) for m in json.loads((args.zoo / "zoo.json").read_text(encoding="utf-8"))}
    results = {}
    for recorded in sorted(args.audits.glob("*.audit.json")):
        name = recorded.name.removesuffix(".audit.json")
        if name not in folders or not folders[name].is_dir():
            results[name] = {"folder": str(folders.get(name)), "files": [], "same": None}
            continue
        provenance = json.loads(recorded.read_text(encoding="utf-8"))["provenance"]
        results[name] = check(folders[name], provenance)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for name, result in results.items():
        print(f"{name}: {'not built' if result['same'] is None else 'same' if result['same'] else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
