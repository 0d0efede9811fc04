"""Run the study: execute ``notebooks/0N_*.ipynb`` in order through papermill into ``runs/<profile>/``.

The runner does three things a bare ``papermill`` call does not:

1. **Validates before computing.** ``params/<profile>.yaml`` is checked against each notebook's
   ``parameters`` cell: an unknown or misspelled key, a value of the wrong type, or a model path that
   does not exist stops the run before any notebook starts, with a message naming the key and the valid ones.
2. **Skips what has not changed.** A step's fingerprint hashes its notebook, its resolved parameters, the
   source of the ``tailored`` package and the fingerprints of the steps before it. A step whose fingerprint
   equals the one recorded after its last successful run is skipped (``force=True`` reruns it). Changing an
   evaluation knob therefore reruns notebook 05 only; changing a pruning knob reruns 03, 04 and 05.
3. **Keeps a manifest.** ``runs/<profile>/manifest.json`` records parameters, library versions, input hashes
   and durations of every step, so a result can be traced back to what produced it.

A failing cell stops the run with a ``StepFailed`` naming the notebook and the cell; the executed notebook
is kept as ``<step>.failed.ipynb`` for inspection, and the last good ``<step>.ipynb`` is left untouched.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from tailored import paths
from tailored.artifacts import read_json, write_json

NOTEBOOKS_DIR = paths.REPO_ROOT / "notebooks"
PARAMS_DIR = paths.REPO_ROOT / "params"
PACKAGE_DIR = paths.REPO_ROOT / "tailored"
KERNEL_NAME = "tailored"
# Injected by the runner into every notebook; never set in a params file.
INJECTED = ("profile", "run_dir", "figures_dir")


class ParamsError(ValueError):
    """The params file does not fit the notebooks; raised before anything runs."""


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
def notebook_parameters(path: Path) -> dict[str, dict]:
    """The names, defaults and types declared in a notebook's ``parameters`` cell."""
    import papermill

    params = papermill.inspect_notebook(str(path))
    if not params:
        raise ParamsError(f"{path.name} has no cell tagged 'parameters'")
    return params


def load_params_file(profile: str, params_dir: Path = PARAMS_DIR) -> dict:
    path = params_dir / f"{profile}.yaml"
    if not path.exists():
        have = sorted(p.stem for p in params_dir.glob("*.yaml"))
        raise ParamsError(f"no params file for profile {profile!r} ({path}); profiles are {', '.join(have)}")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - {"common", "steps", "description"}
    if unknown:
        raise ParamsError(f"{path.name}: unknown top-level keys {sorted(unknown)}; use 'common', 'steps', 'description'")
    return data


def _default_value(info: dict):
    """The notebook default as a Python value (papermill reports it as source text)."""
    try:
        return ast.literal_eval(info.get("default", "None"))
    except (ValueError, SyntaxError):
        return None


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
                   params_dir: Path = PARAMS_DIR) -> dict[str, dict]:
    """Validate the profile's params against every notebook and return the parameters of each step.

    ``common`` keys go to every notebook that declares them (and must be declared by at least one);
    ``steps.<name>`` keys must be declared by that step's notebook. Types must match the defaults'.
    """
    data = load_params_file(profile, params_dir)
    common = data.get("common") or {}
    per_step = data.get("steps") or {}
    # Inspect every notebook, not only the selected ones: a common key is valid if any step declares it.
    declared = {s.name: notebook_parameters(s.path) for s in discover_steps(params_notebooks_dir(steps))}
    all_steps = set(declared)

    errors = []
    for key in INJECTED:
        if key in common:
            errors.append(f"common.{key}: set by the runner, remove it from {profile}.yaml")
    all_declared = set().union(*(d.keys() for d in declared.values())) if declared else set()
    for key in common:
        if key not in all_declared and key not in INJECTED:
            errors.append(f"common.{key}: no notebook declares it; valid keys: {', '.join(sorted(all_declared - set(INJECTED)))}")
    for name, values in per_step.items():
        if name not in all_steps:
            errors.append(f"steps.{name}: no such notebook; steps are {', '.join(sorted(all_steps))}")
            continue
        for key in values or {}:
            if key not in declared[name]:
                valid = sorted(set(declared[name]) - set(INJECTED))
                errors.append(f"steps.{name}.{key}: not a parameter of {name}; valid keys: {', '.join(valid)}")

    resolved = {}
    for step in steps:
        decl = declared[step.name]
        values = {k: v for k, v in common.items() if k in decl}
        values.update(per_step.get(step.name) or {})
        for key, value in values.items():
            if key not in decl:
                continue
            default = _default_value(decl[key])
            if not _type_ok(value, default):
                errors.append(f"{step.name}.{key}: {value!r} is a {type(value).__name__}, "
                              f"but the notebook's default {default!r} is a {type(default).__name__}")
        values.update(profile=profile, run_dir=str(run_dir), figures_dir=str(figures_dir))
        resolved[step.name] = {k: v for k, v in values.items() if k in decl}
    if "model" in common or any("model" in (v or {}) for v in per_step.values()):
        for name, values in resolved.items():
            if "model" in values:
                problem = _check_model(values["model"])
                if problem:
                    errors.append(f"{name}.model: {problem}")
    if errors:
        raise ParamsError(f"params/{profile}.yaml does not fit the notebooks:\n  " + "\n  ".join(dict.fromkeys(errors)))
    return resolved


