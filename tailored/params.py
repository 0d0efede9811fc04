"""Every notebook parameter with its allowed values, checked before anything is computed.

A notebook's ``parameters`` cell is the schema. Each line is ``name = default  # what it is [rule]``; the
rule in square brackets at the end of the comment says what values are allowed::

    targets = [0.2, 0.5]  # shares of the decoder layers' parameters to remove [shares]
    lr = 0.001  # peak learning rate [float > 0]
    micro_batch_size = None  # sequences per forward pass [int ≥ 1 or None]

Bounds are written ``≥`` and ``≤`` in the cells (``>=`` and ``<=`` mean the same here): papermill reads a
parameter line with a second ``=`` as no parameter at all.

The runner checks a whole profile against these rules before the first step runs (``check``), and the
first cell after the parameters runs the same check inside the notebook (``check_notebook``), so a typo
in a parameters cell, in JupyterLab or under papermill, stops the notebook before any compute, with a
message that names the step, the key, the value and what is allowed.

Rules (any may end with ``or None``):

=====================  ======================================================================
``int ≥ N``            an integer at least N (also ``int > N``)
``float > X``          a number above X (also ``float ≥ X``, ``float ≥ 0 and < 1`` and the like)
``share`` / ``shares`` a share of parameters in (0, 1) / a non-empty list of them
``one of a, b, c``     one of these strings
``estimator(s)``       importance estimator(s) (``tailored.choices.ESTIMATORS``); ``from 02_importance.estimators``
                       adds: among those notebook 02 computes (checked for a whole profile)
``reduction(s)``       group reduction(s) (``tailored.choices.REDUCTIONS``)
``method(s)``          named pruning method(s) (``tailored.methods.METHODS``); ``from 02_importance`` adds: whose
                       unit scores notebook 02 computes and saves (its estimators and reductions; for a profile)
``windows``            calibration sizes, a list of ``[windows, tokens]`` pairs
``tasks``              a list of known task names (``tailored/tasks.yaml``); ``train tasks``: each with a
                       train split
``prompts``            a list of prompt names (``harness``, ``general``, ``task_specific``)
``shots for NAME``     a number of shots k >= 0 (or a list of them) that every task of parameter NAME
                       with a train split can give
``≤ NAME``             an integer at most the value of parameter NAME
``model``              a model spec (see ``tailored.models.load``)
``device`` / ``dtype`` a torch device (``cpu``, ``cuda``, ``auto``…) / ``float32``, ``bfloat16``…
``layer``              a decoder layer of ``model``; ``layer range``: ``[start, end]`` inside it
``names``              a list of strings; ``sizes``: a list of integers >= 1 (may be empty)
``claim sizes``        ``{name: {task: examples}}``: known tasks, integers >= 1 (may be empty)
``text`` / ``bool``    a string / true or false
=====================  ======================================================================
"""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailored import data
from tailored.anatomy import DTYPES, resolve_device
from tailored.choices import ESTIMATORS, PROMPT_NAMES, REDUCTIONS
from tailored.methods import METHODS
from tailored.models import model_layers
from tailored.paths import REPO_ROOT

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
INJECTED = ("profile", "run_dir", "figures_dir")  # set by the runner into every notebook


class ParamsError(ValueError):
    """A parameter value does not fit its notebook; raised before anything runs."""


@dataclass(frozen=True)
class Declared:
    """One line of a ``parameters`` cell: its default (as source text and as a value), help and rule."""

    name: str
    default_source: str
    help: str
    rule: str

    @property
    def default(self) -> Any:
        try:
            return ast.literal_eval(self.default_source)
        except (ValueError, SyntaxError):
            return None


def parameters_cell(notebook: Path) -> str:
    """The source of a notebook's cell tagged ``parameters``."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return "".join(cell["source"])
    raise ParamsError(f"{Path(notebook).name} has no cell tagged 'parameters'")


def _ascii_rule(rule: str) -> str:
    """Cells write bounds as ``≥`` / ``≤``: papermill skips a parameter line with a second ``=`` (it reads it as
    two assignments), so ``# … [int >= 1]`` would hide the parameter from ``papermill --help-notebook``."""
    return rule.strip().replace("≥", ">=").replace("≤", "<=")


