"""Records read back with one set of refusals: a dataclass from a dict, a ``tasks:`` registry from YAML."""

from __future__ import annotations

import pytest

from tailored import prompts
from tailored.data import RegistryError, read_registry
from tailored.lora import LoraSettings
from tailored.methods import METHODS, Method


@pytest.mark.parametrize("cls, record", [(Method, METHODS["fisher_refit"].to_dict()),
                                         (LoraSettings, LoraSettings(rank=4).to_dict())])
def test_a_record_reads_back_and_an_unknown_key_is_named(cls, record):
    assert cls.from_dict(record).to_dict() == record
    known = sorted(record)
    with pytest.raises(ValueError) as err:
        cls.from_dict({**record, "ratio": 0.2})
    assert str(err.value) == f"{cls.__name__}: unknown key(s) ['ratio']; valid keys are {known}"


def test_a_registry_that_is_not_yaml_is_named_with_its_line_and_column(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n  piqa: [unclosed\n")
    with pytest.raises(RegistryError) as err:
        read_registry(path)
    assert str(err.value).startswith(f"{path}, line 3, column 1: not valid YAML (")
    path.write_text("- a list\n")
    with pytest.raises(RegistryError) as err:
        read_registry(path)
    assert str(err.value) == f"{path}: expected a top-level mapping 'tasks:' of task name -> entry"


def test_a_prompts_file_that_is_not_yaml_is_named_with_its_line(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("tasks:\n  piqa: [unclosed\n")
    with pytest.raises(ValueError) as err:
        prompts.prompt_table(path)
    assert str(err.value).startswith(f"{path}, line 3: not valid YAML (")
    path.write_text("tasks: 3\n")
    with pytest.raises(ValueError) as err:
        prompts.prompt_table(path)
    assert str(err.value) == f"{path}: expected a top-level mapping 'tasks:' of task -> {{prompts: {{name: ...}}}}"
