"""The run directory: what each step of the study writes, and where the next step finds it.

One module owns every on-disk contract between the notebooks, so no notebook holds a file schema, builds a
path by hand or parses a name::

    runs/<profile>/
        graph.json                   01  the coupled groups (tailored.graph.Graph)
        importance.safetensors       02  scores per unit (tailored.importance.Importance)
        calibration.safetensors      02  the calibration windows; 03 prunes on the very same ones
        pruned/<mode>_<pct>/         03  one pruned checkpoint per target (tailored.checkpoint)
        adapters/<checkpoint>/<run>/ 04  one LoRA adapter per run (tailored.lora); beside it <run>.job.json,
                                         the job of a data-parallel run (tailored.lora_launch)
        adapters/index.json          04  every adapter: its checkpoint, recipe, tasks, prompt, data size
        eval/<key>.json              05  one finished evaluation each, so an interrupted run resumes
        retired/<path>               what was replaced, damaged, or no longer made by the plan, moved aside at
                                         its own path (retired/pruned/block_50/, retired/adapters/...): never
                                         read again, kept for a look, each move said out loud
        metrics/<step>.json          every step: the numbers its figures and tables show
        manifest.json                the runner: parameters, versions, fingerprints, durations

Every artifact is sealed when written (``tailored.artifacts.seal``: the sha256 of its bytes beside it) and
checked before it is reused; ``rebuild_hint`` says which notebook makes a damaged one again, ``retire`` moves
one aside, and ``remove_leftovers`` removes what an interrupted writer left (``.<name>.tmp-<pid>``,
``.<name>.old-<pid>``) once its process is provably gone.

Notebook 04 plans its runs with ``lora_runs`` and lists them with ``write_adapter_index``; notebook 05 finds
every model with ``run_models`` (``tailored.evaluate.evaluation_jobs`` says what to score on each) and keeps
each finished evaluation in an ``EvalStore``. This module sits low in the package (it imports ``artifacts``
and ``checkpoint`` only), so every notebook can use it without depending on the later stages' code.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tailored import checkpoint
from tailored.artifacts import (
    SEAL_SUFFIX,
    SUMS,
    check_seal,
    file_sha256,
    json_safe,
    metrics_path,
    read_json,
    seal_path,
    stat_fingerprint,
    write_json,
    write_sealed,
)
from tailored.lock import pid_alive

GRAPH = "graph.json"
IMPORTANCE = "importance.safetensors"
CALIBRATION = "calibration.safetensors"
PRUNED = "pruned"
ADAPTERS = "adapters"
INDEX = "index.json"
EVAL = "eval"
RETIRED = "retired"
RECIPES = ("generic", "tailored")
TAILORED_MODES = ("multi", "per_task")


# What each step writes, for the runner: a step is skipped only while these are as it left them (a sealed file's
# seal too: the notebook that reads it checks the bytes against it).
STEP_OUTPUTS = {"01_trace_graph": (GRAPH, GRAPH + SEAL_SUFFIX),
                "02_importance": (IMPORTANCE, IMPORTANCE + SEAL_SUFFIX, CALIBRATION, CALIBRATION + SEAL_SUFFIX),
                "03_prune": (PRUNED,), "04_lora_tune": (ADAPTERS,), "05_evaluate": ()}


# Which notebook writes what: the first part of a path inside the run directory -> step number.
WRITTEN_BY = {GRAPH: "01", IMPORTANCE: "02", CALIBRATION: "02", PRUNED: "03", ADAPTERS: "04", EVAL: "05",
              "metrics": None}


def rebuild_hint(run_dir: str | Path, path: str | Path) -> str:
    """What makes an artifact of the run directory again, for an error message: ``"rerun notebook 03 to rebuild it
    (`tailored run --steps 03 --force`)"``; a generic sentence for a path outside the layout."""
    try:
        rel = Path(path).resolve().relative_to(Path(run_dir).resolve())
    except ValueError:
        return "rebuild it with the step that wrote it (`tailored run`)"
    top = rel.parts[0] if rel.parts else ""
    top = top[: -len(SEAL_SUFFIX)] if top.endswith(SEAL_SUFFIX) else top
    step = WRITTEN_BY.get(top)
    if top == "metrics" and len(rel.parts) > 1:
        step = Path(rel.parts[1]).stem[:2]
    if not step:
        return "rebuild it with the step that wrote it (`tailored run`)"
    return f"rerun notebook {step} to rebuild it (`tailored run --steps {step} --force`)"