def declared(notebook: Path) -> dict[str, Declared]:
    """The parameters a notebook declares, in order: ``{name: Declared}``."""
    source = parameters_cell(notebook)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            text = ast.get_source_segment(source, node.value) or ""
            comment = comments.get(node.end_lineno, "") if node.end_lineno <= len(lines) else ""
            rule = re.search(r"\[([^\[\]]+)\]\s*$", comment)
            out[name] = Declared(name, text, comment[: rule.start()].strip() if rule else comment,
                                 _ascii_rule(rule.group(1)) if rule else "")
    return out


# ===================================================================================== the rules
def _number(value, kind: str) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == "int" else isinstance(value, (int, float))


_COMPARE = re.compile(r"(int|float)\s*((?:(?:>=|>|<=|<)\s*-?[\d.e+-]+(?:\s+and\s+)?)+)$")
_BOUND = re.compile(r"(>=|>|<=|<)\s*(-?[\d.e+-]+)")


def _check_rule(rule: str, value: Any, values: Mapping[str, Any], ctx: dict) -> str | None:
    """``None`` if ``value`` obeys ``rule``, else what is allowed (for the message)."""
    if rule.endswith(" or None"):
        return None if value is None else _check_rule(rule[: -len(" or None")], value, values, ctx)
    if value is None:
        return f"{rule} (None is not allowed here)"
    if m := _COMPARE.fullmatch(rule):  # "int >= 1", "float >= 0 and < 1"
        kind, bounds = m.group(1), _BOUND.findall(m.group(2))
        ok = _number(value, kind) and all({">=": value >= float(b), ">": value > float(b), "<=": value <= float(b),
                                           "<": value < float(b)}[op] for op, b in bounds)
        return None if ok else f"{'an integer' if kind == 'int' else 'a number'} {m.group(2).strip()}"
    if rule.startswith("one of "):
        choices = [c.strip() for c in rule[len("one of "):].split(",")]
        return None if value in choices else f"one of {', '.join(choices)}"
    if " from " in rule:
        return _from_step(rule, value, values, ctx)
    if rule.startswith("shots for "):
        return _shots(value, values.get(rule[len("shots for "):]) or [])
    if rule.startswith("<= "):
        other = values.get(rule[3:])
        ok = _number(value, "int") and (other is None or value <= other)
        return None if ok else f"an integer <= {rule[3:]} ({other})"
    if rule in _RULES:
        return _RULES[rule](rule, value, ctx)
    raise ParamsError(f"unknown parameter rule [{rule}]: see tailored/params.py for the rules a notebook may use")


def _shares(rule: str, value: Any, ctx: dict) -> str | None:
    if rule == "share":
        return None if _number(value, "float") and 0 < value < 1 else "a share of parameters in (0, 1), e.g. 0.2"
    ok = isinstance(value, list) and value and all(_number(v, "float") and 0 < v < 1 for v in value)
    return None if ok else "a non-empty list of shares in (0, 1), e.g. [0.2, 0.5]: shares of parameters to remove"


def _named(rule: str, value: Any, ctx: dict) -> str | None:
    """Names from one of the package's lists: estimators, reductions, methods, prompts."""
    allowed, what = {"estimator": (ESTIMATORS, "estimators"), "reduction": (REDUCTIONS, "reductions"),
                     "method": (METHODS, "pruning methods (tailored.methods.METHODS)"),
                     "prompts": (PROMPT_NAMES, "prompts")}[rule.rstrip("s") if rule != "prompts" else rule]
    return _choices(value, list(allowed), rule.endswith("s"), what)


def _windows(rule: str, value: Any, ctx: dict) -> str | None:
    ok = isinstance(value, list) and all(isinstance(w, list) and len(w) == 2 and all(
        _number(x, "int") and x >= 1 for x in w) for w in value)
    return None if ok else "a list of [windows, tokens] pairs, e.g. [[10, 128], [32, 256]] (empty for none)"


