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
    """The schema of :class:`peftguard.config.ExperimentConfig`, as a config file is validated."""
    from peftguard.config import ExperimentConfig

    return {"$schema": JSON_SCHEMA_DIALECT, **ExperimentConfig.model_json_schema(mode="validation")}


def schema_text() -> str:
    """The schema as the command prints it: indented JSON, keys in pydantic's order, one final newline."""
    return json.dumps(experiment_schema(), indent=2, ensure_ascii=False) + "\n"
