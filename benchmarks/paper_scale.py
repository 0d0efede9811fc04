"""The paper profile at scale: notebooks 01–05 on a random model of a real shape, each step's time and memory.

    python benchmarks/paper_scale.py --model random:llama-7b                       # one GPU, bf16
    python benchmarks/paper_scale.py --model random:llama-1b --device cpu          # the CPU test (CI)

What runs is the study itself: ``params/paper.yaml`` with the model, device and dtype given here and small
limits (a few calibration sequences, a few LoRA steps, a few examples per task), executed by
``tailored.runner.run`` through papermill, one notebook after the other, in a temporary run directory. Two
sets of limits (``--limits``):

- ``targets`` (default on a GPU): the conditions the memory targets are stated in, with few items:
  importance on 10 × 128 calibration tokens, LoRA steps of 16 × 256 tokens with activations recomputed,
  evaluation at batch 16 with a 25-shot prefix;
- ``ci`` (default on a CPU): the least that still runs every cell of every notebook.

Per step it records wall time, peak GPU memory (``torch.cuda.max_memory_allocated``) and peak host memory
(peak resident set), both measured inside the notebook's kernel (the ``resources`` block that
``write_metrics`` adds), the peak host memory above the model's weights, the cell that raised the kernel's
peak most (an IPython start-up file records the peak and current resident set after every cell; ``cells`` in
the record), the bytes the step wrote into the run directory, and an estimate of the step at the
paper's full settings: its main cell's measured time per item (calibration token, curve point, trained
token, scored example) times the items of the full run, plus the rest of the step as measured. It prints a
table and writes JSON (``--out``).

Data: the kernels read a *sample* of the prepared task data (``--examples`` per split, Wikipedia articles cut
to ``--words`` words), written into a temporary ``TAILORED_HOME``; the full data only sizes the estimate.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from tailored import paths, runner  # noqa: E402
from tailored.artifacts import read_metrics, write_json  # noqa: E402
from tailored.data import TASKS  # noqa: E402

PROFILE = "paper_scale"

# Per-step parameters laid over params/paper.yaml. Keys must be notebook parameters (the runner checks).
LIMITS: dict[str, dict[str, dict]] = {
    "targets": {
        "02_importance": {"n_samples": 10, "seq_len": 128, "check_mlp_units": 8},
        "03_prune": {"curve_methods": ["param_first"], "curve_shares": [0.5], "ppl_tokens": 1024},
        "04_lora_tune": {"pruned": ["block_20"], "tailored_tasks": ["boolq"], "length_tasks": ["boolq"],
                         "n_train": 48, "n_generic": 48, "n_validation": 16, "n_sweep": [48],
                         "batch_size": 16, "micro_batch_size": 16, "max_steps": 3, "save_every": 3,
                         "max_seq_len": 256, "require_learning": False},  # random weights: memory, not learning
        "05_evaluate": {"tasks": ["arc_easy", "boolq"], "prompts": ["task_specific"], "main_k": 25,
                        "k_sweep": [25], "k_sweep_tasks": ["boolq"], "limit": 16, "generation_limit": 4,
                        "generation_new_tokens": 16, "generation_prompts": ["task_specific"], "ppl_tokens": 1024,
                        "batch_size": 16},
    },
    "ci": {
        "01_trace_graph": {"layer_to_draw": 1, "probe_heads": 1},
        "02_importance": {"n_samples": 2, "seq_len": 32, "estimators": ["param_first", "l2", "random"],
                          "reductions": ["sum"], "micro_batch": 2, "check_layer": 1, "check_mlp_units": 2},
        "03_prune": {"targets": [0.5], "method": "param_first", "curve_methods": ["param_first"], "curve_shares": [0.5],
                     "ppl_tokens": 128, "ppl_max_length": 64, "speed_prompt_len": 4, "speed_new_tokens": 2,
                     "speed_prefill_len": 8},
        "04_lora_tune": {"tailored_tasks": ["sst2"], "length_tasks": ["sst2"], "n_train": 2, "n_generic": 2,
                         "n_validation": 1, "n_sweep": [2], "batch_size": 2, "micro_batch_size": 2,
                         "max_steps": 1, "save_every": 1, "max_seq_len": 32, "threads": 0,
                         "require_learning": False},  # one step on a random model measures memory, not learning
        "05_evaluate": {"tasks": ["sst2"], "prompts": ["task_specific"], "main_k": 0, "k_sweep": [0],
                        "k_sweep_tasks": ["sst2"], "limit": 1, "generation_limit": 1, "generation_new_tokens": 2,
                        "generation_prompts": ["task_specific"], "ppl_tokens": 128, "ppl_max_length": 64,
                        "batch_size": 4, "threads": 0},
    },
}
# The step whose time is "per item", found by a piece of its source, and what an item is.
MAIN_CELL = {"01_trace_graph": "graph = trace(", "02_importance": "importance = compute_importance(",
             "03_prune": "dense_ppl, window_tokens = ppl(dense", "04_lora_tune": "r = lora.train_lora(",
             "05_evaluate": "per_model[m.name] = evaluate_jobs("}
GIB = 2**30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ data
def sample_data(home: Path, examples: int, words: int, source: Path | None = None) -> dict[str, dict]:
    """A small copy of the prepared data under ``home/data``: ``examples`` per split, articles cut to ``words``.

    Returns task -> split sizes, of the full data and of the sample: ``{"full": …, "sample": …}``.
    """
    source = source or paths.data_dir()
    if not source.is_dir():
        raise SystemExit(f"no prepared data in {source}: run `tailored prepare` first (the notebooks read it)")
    sizes: dict[str, dict] = {"full": {}, "sample": {}}
    for task_dir in sorted(p for p in source.iterdir() if (p / "meta.json").exists()):
        meta = json.loads((task_dir / "meta.json").read_text())
        out = home / "data" / task_dir.name
        out.mkdir(parents=True, exist_ok=True)
        # a sample of a sample (the GPU bundle) still knows the full sizes
        sizes["full"][task_dir.name] = dict(meta.get("notes", {}).get("full_splits") or meta["splits"])
        for split in meta["splits"]:
            lines = (task_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
            if task_dir.name == "wikitext":  # every article (calibration needs enough of them), each cut short
                keep = []
                for line in lines:
                    d = json.loads(line)
                    d["fields"]["text"] = " ".join(d["fields"]["text"].split(" ")[:words])
                    keep.append(json.dumps(d))
            else:
                keep = lines[:examples]
            (out / f"{split}.jsonl").write_text("\n".join(keep) + "\n", encoding="utf-8")
            meta["splits"][split] = len(keep)
        meta.setdefault("notes", {}).update(sampled_by="benchmarks/paper_scale.py",
                                            full_splits=sizes["full"][task_dir.name])
        (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        sizes["sample"][task_dir.name] = dict(meta["splits"])
    return sizes


# ---------------------------------------------------------------------------------------------- params
def write_params(params_dir: Path, model: str, device: str, dtype: str, limits: str,
                 settings: dict[str, dict] | None = None) -> dict:
    """``params_dir/paper_scale.yaml``: params/paper.yaml with the model, device, dtype, the limits and
    ``settings`` (``{step: {key: value}}``, from ``--set``) laid over it; returns paper.yaml as read."""
    paper = yaml.safe_load((runner.PARAMS_DIR / "paper.yaml").read_text())
    data = copy.deepcopy(paper)
    data["description"] = f"paper profile at scale ({limits} limits), written by benchmarks/paper_scale.py"
    data["common"].update(model=model, device=device, dtype=dtype)
    for step, values in [*LIMITS[limits].items(), *(settings or {}).items()]:
        data.setdefault("steps", {}).setdefault(step, {}).update(values)
    params_dir.mkdir(parents=True, exist_ok=True)
    (params_dir / f"{PROFILE}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return paper


def with_defaults(resolved: dict[str, dict]) -> dict[str, dict]:
    """Each step's parameters with the notebook's defaults filled in (the runner passes only those set)."""
    out = {}
    for step in runner.discover_steps():
        defaults = {key: d.default for key, d in runner.notebook_parameters(step.path).items()}
        out[step.name] = {**defaults, **resolved.get(step.name, {})}
    return out


def full_params(paper: dict, model: str) -> dict[str, dict]:
    """Every notebook's parameters under params/paper.yaml itself (the full run being estimated)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        full = copy.deepcopy(paper)
        full["common"]["model"] = model
        full["common"]["device"] = "auto"  # counted here, not run: the machine need not have the profile's GPU
        (d / "paper.yaml").write_text(yaml.safe_dump(full))
        steps = runner.discover_steps()
        return with_defaults(runner.resolve_params("paper", steps, d / "run", d / "fig", params_dir=d))


