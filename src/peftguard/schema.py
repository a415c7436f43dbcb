"""The JSON Schema of experiment configs, so editors can check and complete them.

``peftguard schema`` prints it; the repository keeps a copy in ``schemas/experiment.schema.json``
(a test keeps it equal to what the command prints). A YAML file that starts with
``# yaml-language-server: $schema=<path or URL of that file>`` is checked as it is typed.
"""
from __future__ import annotations

import json
from typing import Any

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"  # the dialect pydantic writes


def experiment_schema() -> dict[str, Any]:
    """The schema of a config file: :class:`peftguard.config.ExperimentConfig` plus ``include:``.

    ``include:`` is read before validation (``config.load_config``), so the model has no field for it;
    a file that includes others still says its own ``name``, so ``name`` stays required (the shared
    ``configs/_*.yaml`` fragments are included, never run, and carry no schema hint).
    """
    from peftguard.config import INCLUDE_KEY, ExperimentConfig

    schema = ExperimentConfig.model_json_schema(mode="validation")
    include = {"description": "files (relative to this one) whose keys this file inherits; its own keys win",
               "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    schema["properties"] = {INCLUDE_KEY: include, **schema["properties"]}
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def schema_text() -> str:
    """The schema as the command prints it: indented JSON, keys in pydantic's order, one final newline."""
    return json.dumps(experiment_schema(), indent=2, ensure_ascii=False) + "\n"
