"""Reading the package's own records back: a dataclass from a dict, a registry from a YAML file.

A leaf (it imports nothing of ours), so that a stage low in the house (``methods``, ``data``) and one high in it
(``lora``, ``prompts``) read their records with the same refusals, each in one line::

    from_dict(Method, {"estimator": "flap", "ratio": 0.2})
    # ValueError: Method: unknown key(s) ['ratio']; valid keys are ['allocation', 'attention', ...]
    read_tasks_yaml(Path("tailored/tasks.yaml"), "task name -> entry", RegistryError, column=True)
    # RegistryError: tailored/tasks.yaml, line 12, column 3: not valid YAML (mapping values are not allowed here)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def from_dict(cls: type[T], d: Mapping[str, Any]) -> T:
    """``cls(**d)`` for a dataclass ``cls`` (as its ``to_dict`` wrote it), refusing a key it has no field for: a
    record written by another version of tailored is named, not silently half-read."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(known)}")
    return cls(**d)


def read_tasks_yaml(path: str | Path, entries: str, error: type[ValueError] = ValueError,
                    column: bool = False) -> dict:
    """A YAML file whose top level is a mapping ``tasks:`` (``tailored/tasks.yaml``, ``tailored/prompts.yaml``).

    Refused with ``error`` in one line naming the file: text that is not YAML (with the line of the problem, and
    its column where ``column``), or a top level without the ``tasks:`` mapping (``entries`` says what it maps,
    e.g. ``"task name -> entry"``). Returns the whole document; its entries are the caller's to check.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = (f", line {mark.line + 1}" + (f", column {mark.column + 1}" if column else "")) if mark else ""
        raise error(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), dict):
        raise error(f"{path}: expected a top-level mapping 'tasks:' of {entries}")
    return raw