# -------------------------------------------------------------------------------------------- measuring
def tree_files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, modification time)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# Read by every kernel of the run (IPYTHONDIR points at it): after each cell, one JSON line with the cell's first
# line of code, the kernel's peak resident set so far and its resident set now, into $PAPER_SCALE_CELLS.
CELL_RECORDER = """\
import json as _json, os as _os, resource as _resource


def _paper_scale_cell_memory(result):
    path = _os.environ.get("PAPER_SCALE_CELLS")
    if not path:
        return
    lines = [ln for ln in (result.info.raw_cell or "").splitlines() if ln.strip() and not ln.startswith("#")]
    with open("/proc/self/statm") as fh:
        rss = int(fh.read().split()[1]) * _os.sysconf("SC_PAGE_SIZE")
    with open(path, "a") as fh:
        fh.write(_json.dumps({"first_line": (lines or [""])[0][:100],
                              "peak_GiB": _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss / 2**20,
                              "rss_GiB": rss / 2**30}) + "\\n")


get_ipython().events.register("post_run_cell", _paper_scale_cell_memory)
"""


def cell_recorder(ipython_dir: Path) -> Path:
    """An IPython directory whose start-up file records memory after each cell (``CELL_RECORDER``)."""
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "50-paper-scale-cells.py").write_text(CELL_RECORDER)
    return ipython_dir