def _check_model(spec) -> str | None:
    from tailored.models import RANDOM_PREFIX, RANDOM_SHAPES, SMOLLM2, TINY_VARIANTS

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
        return None
    if "/" in spec:
        return None  # a hub id, for users online
    return (f"{spec!r} is not {SMOLLM2!r}, a tiny variant ({', '.join(TINY_VARIANTS)}), a random shape "
            f"({', '.join(RANDOM_PREFIX + n for n in RANDOM_SHAPES)}), a directory, or a hub id")


# ----------------------------------------------------------------------------------------- fingerprints
def source_hash(package_dir: Path = PACKAGE_DIR) -> str:
    h = hashlib.sha256()
    for f in sorted(package_dir.rglob("*")):
        if f.suffix in (".py", ".yaml") and "__pycache__" not in f.parts:
            h.update(str(f.relative_to(package_dir)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def fingerprint(step: Step, params: dict, src: str, upstream: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(step.path.read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(src.encode())
    h.update(json.dumps(upstream, sort_keys=True).encode())
    return h.hexdigest()


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("tailored", "torch", "transformers", "peft", "papermill", "datasets", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def kernel_name() -> str:
    """The project's kernel if registered (``make install`` does it), else the default ``python3``."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


# ---------------------------------------------------------------------------------------------- run
def run(profile: str = "class", only: str | None = None, start: str | None = None, force: bool = False,
        run_root: Path | None = None, overrides: dict | None = None, progress: bool = True,
        log=print, notebooks_dir: Path = NOTEBOOKS_DIR, params_dir: Path = PARAMS_DIR) -> dict:
    """Execute the selected steps of ``profile``; return the manifest. See the module docstring."""
    import papermill

    steps_all = discover_steps(notebooks_dir)
    steps = select_steps(steps_all, only, start)
    run_dir = paths.run_dir(profile, run_root).resolve()
    figures_dir = (paths.REPO_ROOT / "figures") if profile == "class" and run_root is None else run_dir / "figures"
    resolved = resolve_params(profile, steps, run_dir, figures_dir, params_dir)
    if overrides:
        for name, values in resolved.items():
            declared = notebook_parameters(next(s.path for s in steps if s.name == name))
            values.update({k: v for k, v in overrides.items() if k in declared})
            problem = _check_model(values["model"]) if "model" in values else None
            if problem:
                raise ParamsError(f"{name}.model: {problem}")

    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {"profile": profile, "steps": {}}
    manifest.update(profile=profile, params_file=f"params/{profile}.yaml", versions=versions())
    src = source_hash()
    kernel = kernel_name()

    for step in steps:
        upstream = {s.name: manifest["steps"].get(s.name, {}).get("fingerprint", "never run")
                    for s in steps_all if s.number < step.number}
        params = resolved[step.name]
        fp = fingerprint(step, params, src, upstream)
        out_nb = run_dir / f"{step.name}.ipynb"
        previous = manifest["steps"].get(step.name, {})
        if not force and previous.get("fingerprint") == fp and previous.get("status") == "ok" and out_nb.exists():
            log(f"[{step.name}] unchanged since its last successful run: skipped (use --force to rerun)")
            continue
        log(f"[{step.name}] running {step.path.name} -> {out_nb}")
        partial = run_dir / f"{step.name}.running.ipynb"
        started = time.time()
        try:
            papermill.execute_notebook(str(step.path), str(partial), parameters=params, kernel_name=kernel,
                                       cwd=str(step.path.parent), progress_bar=progress, log_output=False)
        except papermill.PapermillExecutionError as err:
            failed = run_dir / f"{step.name}.failed.ipynb"
            os.replace(partial, failed)
            manifest["steps"][step.name] = {**previous, "status": "failed", "failed_at": _now(),
                                            "error": f"{err.ename}: {err.evalue}"}
            write_json(manifest_path, manifest)
            raise StepFailed(f"{step.path.name} failed in cell {err.cell_index} (execution count {err.exec_count}): "
                             f"{err.ename}: {err.evalue}\n  the executed notebook is kept at {failed}") from None
        os.replace(partial, out_nb)
        manifest["steps"][step.name] = {"status": "ok", "fingerprint": fp, "params": params, "upstream": upstream,
                                        "notebook_sha256": hashlib.sha256(step.path.read_bytes()).hexdigest(),
                                        "source_sha256": src, "finished": _now(),
                                        "duration_s": round(time.time() - started, 2), "output": out_nb.name}
        write_json(manifest_path, manifest)
        log(f"[{step.name}] done in {time.time() - started:.1f} s")
        refreshed = refresh_readme(figures_dir)
        if refreshed:
            log(f"[{step.name}] README tables updated from figures/: {', '.join(refreshed)}")
    return manifest


def refresh_readme(figures_dir: Path, readme: Path = paths.REPO_ROOT / "README.md") -> list[str]:
    """Copy the tables of a run that writes the repository's ``figures/`` into the README; names refreshed.

    Only the class profile writes there (other profiles keep their figures in their run directory), so the
    README's numbers are always those of the last class-profile run, never typed by hand.
    """
    from tailored.artifacts import embed_tables

    if Path(figures_dir).resolve() != (readme.parent / "figures").resolve() or not readme.exists():
        return []
    return embed_tables(readme, figures_dir)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