def artifact_unit(run_dir: str | Path, rel: str) -> Path:
    """The artifact a file of the run directory belongs to: what is moved aside and rebuilt when the file is
    damaged. ``pruned/block_20/model.safetensors`` -> ``pruned/block_20``; ``adapters/block_20/tailored/
    adapter_model.safetensors`` -> ``adapters/block_20/tailored``; a top-level file or ``eval/<key>.json``: itself."""
    parts = Path(rel).parts
    if parts[:1] == (PRUNED,) and len(parts) > 2:
        return Path(run_dir).joinpath(*parts[:2])
    if parts[:1] == (ADAPTERS,) and len(parts) > 3:
        return Path(run_dir).joinpath(*parts[:3])
    return Path(run_dir).joinpath(*parts)


def retired_path(run_dir: str | Path, path: str | Path) -> Path:
    """Where ``retire`` puts ``path``: ``retired/`` + its path in the run directory."""
    run_dir = Path(run_dir)
    return run_dir / RETIRED / Path(path).resolve().relative_to(run_dir.resolve())


def run_dir_of(adapter_dir: str | Path) -> Path:
    """The run directory a LoRA run's folder belongs to, whose ``retired/`` takes it when it is replaced:
    ``<run_dir>/adapters/<checkpoint>/<run>`` -> ``<run_dir>``; a folder outside that layout (a test's, a user's
    own ``out_dir``) belongs to the folder that holds it."""
    adapter_dir = Path(adapter_dir)
    return adapter_dir.parents[2] if adapter_dir.parent.parent.name == ADAPTERS else adapter_dir.parent


def retire(run_dir: str | Path, path: str | Path, reason: str,
           log: Callable[[str], object] | None = None) -> Path:
    """Move ``path`` (a file, with its seal, or a folder) to ``retired/<its path>``, replacing an older retired copy,
    and say so (``log``, default a warning): the one place where everything replaced or damaged goes. Nothing
    reads ``retired/`` again; it is kept for a look and may be deleted. Returns the new place."""
    run_dir, path = Path(run_dir), Path(path)
    dest = retired_path(run_dir, path)
    moved = [(path, dest)]
    if path.is_file() and seal_path(path).is_file():
        moved.append((seal_path(path), dest.with_name(dest.name + SEAL_SUFFIX)))
    for src, to in moved:
        if to.is_dir():
            shutil.rmtree(to)
        to.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, to)
    message = f"{path.relative_to(run_dir)} moved to {dest.relative_to(run_dir)}: {reason}"
    if log is None:
        warnings.warn(message, stacklevel=2)
    else:
        log(message)
    return dest


LEFTOVER = re.compile(r"\..+\.(?:tmp|old)-(\d+)")  # .<name>.tmp-<pid> / .<name>.old-<pid>: a writer's temporary


def leftovers(run_dir: str | Path) -> list[Path]:
    """What interrupted writers left in the run directory that can be proved dead: ``.<name>.tmp-<pid>`` and
    ``.<name>.old-<pid>`` files and folders whose process is not running on this machine (or is this one, which
    has written nothing yet), ``<step>.running.ipynb`` of a killed run, and the ``<run>.replaced`` folders older
    versions set adapters aside in. Not inside ``retired/``; nothing a live process may still be writing."""
    run_dir = Path(run_dir)
    found: list[Path] = []

    def walk(folder: Path) -> None:
        for p in sorted(folder.iterdir()):
            m = LEFTOVER.fullmatch(p.name)
            if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
                found.append(p)
            elif p.is_dir() and not p.is_symlink() and p != run_dir / RETIRED:
                if p.name.endswith(".replaced"):
                    found.append(p)
                else:
                    walk(p)

    if run_dir.is_dir():
        walk(run_dir)
        found += sorted(run_dir.glob("*.running.ipynb"))
    return found