def top_rises(cells: list[dict], n: int = 2) -> list[dict]:
    """The ``n`` cells that raised the kernel's peak most, largest first (the first is usually the model's read; the
    second is where a step holds more than it)."""
    rises = [{"cell": i, "first_line": c["first_line"], "rise_GiB": c["peak_GiB"] - (cells[i - 1]["peak_GiB"] if i else 0.0)}
             for i, c in enumerate(cells)]
    return sorted(rises, key=lambda r: -r["rise_GiB"])[:n]


def cell_memory(path: Path) -> dict:
    """What the recorder wrote for one step: every cell's peak and resident set after it, and the cell that
    raised the kernel's peak most (its rise is the memory that cell held at its worst beyond what came before)."""
    cells = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    rises = [(c["peak_GiB"] - (cells[i - 1]["peak_GiB"] if i else 0.0), i) for i, c in enumerate(cells)]
    top = max(rises, default=None)
    return {"cells": cells,
            "largest_rise": None if top is None else {"cell": top[1], "first_line": cells[top[1]]["first_line"],
                                                      "rise_GiB": top[0], "peak_GiB": cells[top[1]]["peak_GiB"]}}


def weights_gib(model: str, dtype: str) -> float | None:
    """The weights of a ``random:<shape>`` model in ``dtype``, counted on the meta device (nothing allocated)."""
    if not model.startswith("random:"):
        return None
    import torch
    from transformers import AutoModelForCausalLM

    from tailored.models import random_config

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(random_config(model))
    return sum(p.numel() for p in meta.parameters()) * getattr(torch, dtype).itemsize / GIB


def cell_seconds(notebook: Path, needle: str) -> tuple[float, float]:
    """(seconds of the cell whose source holds ``needle``, seconds of all cells) from papermill's metadata."""
    nb = json.loads(notebook.read_text())
    main = total = 0.0
    for cell in nb["cells"]:
        d = (cell.get("metadata", {}).get("papermill", {}) or {}).get("duration") or 0.0
        total += d
        if cell["cell_type"] == "code" and needle in "".join(cell["source"]):
            main += d
    return main, total


