"""The published JSON Schemas (draft 2020-12) of what the CLI prints with --format json.

report.schema.json: `check`, `hook` and `exec` (and the daemon's report); guests.schema.json:
`guests`; status.schema.json: `status`. Each document's `schema` field is the version its
schema describes (report.SCHEMA). The files ship in the wheel; validating against them needs a
JSON Schema library, which the tool itself does not depend on.
"""

from __future__ import annotations

from typing import Any

NAMES = ("report", "guests", "status")


def text(name: str) -> str:
    """The schema file `name` (one of NAMES) as shipped."""
    if name not in NAMES:
        raise ValueError(f"unknown schema {name!r}; known: {', '.join(NAMES)}")
    from importlib import resources

    return resources.files(__name__).joinpath(f"{name}.schema.json").read_text(encoding="utf-8")


def load(name: str) -> dict[str, Any]:
    """The schema `name` as a JSON object; its `$id` is how the others `$ref` it."""
    import json

    return json.loads(text(name))