def _tasks(rule: str, value: Any, ctx: dict) -> str | None:
    problem = _choices(value, list(data.TASKS), True, "tasks")
    if problem or rule == "tasks":
        return problem
    no_train = [t for t in value if "train" not in data.splits(t)]
    return (f"tasks with a train split (for shots and training); {no_train} have none: they can be scored "
            "zero-shot only" if no_train else None)


def _shots(value: Any, tasks: list) -> str | None:
    ks = value if isinstance(value, list) else [value]
    if not ks or not all(_number(k, "int") and k >= 0 for k in ks):
        return "a number of shots k >= 0" + (" (a list of them)" if isinstance(value, list) else "")
    sizes = {t: data.splits(t).get("train", 0) for t in tasks if t in data.TASKS and "train" in data.splits(t)}
    small = {t: n for t, n in sizes.items() if n < max(ks)}
    return f"at most the train split of every task ({small})" if small else None


def _device(rule: str, value: Any, ctx: dict) -> str | None:
    try:
        resolve_device(value)
        return None
    except (ValueError, TypeError, RuntimeError) as err:
        return str(err)


def _layer(rule: str, value: Any, ctx: dict) -> str | None:
    n = ctx.get("layers")
    if rule == "layer":
        ok = _number(value, "int") and value >= 0 and (n is None or value < n)
        return None if ok else f"a decoder layer index in 0..{(n or 0) - 1} of {ctx.get('model')}"
    ok = (isinstance(value, list) and len(value) == 2 and all(_number(v, "int") for v in value)
          and 0 <= value[0] < value[1] <= (n if n is not None else value[1]))
    return None if ok else f"[start, end] with 0 <= start < end <= {n} (end exclusive), or None for LLM-Pruner's range"


def _plain(rule: str, value: Any, ctx: dict) -> str | None:
    """The rules on a value's type alone."""
    if rule == "model":
        return None if isinstance(value, str) and value else "a model: smollm2-135m, a tiny variant, a folder or a hub id"
    if rule == "dtype":
        return None if value in DTYPES else f"one of {', '.join(DTYPES)}"
    if rule == "bool":
        return None if isinstance(value, bool) else "true or false"
    if rule == "sizes":
        ok = isinstance(value, list) and all(_number(v, "int") and v >= 1 for v in value)
        return None if ok else "a list of integers >= 1 (empty for none)"
    if rule == "claim sizes":
        ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, dict) and all(
            t in data.TASKS and _number(n, "int") and n >= 1 for t, n in v.items()) for k, v in value.items())
        return None if ok else ("a mapping {name: {task: examples}} of known tasks and integers >= 1, e.g. "
                                "{'pruning': {'piqa': 600}} (empty for none)")
    if rule == "names":
        return None if isinstance(value, list) and all(isinstance(v, str) for v in value) else "a list of strings"
    return None if isinstance(value, str) else "a string"  # text


_RULES = {"share": _shares, "shares": _shares, "estimator": _named, "estimators": _named, "reduction": _named,
          "reductions": _named, "method": _named, "methods": _named, "prompts": _named, "windows": _windows,
          "tasks": _tasks, "train tasks": _tasks, "device": _device, "layer": _layer, "layer range": _layer,
          **{r: _plain for r in ("model", "dtype", "bool", "sizes", "claim sizes", "names", "text")}}


def _from_step(rule: str, value: Any, values: Mapping[str, Any], ctx: dict) -> str | None:
    """``estimators from 02_importance.estimators``: among the values another step's key has (in a whole profile).
    ``methods from 02_importance``: methods whose unit scores that step computes (its ``estimators`` and
    ``reductions``; depth pruning's layer scores are measured by the pruning step itself)."""
    base, _, source = rule.partition(" from ")
    problem = _check_rule(base, value, values, ctx)
    step, _, key = source.partition(".")
    computed = ctx.get("profile_values", {}).get(step)
    if problem or computed is None:  # a notebook checked alone does not know the other step's values
        return problem
    if base in ("estimator", "estimators"):
        if computed.get(key) is None:
            return None
        return _choices(value, list(computed[key]), base == "estimators", f"estimators {step} computes ({key})")
    missing: dict[str, list[str]] = {}
    for name in value if isinstance(value, list) else [value]:
        m = METHODS[name]
        if not m.scores_units:
            continue
        for what, key in ((m.estimator, "estimators"), (m.reduction, "reductions")):
            if what not in (computed.get(key) or []):
                missing.setdefault(f"{step}.{key}", []).append(f"{what} (for {name})")
    if not missing:
        return None
    adds = "; ".join(f"{', '.join(dict.fromkeys(v))} to {k}" for k, v in missing.items())
    return f"methods whose unit scores {step} computes and saves: add {adds}, or choose other methods"