def remove_leftovers(run_dir: str | Path, log: Callable[[str], object] | None = None) -> list[str]:
    """Clear ``leftovers``: temporaries of dead writers are deleted, ``.replaced`` adapters retired; says what
    went (``log``, default a warning) and returns the names, relative to the run directory. Call it holding the
    run's lock (``tailored.lock.run_lock``), so that no other run of this directory is writing."""
    run_dir = Path(run_dir)
    gone = []
    for p in leftovers(run_dir):
        name = p.relative_to(run_dir).as_posix()
        if p.name.endswith(".replaced") and p.is_dir():
            retire(run_dir, p, "an adapter an earlier version set aside", log=log or (lambda _msg: None))
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(name)
    if gone:
        message = f"{run_dir}: removed what interrupted runs left behind: {', '.join(gone)}"
        warnings.warn(message, stacklevel=2) if log is None else log(message)
    return gone


def step_outputs(run_dir: str | Path, step: str) -> list[Path]:
    """The artifacts a step of the study writes (and its ``metrics/<step>.json``); empty for another notebook."""
    if step not in STEP_OUTPUTS:
        return []
    return [Path(run_dir) / name for name in STEP_OUTPUTS[step]] + [metrics_path(run_dir, step)]


def graph_path(run_dir: str | Path) -> Path:
    """``graph.json``: written by notebook 01, read by 02 and 03."""
    return Path(run_dir) / GRAPH


def calibration_path(run_dir: str | Path) -> Path:
    """``calibration.safetensors``: the calibration windows, written by notebook 02, read by 03."""
    return Path(run_dir) / CALIBRATION


def importance_path(run_dir: str | Path) -> Path:
    """``importance.safetensors``: written by notebook 02, read by 03."""
    return Path(run_dir) / IMPORTANCE


# ============================================================================================ pruned (03)
def checkpoint_name(mode: str, target: float) -> str:
    """The folder name of the checkpoint pruned ``mode``-wise to ``target``: ``block_20``, ``layer_35``."""
    return f"{mode}_{round(100 * target)}"


def checkpoint_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / PRUNED / name


def checkpoints(run_dir: str | Path) -> dict[str, float]:
    """The run's pruned checkpoints, ``{name: share of decoder parameters removed}``, least pruned first."""
    found = {}
    for folder in sorted((Path(run_dir) / PRUNED).glob("*")):
        if checkpoint.is_checkpoint(folder):
            record = checkpoint.read_record(folder).get("record", {})
            found[folder.name] = record.get("share_decoder", record.get("plan", {}).get("share_decoder", math.nan))
    return dict(sorted(found.items(), key=lambda kv: (kv[1], kv[0])))


def retire_checkpoints(run_dir: str | Path, keep: Sequence[str], log: Callable[[str], object] = print) -> list[str]:
    """Move the checkpoints of ``pruned/`` that are not in ``keep`` to ``retired/pruned/`` (``retire``: replacing
    older retired copies of the same name, each move said out loud), so that later steps never pick up what the
    current plan no longer makes (e.g. ``block_50`` after ``targets`` changed from [0.2, 0.5] to [0.3]). Returns
    the names moved."""
    moved = []
    for name in checkpoints(run_dir):
        if name not in keep:
            retire(run_dir, checkpoint_dir(run_dir, name), "the current plan no longer makes it", log=log)
            moved.append(name)
    return moved


# ============================================================================================ adapters (04)
@dataclass(frozen=True)
class AdapterRun:
    """One LoRA run of notebook 04, and its entry in ``adapters/index.json``.

    ``base`` is the pruned checkpoint it tunes, ``recipe`` ``generic`` (instruction data) or ``tailored``
    (the ``tasks``' own training data written with ``prompt``); ``n`` the training examples per task of a
    data-sweep run (``None``: a main run); ``folder`` where its adapter lives, relative to the run directory.
    """

    name: str
    base: str
    recipe: str
    tasks: tuple[str, ...] | None
    prompt: str | None
    n: int | None
    folder: str
    share_decoder: float

    def to_json(self) -> dict:
        return {"name": self.name, "base": f"{PRUNED}/{self.base}", "adapter": self.folder, "recipe": self.recipe,
                "tasks": list(self.tasks) if self.tasks is not None else None, "prompt": self.prompt, "n": self.n,
                "share_decoder": self.share_decoder}

    @classmethod
    def from_json(cls, entry: Mapping) -> AdapterRun:
        tasks = entry.get("tasks")
        return cls(name=entry["name"], base=Path(entry["base"]).name, recipe=entry.get("recipe") or "",
                   tasks=tuple(tasks) if tasks is not None else None, prompt=entry.get("prompt"),
                   n=entry.get("n"), folder=entry["adapter"], share_decoder=entry.get("share_decoder", math.nan))