def items(step: str, run: dict[str, dict], splits: dict[str, dict]) -> float | None:
    """How many items the step's main cell works on, for one run's parameters (all steps: ``run``).

    01: one trace; 02: calibration tokens; 03: points of the perplexity curve; 04: trained token slots (runs ×
    steps × rows × max_seq_len); 05: scored examples (models × prompts and shot counts × examples per task).
    ``splits``: task -> split sizes of the data the run reads.
    """
    p = run[step]
    if step == "01_trace_graph":  # the same work at any setting: one trace of the whole model
        return 1
    if step == "02_importance":
        return p["n_samples"] * p["seq_len"]
    if step == "03_prune":  # each point: a pruned copy and its perplexity (on ppl_tokens of text)
        return len(p["curve_methods"]) * len(p["curve_shares"])
    checkpoints = len(run["04_lora_tune"]["pruned"]) or len(run["03_prune"]["targets"])
    lora = run["04_lora_tune"]
    groups = len(lora["tailored_tasks"]) if lora["tailored_mode"] == "per_task" else 1
    sweeps = len([n for n in lora["n_sweep"] if n != lora["n_train"]])
    if step == "04_lora_tune":
        runs = checkpoints * (1 + groups) + sweeps * groups
        return runs * p["max_steps"] * p["batch_size"] * p["max_seq_len"]
    if step == "05_evaluate":
        def n(task: str, limit) -> int:
            generated = TASKS[task].kind in ("extractive_qa", "summarization")
            size = splits.get(task, {}).get(TASKS[task].eval_split, 0)
            lim = p["generation_limit"] if generated else limit
            return min(lim, size) if lim else size

        def prompts(task: str) -> int:
            generated = TASKS[task].kind in ("extractive_qa", "summarization")
            return len((p["generation_prompts"] or p["prompts"]) if generated else p["prompts"])

        plain = sum(prompts(t) * n(t, p["limit"]) for t in p["tasks"])
        plain += sum(len(p["k_sweep"]) * n(t, p["limit"]) for t in p["k_sweep_tasks"])
        lim = p["adapter_limit"] or p["limit"]
        tuned = [t for t in p["tasks"] if t in lora["tailored_tasks"]]
        adapters = checkpoints * (sum(n(t, lim) for t in p["tasks"]) + sum(n(t, lim) for t in tuned))
        adapters += sweeps * sum(n(t, lim) for t in tuned)
        return (1 + len(run["03_prune"]["targets"])) * plain + adapters
    return None


def conditions(step: str, p: dict, metrics: dict) -> str:
    """What the step's memory was measured under, in words (the targets are stated for these)."""
    if step == "02_importance":
        return (f"{p['n_samples']} x {p['seq_len']} tokens, passes of {p['micro_batch']}, recomputation "
                f"{'on' if p['recompute_activations'] else 'off'}, {len(p['estimators'])} estimators")
    if step == "03_prune":
        return f"targets {p['targets']}, curve {len(p['curve_methods'])} x {len(p['curve_shares'])}"
    if step == "04_lora_tune":
        return (f"{len(metrics.get('runs', {}))} runs x {p['max_steps']} steps of {p['batch_size']} x "
                f"{p['max_seq_len']} (micro {p['micro_batch_size'] or p['batch_size']}), recomputation "
                f"{'on' if p['recompute_activations'] else 'off'}")
    if step == "05_evaluate":
        used = {r["task"]: r["k_used"] for r in metrics.get("results", []) if r.get("kind") != "text"}
        fitted = ", ".join(f"{t} {k}" for t, k in used.items())  # shots that fit the context, per task
        return f"batch {p['batch_size']}, k = {p['main_k']} (shots that fit: {fitted})"
    return ""


def estimate(step: str, measured_s: float, main_s: float, small: dict, full: dict, small_splits: dict,
             full_splits: dict) -> dict | None:
    """Seconds at full settings: (measured − main cell) + main cell × full items / measured items."""
    a, b = items(step, small, small_splits), items(step, full, full_splits)
    if not a or b is None or main_s <= 0:
        return None
    per_item = main_s / a
    return {"items_measured": a, "items_full": b, "s_per_item": per_item, "full_s": measured_s - main_s + per_item * b}