def _choices(value, allowed: list[str], many: bool, what: str) -> str | None:
    """``what`` names the allowed values in the plural ("estimators"); the message lists them."""
    if many and (not isinstance(value, list) or not value):
        return f"a non-empty list of {what}: {', '.join(allowed)}"
    bad = [v for v in (value if many else [value]) if v not in allowed]
    if not bad:
        return None
    return f"{'each ' if many else ''}one of the {what}: {', '.join(allowed)} ({bad} {'is' if len(bad) == 1 else 'are'} not)"


def check(step: str, values: Mapping[str, Any], decl: Mapping[str, Declared],
          profile_values: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """The problems of one step's parameter values against its notebook's rules: ``"step.key = value: allowed"``."""
    ctx: dict = {"profile_values": profile_values or {}, "model": values.get("model")}
    if any(d.rule.startswith("layer") for d in decl.values()) and isinstance(values.get("model"), str):
        ctx["layers"] = model_layers(values["model"])
    errors = []
    for name, d in decl.items():
        if d.rule and name in values:
            problem = _check_rule(d.rule, values[name], values, ctx)
            if problem:
                errors.append(f"{step}.{name} = {values[name]!r}: must be {problem}")
    return errors


def injected_names(namespace: Mapping[str, Any]) -> list[str]:
    """The names papermill injected into this kernel: the assignments of the last executed cell that starts
    with papermill's ``# Parameters`` header (IPython keeps every executed cell's source in ``In``)."""
    cells = [c for c in namespace.get("In") or [] if isinstance(c, str) and c.startswith("# Parameters")]
    if not cells:
        return []
    try:
        tree = ast.parse(cells[-1])
    except SyntaxError:
        return []
    return [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)]


def check_notebook(step: str, namespace: Mapping[str, Any]) -> None:
    """The first cell after a notebook's parameters: the same check the runner makes, inside the notebook.

    ``namespace`` is the notebook's ``globals()``. A name papermill injected (``-p name value``) that the
    parameters cell does not declare is a typo, and is refused too (papermill itself only warns).
    """
    decl = declared(NOTEBOOKS_DIR / f"{step}.ipynb")
    unknown = sorted(set(injected_names(namespace)) - set(decl))
    errors = [f"{step}.{k}: not a parameter of {step}; valid keys: {', '.join(sorted(set(decl) - set(INJECTED)))}"
              for k in unknown]
    errors += check(step, {k: namespace[k] for k in decl if k in namespace}, decl)
    if errors:
        profile = namespace.get("profile", "?")
        raise ParamsError(f"parameters of {step} (profile {profile!r}) are not valid:\n  " + "\n  ".join(errors))


def at_default(step: str, name: str, namespace: Mapping[str, Any], notebooks: Path = NOTEBOOKS_DIR) -> str:
    """Whether a notebook's parameter is at its default, said for an exercise's check cell.

    ``namespace`` is the notebook's ``globals()``; the default is read from the ``parameters`` cell of
    ``notebooks/<step>.ipynb`` (not typed twice), so ``at_default("03_prune", "curve_methods", globals())``
    reads ``"curve_methods = ['random', 'flap'] (changed from ['random'])"`` or ``"... (the default)"``.
    """
    default = declared(Path(notebooks) / f"{step}.ipynb")[name].default
    value = namespace[name]
    return f"{name} = {value!r} (" + ("the default" if value == default else f"changed from {default!r}") + ")"