def lora_runs(shares: Mapping[str, float], tailored_tasks: Sequence[str], tailored_mode: str = "multi",
              n_train: int = 500, n_sweep: Sequence[int] = (), sweep_on: str = "",
              prompt: str = "task_specific") -> list[AdapterRun]:
    """Notebook 04's plan: a generic and a tailored recipe on every checkpoint, then the data sweep.

    ``shares``: the checkpoints to tune, ``{name: share removed}``. ``tailored_mode="multi"`` trains one
    adapter on all ``tailored_tasks``; ``"per_task"`` one adapter per task (the paper's way). The sweep trains
    the tailored recipe on ``sweep_on`` (default: the most pruned checkpoint) with ``n`` examples per task for
    each ``n`` of ``n_sweep``; a sweep point with ``n == n_train`` is the main run itself (the same folder).
    """
    if tailored_mode not in TAILORED_MODES:
        raise ValueError(f"tailored_mode {tailored_mode!r} is not one of {TAILORED_MODES}")
    if not shares:
        raise ValueError("no pruned checkpoints to tune: run notebook 03 first (`tailored run --from 03`)")
    groups = ({"tailored": tuple(tailored_tasks)} if tailored_mode == "multi"
              else {f"tailored-{t}": (t,) for t in tailored_tasks})
    sweep_on = sweep_on or max(shares, key=lambda name: shares[name])
    if n_sweep and sweep_on not in shares:
        raise ValueError(f"sweep_model {sweep_on!r} is not among the checkpoints tuned ({sorted(shares)})")

    def run(base: str, label: str, tasks: tuple[str, ...] | None, n: int | None) -> AdapterRun:
        folder = label if n is None or n != n_train else label.rsplit("-n", 1)[0]
        recipe = "generic" if tasks is None else "tailored"
        return AdapterRun(name=f"{base}+{label}", base=base, recipe=recipe, tasks=tasks,
                          prompt=None if tasks is None else prompt, n=n, folder=f"{ADAPTERS}/{base}/{folder}",
                          share_decoder=shares[base])

    runs = []
    for base in shares:
        runs.append(run(base, "generic", None, None))
        runs += [run(base, label, tasks, None) for label, tasks in groups.items()]
    for n in n_sweep:
        runs += [run(sweep_on, f"{label}-n{n}", tasks, n) for label, tasks in groups.items()]
    return runs


def adapter_dir(run_dir: str | Path, run: AdapterRun) -> Path:
    return Path(run_dir) / run.folder


def lora_job_path(run_dir: str | Path, run: AdapterRun) -> Path:
    """Where notebook 04 writes a run's job for ``tailored.lora_launch`` (``processes`` > 1), beside its adapter."""
    return Path(run_dir) / f"{run.folder}.job.json"


def write_adapter_index(run_dir: str | Path, runs: Sequence[AdapterRun]) -> Path:
    """``adapters/index.json``: the adapters notebook 05 evaluates, with what each was trained for."""
    return write_json(Path(run_dir) / ADAPTERS / INDEX, [r.to_json() for r in runs])


def read_adapter_index(run_dir: str | Path) -> list[AdapterRun]:
    """The entries of ``adapters/index.json`` (empty when notebook 04 has not run)."""
    path = Path(run_dir) / ADAPTERS / INDEX
    return [AdapterRun.from_json(e) for e in read_json(path)] if path.exists() else []