# ------------------------------------------------------------------------------------------------ main
def run(model: str, device: str, dtype: str, limits: str, examples: int, words: int, threads: int,
        keep: Path | None, report=lambda result: None, settings: dict[str, dict] | None = None) -> dict:
    """Run the five steps; ``report(result)`` is called after each one (a killed run keeps what it measured)."""
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="paper_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    home, params_dir, run_root = work / "home", work / "params", work / "runs"
    shutil.rmtree(run_root, ignore_errors=True)
    sizes = sample_data(home, examples, words)
    paper = write_params(params_dir, model, device, dtype, limits, settings)
    full = full_params(paper, model)
    weights = weights_gib(model, dtype)
    env_before = {k: os.environ.get(k) for k in ("TAILORED_HOME", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                  "IPYTHONDIR", "PAPER_SCALE_CELLS")}
    os.environ["TAILORED_HOME"] = str(home)  # the kernels inherit it: they read the sampled data
    os.environ["IPYTHONDIR"] = str(cell_recorder(work / "ipython"))
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    rows = []
    try:
        steps = runner.discover_steps()
        small_all = with_defaults(runner.resolve_params(PROFILE, steps, run_root / PROFILE,
                                                        run_root / PROFILE / "figures", params_dir=params_dir))
        run_dir = run_root / PROFILE
        run_dir.mkdir(parents=True, exist_ok=True)
        for step in steps:
            before = tree_files(run_dir)
            log(f"{step.name}: running")
            cells_file = work / f"cells-{step.name}.jsonl"
            cells_file.unlink(missing_ok=True)
            os.environ["PAPER_SCALE_CELLS"] = str(cells_file)
            t0 = time.perf_counter()
            try:
                runner.run(profile=PROFILE, only=step.number, run_root=run_root, params_dir=params_dir,
                           progress=False, log=lambda *_: None)
            except runner.StepFailed as err:  # keep what was measured; the error names the cell
                rows.append({"step": step.name, "wall_s": time.perf_counter() - t0, "error": str(err)})
                log(f"{step.name}: FAILED: {err}")
                break
            wall = time.perf_counter() - t0
            changed = {name: st for name, st in tree_files(run_dir).items() if before.get(name) != st}
            written = sum(size for size, _ in changed.values())
            metrics = read_metrics(run_dir, step.name)
            res = metrics.get("resources", {})
            main_s, cells_s = cell_seconds(run_dir / f"{step.name}.ipynb", MAIN_CELL[step.name])
            est = estimate(step.name, wall, main_s, small_all, full, sizes["sample"], sizes["full"])
            row = {"step": step.name, "wall_s": wall, "cells_s": cells_s, "main_cell_s": main_s,
                   "conditions": conditions(step.name, small_all[step.name], metrics),
                   "peak_gpu_GiB": res.get("peak_gpu_GiB"), "gpu_reserved_GiB": res.get("gpu_reserved_GiB"),
                   "peak_host_GiB": res.get("peak_host_GiB"), "written_MiB": written / 2**20,
                   "files_written": len(changed),
                   "full_estimate": est, **cell_memory(cells_file)}
            peak = row["peak_gpu_GiB"] if device.startswith("cuda") else row["peak_host_GiB"]
            row["peak_above_weights_GiB"] = None if weights is None or peak is None else peak - weights
            rows.append(row)
            report({"model": model, "device": device, "dtype": dtype, "limits": limits, "ok": False,
                    "steps": rows, "total_s": sum(r["wall_s"] for r in rows), "partial": True})
            top = row["largest_rise"] or {}
            log(f"{step.name}: {wall:.1f} s, GPU peak {_fmt(row['peak_gpu_GiB'])} GiB, host peak "
                f"{_fmt(row['peak_host_GiB'])} GiB ({_fmt(row['peak_above_weights_GiB'])} above the weights; most "
                f"raised by `{top.get('first_line', '?')}`, +{_fmt(top.get('rise_GiB'))}), wrote "
                f"{row['written_MiB']:.1f} MiB")
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return {"model": model, "device": device, "dtype": dtype, "limits": limits, "limits_params": LIMITS[limits],
            "settings": settings or {}, "weights_GiB": weights,
            "examples_per_split": examples, "words_per_article": words, "threads": threads or None,
            "ok": len(rows) == len(steps) and not any("error" in r for r in rows),
            "steps": rows, "total_s": sum(r["wall_s"] for r in rows)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _duration(seconds: float) -> str:
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 2 * 86400 else f"{seconds / 86400:.0f} days"


def _fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def table(result: dict) -> str:
    lines = ["| step | wall s | peak GPU GiB | peak host GiB | above the weights GiB | cells that raised the peak most "
             "| written MiB | full settings (estimate) | measured under |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        if "error" in r:
            lines.append(f"| {r['step']} | {r['wall_s']:.1f} | FAILED: {r['error'].splitlines()[0]} | | | | | | |")
            continue
        est = r["full_estimate"]
        full = f"{_duration(est['full_s'])} ({est['items_full']:.3g} items at {est['s_per_item']:.3g} s)" if est else "–"
        raised = "; ".join(f"`{t['first_line'][:60]}` (+{t['rise_GiB']:.2f})" for t in top_rises(r.get("cells", []))) or "–"
        lines.append(f"| {r['step']} | {r['wall_s']:.1f} | {_fmt(r['peak_gpu_GiB'])} | {_fmt(r['peak_host_GiB'])} | "
                     f"{_fmt(r.get('peak_above_weights_GiB'))} | {raised} | {r['written_MiB']:.1f} | {full} | "
                     f"{r.get('conditions', '')} |")
    lines.append(f"| total | {result['total_s']:.1f} | | | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-7b", help="random:<shape> (or any model spec)")
    parser.add_argument("--device", default=None, help="cuda when there is one, else cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on a CPU (bf16 is slower there)")
    parser.add_argument("--limits", choices=sorted(LIMITS), default=None, help="targets on a GPU, ci on a CPU")
    parser.add_argument("--examples", type=int, default=None, help="examples kept per data split (128 / 8)")
    parser.add_argument("--words", type=int, default=None, help="words kept per Wikipedia article (400 / 30)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the kernels (CPU: 1)")
    parser.add_argument("--keep", help="keep the run directory here (default: a temporary one, removed)")
    parser.add_argument("--set", action="append", default=[], metavar="STEP.KEY=VALUE",
                        help="one more notebook parameter, e.g. 03_prune.layer_range=[0,4] (YAML value)")
    parser.add_argument("--out", default="paper_scale.json")
    parser.add_argument("--sample-data", metavar="HOME", help="only write the data sample to HOME/data and stop "
                        "(a small TAILORED_HOME to take to a machine without the prepared data)")
    args = parser.parse_args(argv)
    if args.sample_data:
        sizes = sample_data(Path(args.sample_data), args.examples or 128, args.words or 400)
        log(f"data sample of {len(sizes['sample'])} tasks in {args.sample_data}/data")
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    limits = args.limits or ("targets" if gpu else "ci")
    examples = args.examples or (128 if limits == "targets" else 8)
    words = args.words or (400 if limits == "targets" else 30)
    threads = args.threads if args.threads is not None else (0 if gpu else 1)
    command = "python benchmarks/paper_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"{args.model} on {device} in {dtype}, {limits} limits")
    where = dict(command=command, torch=torch.__version__, python=platform.python_version(),
                 machine=torch.cuda.get_device_name() if gpu else cpu_name(),
                 cpus=os.cpu_count())
    settings: dict[str, dict] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        step, _, name = key.partition(".")
        settings.setdefault(step, {})[name] = yaml.safe_load(value)
    result = run(args.model, device, dtype, limits, examples, words, threads, Path(args.keep) if args.keep else None,
                 report=lambda partial: write_json(args.out, {**partial, **where}), settings=settings)
    result.update(where, load_average=os.getloadavg(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(args.out, result)
    print(table(result))
    print(f"-> {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
