"""Prompts as data: turn an ``Example`` into the strings a language model is scored on.

Every task has three prompts (``harness``, ``general``, ``task_specific``), all written in
``tailored/prompts.yaml``; this module only reads that file and fills the templates. A prompt turns one
example into *requests*, pairs ``(context, continuation)`` whose log-likelihood the evaluator compares::

    prompt = get_prompt("sst2", "task_specific")
    prompt.render_context(ex)   # 'Is the reviewer expressing ... ?\\nReview: a gripping film\\nAnswer:'
    prompt.render_choices(ex)   # [' negative', ' positive']   (target delimiter included)
    prompt.render_target(ex)    # ' positive'                  (the gold answer, for shots and training)

so that ``render_context(ex) + render_target(ex)`` is the solved example a few-shot prefix or a LoRA
training set is made of. Conventions follow lm-evaluation-harness: the context ends without a space,
answers start with the target delimiter ``" "``, solved shots are joined by ``"\\n\\n"``.

Three scoring modes (``Prompt.scoring``):

- ``choices``: multiple choice, one shared context, one continuation per answer (classification is
  multiple choice over verbalizers such as ``("negative", "positive")``);
- ``partial``: WinoGrande partial scoring, one context per option (the sentence up to the blank with the
  option filled in), one shared continuation (the rest of the sentence);
- ``generate``: greedy generation from the context until a stop string; the target is the first reference.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tailored.choices import PROMPT_NAMES  # noqa: F401  (every task has these prompts; listed in choices for params)
from tailored.records import read_tasks_yaml

PROMPTS_FILE = Path(__file__).with_name("prompts.yaml")
SCORING_MODES = ("choices", "partial", "generate")
BLANK = "_"  # WinoGrande's blank
DEFAULT_METRICS = {"choices": ("acc", "acc_norm"), "partial": ("acc",)}
GENERATION_METRICS = ("exact_match", "f1", "rouge1", "rouge2", "rougeL")


class ExampleLike(Protocol):
    """What a prompt reads from an example (``tailored.data.Example`` satisfies it)."""

    task: str
    id: str
    fields: Mapping[str, str]
    choices: tuple[str, ...]
    label: int | None
    references: tuple[str, ...]


@dataclass(frozen=True)
class Prompt:
    """One prompt of one task, read from ``prompts.yaml``.

    ``template`` is a Python format string over the example's ``fields``; ``choices`` are fixed
    verbalizers (index = label) or empty to use the example's own choices (or ``choice_fields``).
    ``metrics`` names what the evaluator reports: ``acc``/``acc_norm`` for choices, ``acc`` for partial
    scoring, ``exact_match``/``f1`` or ``rouge1``/``rouge2``/``rougeL`` for generation (empty: the default
    of the scoring mode). ``max_new_tokens`` bounds generation.
    """

    task: str
    name: str
    template: str
    scoring: str = "choices"
    choices: tuple[str, ...] = ()
    choice_fields: tuple[str, ...] = ()
    choice_template: str = "{choice}"
    target_delimiter: str = " "
    fewshot_separator: str = "\n\n"
    until: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 32
    metrics: tuple[str, ...] = ()
    source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------------------------- pieces
    def _format(self, example: ExampleLike, **more: str) -> str:
        values = {**example.fields, **more}
        try:
            return self.template.format(**values)
        except KeyError as err:
            raise ValueError(
                f"prompt {self.task}/{self.name} needs field {err.args[0]!r}, but example {example.id!r} has "
                f"fields {sorted(example.fields)}; fix the template in {PROMPTS_FILE.name} or the data"
            ) from None

    def options(self, example: ExampleLike) -> list[str]:
        """The raw answer options of an example, before ``choice_template``: (n_choices,) strings."""
        if self.choices:
            return list(self.choices)
        if self.choice_fields:
            return [example.fields[f] for f in self.choice_fields]
        if not example.choices:
            raise ValueError(f"example {example.id!r} of task {self.task!r} has no choices to score")
        return list(example.choices)

    def choice_texts(self, example: ExampleLike) -> list[str]:
        """Each answer as written after the delimiter (what ``acc_norm`` divides by, in bytes)."""
        if self.scoring == "partial":
            return [self._partial_parts(example)[1]] * len(self.options(example))
        return [self.choice_template.format(choice=c) for c in self.options(example)]

    def _partial_parts(self, example: ExampleLike) -> tuple[str, str]:
        """WinoGrande: the sentence split at the blank into (before, after.strip())."""
        sentence = example.fields["sentence"]
        if BLANK not in sentence:
            raise ValueError(f"winogrande example {example.id!r} has no blank {BLANK!r} in its sentence")
        at = sentence.index(BLANK)
        return sentence[:at], sentence[at + 1:].strip()

    # ------------------------------------------------------------------------------------- rendering
    def render_context(self, example: ExampleLike) -> str:
        """The context of the example; for partial scoring, the context filled with the gold option."""
        if self.scoring == "partial":
            before, _ = self._partial_parts(example)
            return self._format(example, before=before, option=self.options(example)[self.gold_index(example)])
        return self._format(example)

    def render_contexts(self, example: ExampleLike) -> list[str]:
        """One context per answer, (n_choices,): all equal except under partial scoring."""
        if self.scoring == "partial":
            before, _ = self._partial_parts(example)
            return [self._format(example, before=before, option=o) for o in self.options(example)]
        return [self._format(example)] * len(self.options(example))

    def render_choices(self, example: ExampleLike) -> list[str]:
        """The continuations scored for each answer, (n_choices,), target delimiter included.

        Empty for ``scoring: generate`` (nothing to choose from).
        """
        if self.scoring == "generate":
            return []
        return [self.target_delimiter + t for t in self.choice_texts(example)]

    def requests(self, example: ExampleLike) -> list[tuple[str, str]]:
        """The ``(context, continuation)`` pairs to score, one per answer, in answer order."""
        return list(zip(self.render_contexts(example), self.render_choices(example)))

    def render_target(self, example: ExampleLike) -> str:
        """The gold continuation (delimiter included): ``render_context + render_target`` is the solved example."""
        if self.scoring == "generate":
            if not example.references:
                raise ValueError(f"example {example.id!r} of task {self.task!r} has no reference answer")
            return self.target_delimiter + example.references[0]
        return self.render_choices(example)[self.gold_index(example)]

    def render_example(self, example: ExampleLike) -> str:
        """The solved example, context and gold answer: one few-shot shot or one training text."""
        return self.render_context(example) + self.render_target(example)

    def gold_index(self, example: ExampleLike) -> int:
        """The index of the gold answer among ``render_choices`` (the example's label, checked)."""
        n = len(self.options(example))
        if example.label is None or not 0 <= example.label < n:
            raise ValueError(f"example {example.id!r} of task {self.task!r} has label {example.label!r}, "
                             f"not an index into its {n} choices")
        return example.label


# ------------------------------------------------------------------------------------------ loading
@functools.lru_cache(maxsize=4)
def _load(path: str) -> dict[str, dict[str, Prompt]]:
    """The prompts of ``path``; a malformed file raises ``ValueError`` naming the file, the task and the prompt."""
    raw = read_tasks_yaml(path, "task -> {prompts: {name: ...}}")
    defaults = raw.get("defaults") or {}
    known = set(Prompt.__dataclass_fields__) - {"task", "name", "extra"}
    table: dict[str, dict[str, Prompt]] = {}
    for task, spec in raw["tasks"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("prompts"), dict) or not spec["prompts"]:
            raise ValueError(f"{path}: task {task!r} needs 'prompts:', a mapping of prompt name -> {{template: ...}}")
        task_level = {k: v for k, v in spec.items() if k != "prompts"}
        table[task] = {}
        for name, pspec in spec["prompts"].items():
            if not isinstance(pspec, dict):
                raise ValueError(f"{path}: {task}/{name} must be a mapping of keys (template, ...)")
            merged = {**defaults, **task_level, **pspec}
            kwargs = {k: v for k, v in merged.items() if k in known}
            for key in ("choices", "choice_fields", "until", "metrics"):
                if key in kwargs:
                    kwargs[key] = tuple(kwargs[key])
            if kwargs.get("scoring", "choices") not in SCORING_MODES:
                raise ValueError(f"{path}: {task}/{name} has scoring {kwargs['scoring']!r}, "
                                 f"not one of {SCORING_MODES}")
            if not kwargs.get("metrics"):
                if kwargs.get("scoring") == "generate":
                    raise ValueError(f"{path}: {task}/{name} generates, so it must name its metrics")
                kwargs["metrics"] = DEFAULT_METRICS[kwargs.get("scoring", "choices")]
            if not isinstance(kwargs.get("template"), str):
                raise ValueError(f"{path}: {task}/{name} has no template (a format string over the task's fields)")
            extra = {k: v for k, v in merged.items() if k not in known}
            table[task][name] = Prompt(task=task, name=name, extra=extra, **kwargs)
    return table


def template_fields(template: str) -> set[str]:
    """The field names a template reads: ``"Q: {question}\\nA:"`` -> ``{"question"}`` (``ValueError`` if malformed)."""
    return {name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name}


def check_prompts(task_fields: Mapping[str, Collection[str] | None], path: str | Path | None = None) -> list[str]:
    """The problems of ``prompts.yaml`` for these tasks, one line each naming the file, task, prompt and field.

    ``task_fields``: the fields each task's examples have (``tailored.data.task_fields``; ``None``: not known yet,
    e.g. before ``tailored prepare``, so only the template's syntax is checked). A template or ``choice_fields``
    naming a field the task lacks is refused here, before any notebook runs, instead of at the first example
    rendered. Tasks without prompts (the perplexity corpus) are skipped."""
    where = Path(path or PROMPTS_FILE)
    try:
        table = prompt_table(path)
    except ValueError as err:
        return [str(err)]
    problems = []
    for task, fields in task_fields.items():
        for name, prompt in table.get(task, {}).items():
            try:
                used = template_fields(prompt.template)
            except ValueError as err:
                problems.append(f"{where}: {task}/{name}: template is not a valid format string ({err})")
                continue
            if fields is None:
                continue
            allowed = set(fields) | ({"before", "option"} if prompt.scoring == "partial" else set())
            for kind, names in (("template", used), ("choice_fields", set(prompt.choice_fields))):
                missing = sorted(names - allowed)
                if missing:
                    problems.append(f"{where}: {task}/{name}: {kind} names field{'s' if len(missing) > 1 else ''} "
                                    f"{', '.join(missing)}, which {task} does not have (its fields: "
                                    f"{', '.join(sorted(fields))})")
    return problems


def prompt_table(path: str | Path | None = None) -> dict[str, dict[str, Prompt]]:
    """All prompts: ``{task: {prompt name: Prompt}}`` (read once from ``prompts.yaml``, or ``path``)."""
    return _load(str(path or PROMPTS_FILE))


def prompt_tasks() -> list[str]:
    """The tasks that have prompts (the perplexity corpus has none: it is scored as plain text)."""
    return list(prompt_table())


def prompt_names(task: str) -> list[str]:
    """The prompt names of a task, e.g. ``['harness', 'general', 'task_specific']``."""
    table = prompt_table()
    if task not in table:
        raise ValueError(f"no prompts for task {task!r}; tasks with prompts: {sorted(table)}")
    return list(table[task])


def get_prompt(task: str, name: str) -> Prompt:
    """The prompt ``name`` of ``task``; an unknown task or name raises ``ValueError`` listing what exists."""
    names = prompt_names(task)
    if name not in names:
        raise ValueError(f"task {task!r} has no prompt {name!r}; choose one of {names}")
    return prompt_table()[task][name]