# ============================================================================================ models (05)
@dataclass(frozen=True)
class RunModel:
    """One model of a run to evaluate: the dense model, a pruned checkpoint, or a pruned one + a LoRA adapter.

    ``spec`` is what ``tailored.models.load`` takes (the dense spec, or a pruned checkpoint folder);
    ``share`` is the share of decoder parameters removed (0 for dense). A ``lora`` model is its ``base``
    checkpoint with the adapter in ``adapter`` merged in; ``recipe`` is ``generic`` or ``tailored``,
    ``tasks`` the tasks it was trained for (empty: all), ``prompt`` the prompt it was trained with (empty:
    none in particular) and ``n`` the training examples per task of a data-sweep run (None: a main run).
    """

    name: str
    kind: str  # "dense" | "pruned" | "lora"
    spec: str
    share: float = 0.0
    base: str = ""
    adapter: str = ""
    recipe: str = ""
    tasks: tuple[str, ...] = ()
    prompt: str = ""
    n: int | None = None


def run_models(run_dir: str | Path, dense: str) -> list[RunModel]:
    """The models a run has produced, in the order a table lists them: dense, then by share removed.

    Pruned checkpoints are the folders ``pruned/*/`` (notebook 03); LoRA models the entries of
    ``adapters/index.json`` (notebook 04). A run with neither gives the dense model alone.
    """
    run_dir = Path(run_dir)
    shares = checkpoints(run_dir)
    out = [RunModel("dense", "dense", dense)]
    out += [RunModel(name, "pruned", str(checkpoint_dir(run_dir, name)), share) for name, share in shares.items()]
    for run in read_adapter_index(run_dir):
        if run.base not in shares:
            raise FileNotFoundError(f"{run_dir / ADAPTERS / INDEX}: adapter {run.name!r} was tuned from "
                                    f"{run.base!r}, which is not a pruned checkpoint of this run ({sorted(shares)}); "
                                    "rerun notebook 03 and 04 (`tailored run --from 03`)")
        out.append(RunModel(run.name, "lora", str(checkpoint_dir(run_dir, run.base)), shares[run.base], base=run.base,
                            adapter=str(run_dir / run.folder), recipe=run.recipe,
                            tasks=() if run.recipe == "generic" else tuple(run.tasks or ()), prompt=run.prompt or "",
                            n=run.n))
    order = {m.name: i for i, m in enumerate(out)}
    return sorted(out, key=lambda m: (m.share if m.kind != "dense" else -1.0, m.kind == "lora", m.n is not None,
                                      order[m.name]))


def model_id(entry: RunModel, seed: int = 0) -> str:
    """What identifies a model's weights: its checkpoint's (and adapter's) content hashes when they are sealed
    (the sha256 of their ``SHA256SUMS``: a changed byte is a new id), else the names, sizes and times of their
    files; for a model made in code or a named one, its spec and seed. A rewritten checkpoint gets a new id, so
    its evaluations are never reused."""
    def identity(folder: str) -> str:
        sums = Path(folder) / SUMS
        return file_sha256(sums) if sums.is_file() else stat_fingerprint(folder)

    parts = [f"{entry.spec}@seed{seed}" if not Path(entry.spec).exists() else identity(entry.spec)]
    if entry.adapter:
        parts.append(identity(entry.adapter))
    return "+".join(p[:16] for p in parts)


class EvalStore:
    """``eval/<key>.json``: one finished evaluation per file, keyed by ``tailored.evaluate.result_key``, each sealed
    (``<key>.json.sha256``). A result is reused only when its bytes are those written: a damaged or unsealed one
    is said out loud (``log``, default a warning), moved to ``retired/eval/``, and evaluated again."""

    def __init__(self, run_dir: str | Path, log: Callable[[str], object] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / EVAL
        self.log = log
        self.reused = 0  # results found again, and the seconds they took when they were computed:
        self.reused_seconds = 0.0  # what a run from scratch would have spent on them (runner.write_durations)
        self.rejected: list[str] = []  # results found damaged or unsealed, evaluated again

    def get(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        if not path.exists():
            return None
        problem = check_seal(path)
        result = None
        if problem is None:
            try:
                result = json.loads(path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                problem = f"{path} is not valid JSON ({err})"
        if problem is not None or not isinstance(result, dict):
            self.rejected.append(path.name)
            retire(self.run_dir, path, f"{problem or 'not a result'}; it is evaluated again", log=self.log)
            return None
        self.reused += 1
        self.reused_seconds += float(result.get("seconds") or 0.0)
        return result

    def put(self, key: str, result: dict) -> None:
        path = self.folder / f"{key}.json"
        write_sealed(path, (json.dumps(json_safe(result)) + "\n").encode("utf-8"))
