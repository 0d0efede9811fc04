"""Run the study: execute ``notebooks/0N_*.ipynb`` in order through papermill into ``runs/<profile>/``.

The runner does three things a bare ``papermill`` call does not:

1. **Validates before computing.** ``params/<profile>.yaml`` is checked against each notebook's
   ``parameters`` cell: an unknown or misspelled key, a value of the wrong type, or a model path that
   does not exist stops the run before any notebook starts, with a message naming the key and the valid ones.
   The tasks and prompts the profile names are checked against ``tasks.yaml`` and ``prompts.yaml`` (a template
   naming a field its task lacks), the pruning targets against what the chosen method's layer range can
   reach, and a model directory against the architectures the study supports.
2. **Skips what has not changed, by content.** A step's fingerprint hashes its notebook, its resolved
   parameters, the package modules the notebook imports (and theirs: ``tailored.sources``), the registry
   entries and prompts of the tasks its parameters name, and the content of what the steps before it handed on
   (``handed_on``: the sha256 of their artifacts, not their fingerprints, so a change that leaves a step's
   artifacts byte for byte as they were, its prose for instance, reruns that step alone). After a
   step, the sha256 of every file it wrote is recorded. A step is skipped only when its fingerprint equals the
   one recorded after its last successful run *and* every file it wrote still has its recorded sha256
   (``force=True`` reruns it). A file that changed (bit rot, a copy, an edit: its modification time proves
   nothing) is named, moved to ``retired/`` with the artifact it belongs to, and the step rebuilds it. Changing
   an evaluation knob or a prompt therefore reruns notebook 05 only; changing a pruning knob reruns 03, 04, 05.
3. **Keeps a manifest.** ``runs/<profile>/manifest.json`` records parameters, library versions, input hashes
   and durations of every step, so a result can be traced back to what produced it.

A failing cell stops the run with a ``StepFailed`` naming the notebook and the cell; the executed notebook
is kept as ``<step>.failed.ipynb`` for inspection, and the last good ``<step>.ipynb`` is left untouched. What
an interrupted run left behind (temporary files of writers that are gone) is removed when the next run takes
the run directory's lock (``tailored.rundir.remove_leftovers``). Kernels are started with CurveZMQ transport
encryption where pyzmq has it (``kernel_config``), over local sockets otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from tailored import data, paths, rundir
from tailored.artifacts import (
    ArtifactError,
    content_hashes,
    embed_tables,
    metrics_path,
    read_json,
    write_json,
)
from tailored.lock import run_lock
from tailored.models import (
    LLAMA_FAMILY,
    RANDOM_PREFIX,
    RANDOM_SHAPES,
    SMOLLM2,
    TINY_VARIANTS,
    smollm2_cache_dir,
    tiny_config,
)
from tailored.params import INJECTED, Declared, ParamsError, declared
from tailored.params import check as check_params
from tailored.paths import atomic_write_text
from tailored.prompts import check_prompts, prompt_table
from tailored.prune import TOLERANCE, default_layer_range, max_share
from tailored.recipes import METHODS
from tailored.sources import step_sources

NOTEBOOKS_DIR = paths.REPO_ROOT / "notebooks"
PARAMS_DIR = paths.REPO_ROOT / "params"
KERNEL_NAME = "tailored"
# Profiles whose figures and tables are committed, and where (relative to the repository); the others write
# theirs into runs/<profile>/figures.
COMMITTED_FIGURES = {"class": "figures", "study": "figures/study"}


class StepFailed(RuntimeError):
    """A notebook cell raised; the message names the notebook, the cell and the error."""


@dataclass(frozen=True)
class Step:
    name: str  # "01_trace_graph"
    path: Path

    @property
    def number(self) -> str:
        return self.name.split("_", 1)[0]


def discover_steps(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Step]:
    """The notebooks of the study, in order: ``0N_<name>.ipynb``."""
    steps = [Step(p.stem, p) for p in sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))]
    if not steps:
        raise FileNotFoundError(f"no notebooks named 0N_*.ipynb in {notebooks_dir}")
    return steps


def select_steps(steps: list[Step], only: str | None = None, start: str | None = None) -> list[Step]:
    """``only="01,02"`` picks those steps; ``start="03"`` runs from 03 to the end."""
    numbers = [s.number for s in steps]

    def check(n: str) -> str:
        n = n.strip().zfill(2)
        if n not in numbers:
            raise ParamsError(f"step {n!r} does not exist; steps are {', '.join(numbers)}")
        return n

    if only and start:
        raise ParamsError("give --steps or --from, not both")
    if only:
        wanted = {check(n) for n in only.split(",") if n.strip()}
        return [s for s in steps if s.number in wanted]
    if start:
        first = numbers.index(check(start))
        return steps[first:]
    return steps


# ------------------------------------------------------------------------------------------ parameters
def notebook_parameters(path: Path) -> dict[str, Declared]:
    """The names, defaults, help and rules declared in a notebook's ``parameters`` cell."""
    params = declared(path)
    if not params:
        raise ParamsError(f"{path.name} has no parameters in its cell tagged 'parameters'")
    return params


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` and ``1.5e3`` as floats (YAML 1.2) instead of as strings.

    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent, so ``lr: 1e-3`` would arrive
    in the notebook as the string "1e-3". Everything else reads as ``yaml.safe_load`` reads it.
    """


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))
PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]+")  # it names params/<profile>.yaml and runs/<profile>/


def _yaml_error(path: Path, err: yaml.YAMLError) -> str:
    """One line: file, line and column, and what PyYAML found there."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    hint = " (YAML indents with spaces, never tabs)" if "\\t" in problem or "tab" in problem else ""
    return f"{where}: {problem}{hint}"


def load_params_file(profile: str, params_dir: Path = PARAMS_DIR) -> dict:
    """``params/<profile>.yaml`` as a mapping; ``ParamsError`` with the file, line and key at fault.

    Refused: a profile name other than letters, digits, ``_`` and ``-`` (it becomes a path), YAML that
    does not parse, a list or scalar where a mapping belongs (the top level, ``common``, ``steps``,
    ``steps.<notebook>``), and a file that sets no parameters (it would silently run the notebooks'
    defaults). Floats may be written ``1e-3`` (see ``_YamlLoader``).
    """
    if not isinstance(profile, str) or not PROFILE_NAME.fullmatch(profile):
        raise ParamsError(f"profile name {profile!r}: use letters, digits, '_' and '-' only "
                          "(it names params/<profile>.yaml and runs/<profile>/)")
    path = params_dir / f"{profile}.yaml"
    if not path.exists():
        have = sorted(p.stem for p in params_dir.glob("*.yaml"))
        raise ParamsError(f"no params file for profile {profile!r} ({path}); profiles are {', '.join(have)}")
    try:
        data = yaml.load(path.read_text(), Loader=_YamlLoader)
    except yaml.YAMLError as err:
        raise ParamsError(_yaml_error(path, err)) from None

    def kind(value) -> str:
        return "a list" if isinstance(value, list) else f"the {type(value).__name__} {value!r}"

    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{path}: the file is {kind(data)}, but must be a mapping with 'common' and 'steps'")
    data = data or {}
    unknown = set(data) - {"common", "steps", "description"}
    if unknown:
        raise ParamsError(f"{path.name}: unknown top-level keys {sorted(map(str, unknown))}; use 'common', 'steps', 'description'")
    for key, what in (("common", "parameter: value for every notebook"), ("steps", "notebook: {parameter: value}")):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ParamsError(f"{path}: '{key}' is {kind(data[key])}, but must be a mapping of {what}")
    for name, values in (data.get("steps") or {}).items():
        if values is not None and not isinstance(values, dict):
            raise ParamsError(f"{path}: 'steps.{name}' is {kind(values)}, but must be a mapping of parameter: value")
    if not data.get("common") and not data.get("steps"):
        raise ParamsError(f"{path} sets no parameters (no 'common' or 'steps' entries): a run would silently use "
                          "the notebooks' defaults; write them down, or run --profile class")
    return data


def _type_ok(value, default) -> bool:
    """Is ``value`` acceptable where the notebook's default is ``default``? (None accepts anything.)"""
    if value is None or default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def params_notebooks_dir(steps: list[Step]) -> Path:
    return steps[0].path.parent if steps else NOTEBOOKS_DIR


def resolve_params(profile: str, steps: list[Step], run_dir: Path, figures_dir: Path,
                   params_dir: Path = PARAMS_DIR, overrides: dict | None = None) -> dict[str, dict]:
    """Validate the profile's params against every notebook and return the parameters of each step.

    ``common`` keys go to every notebook that declares them (and must be declared by at least one);
    ``steps.<name>`` keys must be declared by that step's notebook; ``overrides`` (``--model``) go to every
    notebook that declares them. Types must match the defaults', and every value must obey the rule of its
    line in the notebook's parameters cell (``tailored.params``), for every notebook of the profile, not only
    the selected ones: ``--steps 03`` still refuses an estimator that notebook 02 does not compute.
    """
    data = load_params_file(profile, params_dir)
    common = data.get("common") or {}
    per_step = data.get("steps") or {}
    # Inspect every notebook, not only the selected ones: a common key is valid if any step declares it.
    decls = {s.name: notebook_parameters(s.path) for s in discover_steps(params_notebooks_dir(steps))}
    all_steps = set(decls)

    errors = []
    for key in INJECTED:
        if key in common:
            errors.append(f"common.{key}: set by the runner, remove it from {profile}.yaml")
    all_declared = set().union(*(d.keys() for d in decls.values())) if decls else set()
    for key in common:
        if key not in all_declared and key not in INJECTED:
            errors.append(f"common.{key}: no notebook declares it; valid keys: {', '.join(sorted(all_declared - set(INJECTED)))}")
    for name, values in per_step.items():
        if name not in all_steps:
            errors.append(f"steps.{name}: no such notebook; steps are {', '.join(sorted(all_steps))}")
            continue
        for key in values or {}:
            if key not in decls[name]:
                valid = sorted(set(decls[name]) - set(INJECTED))
                errors.append(f"steps.{name}.{key}: not a parameter of {name}; valid keys: {', '.join(valid)}")

    chosen: dict[str, dict] = {}
    for name, decl in decls.items():
        values = {k: v for k, v in common.items() if k in decl}
        values.update({k: v for k, v in (per_step.get(name) or {}).items() if k in decl})
        values.update({k: v for k, v in (overrides or {}).items() if k in decl})
        for key, value in values.items():
            if not _type_ok(value, decl[key].default):
                errors.append(f"{name}.{key}: {value!r} is a {type(value).__name__}, "
                              f"but the notebook's default {decl[key].default!r} is a {type(decl[key].default).__name__}")
        chosen[name] = values
    if "model" in common or any("model" in (v or {}) for v in [*per_step.values(), overrides or {}]):
        for name, values in chosen.items():
            if "model" in values:
                problem = _check_model(values["model"])
                if problem:
                    errors.append(f"{name}.model: {problem}")
    if not errors:  # values: the defaults, then the profile, each checked against its rule
        full = {name: {k: d.default for k, d in decls[name].items()} | chosen[name] for name in decls}
        for name in decls:
            errors += check_params(name, full[name], decls[name], profile_values=full)
        if not errors:  # what the values mean together: the tasks' prompts, what the pruning method can reach
            errors += prompt_problems(full) + reach_problems(full.get("03_prune", {}))
    if errors:
        errors = list(dict.fromkeys(errors))
        raise ParamsError(f"params/{profile}.yaml does not fit the notebooks: " + (
            errors[0] if len(errors) == 1 else f"{len(errors)} problems: " + "; ".join(errors)))
    return {step.name: chosen[step.name] | {k: v for k, v in (("profile", profile), ("run_dir", str(run_dir)),
                                                             ("figures_dir", str(figures_dir)))
                                            if k in decls[step.name]} for step in steps}


def _check_model(spec) -> str | None:
    if spec in (None, ""):
        return ("no model given: this profile needs a model, e.g. `tailored run --profile paper --model /path/to/llama-7b` "
                "(a local HF directory of a LLaMA-family model)")
    if not isinstance(spec, str):
        return f"{spec!r} is not a string"
    if spec == SMOLLM2 or spec in TINY_VARIANTS:
        return None
    if spec.startswith(RANDOM_PREFIX):  # a real shape with random weights, for scale checks
        if spec[len(RANDOM_PREFIX):] in RANDOM_SHAPES:
            return None
        return f"{spec!r} is not a random shape; choose one of {', '.join(RANDOM_PREFIX + n for n in RANDOM_SHAPES)}"
    p = Path(spec).expanduser()
    if spec.startswith(("/", ".", "~")) or p.exists():
        if not p.is_dir():
            return f"{spec} does not exist (expected a local HF model directory)"
        if not (p / "config.json").exists():
            return f"{spec} holds no config.json: not an HF model directory"
        return _architecture_problem(p / "config.json")
    if "/" in spec:
        return None  # a hub id, for users online
    return (f"{spec!r} is not {SMOLLM2!r}, a tiny variant ({', '.join(TINY_VARIANTS)}), a random shape "
            f"({', '.join(RANDOM_PREFIX + n for n in RANDOM_SHAPES)}), a directory, or a hub id")


def _architecture_problem(config_file: Path) -> str | None:
    """Why the model of ``config_file`` cannot be studied (its architecture is not LLaMA-family), or None."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{config_file} cannot be read as JSON ({err})"
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in LLAMA_FAMILY:
        return (f"{config_file.parent}: architecture {kind or 'unknown (no model_type)'} is not LLaMA-family; "
                f"supported: {', '.join(LLAMA_FAMILY)} (the layouts the tracer and the pruned checkpoints are built "
                "for)")
    return None


def prompt_problems(full: dict[str, dict]) -> list[str]:
    """``prompts.yaml`` against ``tasks.yaml`` for the tasks the profile names: a template or ``choice_fields``
    naming a field the task's examples do not have, a prompt file that does not parse (one line each)."""
    named = sorted({t for values in full.values() for t in step_tasks(values)})
    return check_prompts({t: data.task_fields(t) for t in named})


def model_shape(spec) -> dict | None:
    """The config of the model ``spec`` as a dict, read without loading weights; None when that needs a download or
    a conversion first (a hub id; SmolLM2 before ``tailored prepare``)."""
    if not isinstance(spec, str):
        return None
    if spec in TINY_VARIANTS:
        return tiny_config(spec).to_dict()
    if spec.startswith(RANDOM_PREFIX):
        return RANDOM_SHAPES.get(spec[len(RANDOM_PREFIX):])
    config = (smollm2_cache_dir() if spec == SMOLLM2 else Path(spec).expanduser()) / "config.json"
    try:
        return json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def reach_problems(prune_params: dict) -> list[str]:
    """The targets of notebook 03 that its ``method`` cannot reach (``plan_pruning`` would refuse them inside the
    notebook): checked from the model's config before any step runs. Block-wise methods only; layer- and
    channel-wise ones, and models whose config is not at hand yet, are left to the planner."""
    method = METHODS.get(prune_params.get("method"))
    config = model_shape(prune_params.get("model"))
    if method is None or method.mode != "block" or not config or "intermediate_size" not in config:
        return []
    layers = config["num_hidden_layers"]
    try:
        span = (0, layers) if method.layer_range == "all" else (tuple(method.layer_range) if method.layer_range
                                                                else default_layer_range(layers))
    except ValueError as err:
        return [f"03_prune.method = {prune_params['method']!r}: {err}"]
    most = max_share(config, span, method.attention, method.round_to)
    out = [t for t in prune_params.get("targets") or () if isinstance(t, (int, float)) and t > most + TOLERANCE]
    if not out:
        return []
    wide = ", ".join(n for n, m in METHODS.items() if m.layer_range == "all" and m.mode == "block")
    return [f"03_prune.targets = {out}: method {prune_params['method']!r} prunes layers {span[0]}..{span[1] - 1} of "
            f"{layers}, which removes at most {most:.1%} of the decoder; lower the target or choose a method whose "
            f"layer_range is 'all' ({wide})"]


# ----------------------------------------------------------------------------------------- fingerprints
def source_hash(step: Step) -> str:
    """Hash of the package source files the step's notebook runs (its imports and theirs)."""
    h = hashlib.sha256()
    for f in step_sources(step.path):
        h.update(f.relative_to(paths.REPO_ROOT).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def step_tasks(params: dict) -> list[str]:
    """The tasks a step reads: every task its parameters name, and the Wikipedia text (calibration, perplexity)."""
    named = {"wikitext"}
    for value in params.values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, str) and v in data.TASKS:
                named.add(v)
    return sorted(named)


def data_hash(params: dict) -> str:
    """Hash of what ``tasks.yaml`` and ``prompts.yaml`` say about the step's tasks: editing one task's prompt
    changes the fingerprints of the steps that name that task, and no other."""
    table = prompt_table()
    entries = {t: {"task": dataclasses.asdict(data.TASKS[t]),
                   "prompts": {n: dataclasses.asdict(p) for n, p in table.get(t, {}).items()}}
               for t in step_tasks(params)}
    return hashlib.sha256(json.dumps(entries, sort_keys=True, default=str).encode()).hexdigest()


def notebook_hash(path: Path) -> str:
    """Hash of what a notebook says: each cell's type, source and tags, not its outputs or execution counts, so
    that a JupyterLab session saving outputs into ``notebooks/`` (which git does not see: its nbstripout filter)
    does not make every step rerun."""
    cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    said = [[c.get("cell_type"), "".join(c.get("source", "")), (c.get("metadata") or {}).get("tags", [])]
            for c in cells]
    return hashlib.sha256(json.dumps(said).encode()).hexdigest()


def fingerprint(step: Step, params: dict, src: str, upstream: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(notebook_hash(step.path).encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(src.encode())
    h.update(data_hash(params).encode())
    h.update(json.dumps(upstream, sort_keys=True).encode())
    return h.hexdigest()


# The earlier steps' metrics a notebook reads (05 reads each adapter's validation curve from 04's); every other
# input a step has from the steps before it is one of their artifacts (``rundir.STEP_OUTPUTS``).
METRICS_READ = {"05_evaluate": ("04_lora_tune",)}


def handed_on(run_dir: Path, record: dict, earlier: str, later: str) -> object:
    """What step ``later`` reads of an earlier step's last run, for its fingerprint: the sha256 of every file of
    the artifacts the earlier step wrote, and of its metrics only where ``later`` reads them
    (``METRICS_READ``; metrics hold timings, which differ from run to run). Not the earlier step's
    fingerprint: a change that leaves its artifacts as they were, byte for byte (its prose, a figure, a
    refactoring), reruns that step and no later one. A notebook outside the study's layout (no declared
    artifacts) hands on its fingerprint and whatever it recorded."""
    if record.get("status") != "ok":
        return record.get("status", "never run")
    outputs = record.get("outputs", {})
    if earlier not in rundir.STEP_OUTPUTS:
        return [record.get("fingerprint"), outputs]
    metrics = metrics_path(run_dir, earlier).relative_to(run_dir).as_posix()
    return {name: files for name, files in outputs.items()
            if name != metrics or earlier in METRICS_READ.get(later, ())}


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("tailored", "torch", "transformers", "peft", "papermill", "datasets", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def kernel_config():
    """The kernel manager's settings for papermill: CurveZMQ transport encryption where pyzmq has it ("auto":
    provisioned when the kernelspec declares support, as ipykernel's does), else local IPC sockets, so that no
    kernel talks plain TCP (ipykernel warns "Kernel is running over TCP without encryption" then)."""
    import zmq
    from traitlets.config import Config

    if zmq.has("curve"):
        return Config({"KernelManager": {"transport_encryption": "auto"}})
    if os.name == "posix":
        return Config({"KernelManager": {"transport": "ipc"}})
    return Config()


def kernel_name() -> str:
    """The project's kernel if registered (``make install`` does it), else the default ``python3``."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


# ---------------------------------------------------------------------------------------------- run
def run(profile: str = "class", only: str | None = None, start: str | None = None, force: bool = False,
        run_root: Path | None = None, overrides: dict | None = None, progress: bool = True,
        log=print, notebooks_dir: Path = NOTEBOOKS_DIR, params_dir: Path = PARAMS_DIR) -> dict:
    """Execute the selected steps of ``profile``; return the manifest. See the module docstring."""
    steps_all = discover_steps(notebooks_dir)
    steps = select_steps(steps_all, only, start)
    run_dir = paths.run_dir(profile, run_root).resolve()
    committed = COMMITTED_FIGURES.get(profile) if run_root is None else None
    figures_dir = paths.REPO_ROOT / committed if committed else run_dir / "figures"
    resolved = resolve_params(profile, steps, run_dir, figures_dir, params_dir, overrides)

    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "manifest.json"
    with run_lock(run_dir, log=log):  # one run per run directory: a second one is refused, naming this one
        rundir.remove_leftovers(run_dir, log=log)  # temporaries of writers that are gone (a killed run)
        manifest = read_json(manifest_path) if manifest_path.exists() else {"profile": profile, "steps": {}}
        if not isinstance(manifest, dict) or not isinstance(manifest.get("steps", {}), dict):
            raise ArtifactError(f"{manifest_path} is damaged (not a mapping with 'steps'): delete it, and every "
                                "step reruns (`tailored run --force` does the same)")
        manifest.setdefault("steps", {})
        _refuse_damaged_inputs(run_dir, manifest, steps_all, steps)
        manifest.update(profile=profile, params_file=f"params/{profile}.yaml", versions=versions())
        kernel = kernel_name()

        for step in steps:
            # what came before: the content of what each earlier step handed on to this one
            upstream = {s.name: handed_on(run_dir, manifest["steps"].get(s.name, {}), s.name, step.name)
                        for s in steps_all if s.number < step.number}
            params = resolved[step.name]
            src = source_hash(step)
            fp = fingerprint(step, params, src, upstream)
            out_nb = run_dir / f"{step.name}.ipynb"
            previous = manifest["steps"].get(step.name, {})
            stale, damaged = _output_changes(run_dir, previous.get("outputs", {}))
            if (not force and previous.get("fingerprint") == fp and previous.get("status") == "ok"
                    and out_nb.exists() and not stale):
                log(f"[{step.name}] unchanged since its last successful run: skipped (use --force to rerun)")
                continue
            for problem in stale:
                log(f"[{step.name}] {problem}: the step rebuilds it")
            _retire_damaged(run_dir, damaged, log=lambda m, n=step.name: log(f"[{n}] {m}"))
            log(f"[{step.name}] running {step.path.name} -> {out_nb}")
            started = time.time()
            _execute(step, run_dir, params, kernel, progress, manifest, previous, manifest_path)
            manifest["steps"][step.name] = {"status": "ok", "fingerprint": fp, "params": params, "upstream": upstream,
                                            "notebook_sha256": notebook_hash(step.path),
                                            "source_sha256": src, "finished": _now(),
                                            "duration_s": round(time.time() - started, 2), "output": out_nb.name,
                                            "load1": round(os.getloadavg()[0], 2),
                                            "outputs": _outputs_state(run_dir, step.name),
                                            **_reused(run_dir, step.name)}
            write_json(manifest_path, manifest)
            log(f"[{step.name}] done in {time.time() - started:.1f} s")
            if committed:
                write_durations(manifest, figures_dir)
            refreshed = refresh_readme(figures_dir)
            if refreshed:
                log(f"[{step.name}] README tables updated from figures/: {', '.join(refreshed)}")
    return manifest


def _execute(step: Step, run_dir: Path, params: dict, kernel: str, progress: bool, manifest: dict, previous: dict,
             manifest_path: Path) -> None:
    """Run one notebook through papermill into ``<step>.ipynb``; a failing cell raises ``StepFailed`` (one line:
    the notebook, the cell, the error, where the executed notebook is kept) after recording it in the manifest."""
    import papermill

    partial, out_nb = run_dir / f"{step.name}.running.ipynb", run_dir / f"{step.name}.ipynb"
    try:
        papermill.execute_notebook(str(step.path), str(partial), parameters=params, kernel_name=kernel,
                                   cwd=str(step.path.parent), progress_bar=progress, log_output=False,
                                   config=kernel_config())
    except papermill.PapermillExecutionError as err:
        failed = run_dir / f"{step.name}.failed.ipynb"
        os.replace(partial, failed)
        manifest["steps"][step.name] = {**previous, "status": "failed", "failed_at": _now(),
                                        "error": f"{err.ename}: {err.evalue}"}
        write_json(manifest_path, manifest)
        evalue = " ".join(str(err.evalue).split())  # one line, however the error was written
        raise StepFailed(f"{step.path.name} failed in cell {err.cell_index} (execution count {err.exec_count}): "
                         f"{err.ename}: {evalue} (the executed notebook is kept at {failed})") from None
    os.replace(partial, out_nb)


def _reused(run_dir: Path, step: str) -> dict:
    """``{"reused": {"results": n, "seconds": s, "what": ...}}`` when the step's metrics say it found finished work
    of an earlier run (notebook 04's adapters, notebook 05's stored evaluations); else ``{}``."""
    path = metrics_path(run_dir, step)
    try:
        reused = read_json(path).get("reused") if path.exists() else None
    except (ArtifactError, AttributeError):
        return {}
    return {"reused": reused} if isinstance(reused, dict) and reused.get("results") else {}


def write_durations(manifest: dict, figures_dir: Path) -> Path:
    """``run_durations.md`` (and ``.csv``): each step's wall time, when it finished and the machine's load then,
    from the manifest, for the profiles whose figures are committed (what a reader needs to plan a rerun).

    A step that resumed from an earlier run's finished work (notebook 04's trained adapters, notebook 05's stored
    evaluations: their metrics' ``reused``) ran shorter than a run from scratch would: its row says how much it
    reused and what that took when it was computed, and the last row adds it back (``from scratch``)."""
    cpus = os.cpu_count()
    rows = [(name, s["duration_s"] / 60, s.get("finished", ""), s.get("load1"), s.get("reused") or {})
            for name, s in sorted(manifest["steps"].items()) if s.get("status") == "ok" and "duration_s" in s]
    total = sum(r[1] for r in rows)
    scratch = total + sum(r[4].get("seconds", 0.0) for r in rows) / 60

    def reused(r):
        return f"{r['results']} {r.get('what', 'results')}, {r['seconds'] / 60:.1f} min when computed" if r else ""

    md = ["| step | minutes | finished (UTC) | load average after | reused from an earlier run |", "|---|---|---|---|---|"]
    md += [f"| {n} | {m:.1f} | {f} | {'' if load is None else load} | {reused(r)} |" for n, m, f, load, r in rows]
    md += [f"| all steps | {total:.1f} | | {cpus} CPUs | " + (f"from scratch: {scratch:.1f} min |" if scratch > total
                                                                   else "|")]
    csv = ["step,minutes,finished,load1,reused_results,reused_minutes"] + [
        f"{n},{m:.2f},{f},{'' if load is None else load},{r.get('results', 0)},{r.get('seconds', 0.0) / 60:.2f}"
        for n, m, f, load, r in rows]
    Path(figures_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(figures_dir) / "run_durations.csv", "\n".join(csv) + "\n")
    out = Path(figures_dir) / "run_durations.md"
    atomic_write_text(out, "\n".join(md) + "\n")
    return out


def _file_hashes(run_dir: Path, name: str) -> dict[str, str]:
    """``{file: sha256}`` of an artifact (a file, or every file under a folder), paths relative to the run dir."""
    path = run_dir / name
    if not path.exists():
        return {}
    folder = Path(name) if path.is_dir() else Path(name).parent
    return {(folder / f).as_posix(): digest for f, digest in content_hashes(path).items()}


def _outputs_state(run_dir: Path, step: str) -> dict[str, dict[str, str]]:
    """``{artifact: {file: sha256}}`` of what a step wrote (``tailored.rundir.step_outputs``), recorded in the
    manifest: the content, so that a change that keeps sizes and modification times is found too."""
    return {p.relative_to(run_dir).as_posix(): _file_hashes(run_dir, p.relative_to(run_dir).as_posix())
            for p in rundir.step_outputs(run_dir, step) if p.exists()}


def _output_changes(run_dir: Path, recorded: dict) -> tuple[list[str], dict[Path, str]]:
    """What of a step's recorded artifacts is gone or no longer as the step left it: one line each, naming the
    files (the first five of an artifact; one recorded before per-file hashes counts as changed), and the damaged
    artifacts ``{unit: a changed file}`` to move aside before the step reruns (``tailored.rundir.artifact_unit``:
    a checkpoint folder, an adapter folder, a file)."""
    problems, damaged = [], {}
    for name, files in recorded.items():
        if not isinstance(files, dict):
            problems.append(f"{name} was recorded before content hashes")
            continue
        now = _file_hashes(run_dir, name)
        differ = sorted(f for f in set(files) | set(now) if files.get(f) != now.get(f))
        for f in differ[:5]:
            problems.append(f"{f} " + ("is missing" if f not in now else "is new since the step ran" if f not in files
                                       else "is damaged: its content differs from the sha256 recorded when the step "
                                            "wrote it"))
        if len(differ) > 5:
            problems.append(f"{len(differ) - 5} more files of {name} changed")
        for f in differ:
            if f in now and f in files:
                damaged.setdefault(rundir.artifact_unit(run_dir, f), f)
    return problems, damaged


def _refuse_damaged_inputs(run_dir: Path, manifest: dict, steps_all: list[Step], selected: list[Step]) -> None:
    """``ArtifactError`` (one line: the file, the step that rebuilds it) when a step that is not selected but comes
    before a selected one left an artifact that is now damaged or gone: ``--steps 05`` never scores a damaged
    checkpoint. (The selected steps' own outputs are checked, retired and rebuilt as they run.)"""
    last = max(s.number for s in selected) if selected else ""
    for step in steps_all:
        if step in selected or step.number > last:
            continue
        problems, _ = _output_changes(run_dir, manifest["steps"].get(step.name, {}).get("outputs", {}))
        bad = [p for p in problems if p.endswith("is missing") or " is damaged: " in p]
        if bad:
            raise ArtifactError(f"{bad[0]}; notebook {step.number} rebuilds it: `tailored run --from {step.number}`")


def _retire_damaged(run_dir: Path, damaged: dict[Path, str], log) -> None:
    """Move the damaged artifacts to ``retired/``, so that the rerun rebuilds them instead of reusing them (notebook
    04 keeps finished adapters, notebook 05 finished evaluations), each move said out loud."""
    for unit, f in sorted(damaged.items()):
        if unit.exists():
            rundir.retire(run_dir, unit, f"{f} changed since its step wrote it", log=log)


def refresh_readme(figures_dir: Path, readme: Path = paths.REPO_ROOT / "README.md") -> list[str]:
    """Copy the tables of a run that writes the repository's ``figures/`` into the README; names refreshed.

    Only the class and study profiles write there (``COMMITTED_FIGURES``; the others keep their figures in their
    run directory), so the README's numbers are always those of the last such run, never typed by hand. A
    README block names its table relative to ``figures/`` (``<!-- table: study/eval_claims -->``).
    """
    root = (readme.parent / "figures").resolve()
    if not readme.exists() or not (Path(figures_dir).resolve() == root or root in Path(figures_dir).resolve().parents):
        return []
    return embed_tables(readme, root)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
