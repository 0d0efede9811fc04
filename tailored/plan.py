"""The evaluation plan: which model × prompt × k each claim reads, on how many examples per task.

Notebook 05 evaluates exactly the plan's cells, nothing else. Every claim is read from its own cells
(``tailored.analysis.claim_verdicts``), on the deciding tasks, at the examples per task that ``claim_n`` gives
for its family; the paper's seven-task table is read at ``limit``:

=========  =============================================================================================
family     cells (deciding tasks, first ``claim_n[family][task]`` of the task's seeded examples)
=========  =============================================================================================
paper      every model, headline prompt and k, every task of ``tasks`` (LoRA: its own tasks, also with its
           own prompt), ``limit`` examples (``adapter_limit`` for LoRA; ``generation_limit`` for SQuAD and
           XSum, dense and the claim checkpoints with ``generation_prompts``); perplexity
pruning    the dense model and each claim checkpoint, headline: *pruning costs / keeps accuracy*
levels     every other pruned checkpoint, headline: *the best pruning level depends on the task*
lora       every adapter, its checkpoint and the dense model under ``lora_prompt``: the LoRA claims
prompts    each prompt model under every prompt of ``prompts``: *task-specific prompts beat general ones*
fewshot    each few-shot model, task-specific prompt, the fewest and most shots of ``k_sweep`` on
           ``k_sweep_tasks`` (the ks between, for the curve: ``k_sweep_limit``)
=========  =============================================================================================

A cell several families read is evaluated once, at the largest n any of them asks for. How large each
family's n must be comes from the variance of its paired comparisons (``size_family``): from a pilot's, or
any earlier run's, per-example file, with measured seconds per example (``plan_cost``)::

    python -m tailored.plan runs/pilot/examples.csv.gz --profile study --costs params/eval_costs.csv
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tailored import data
from tailored.analysis import (
    Z975,
    ClaimSettings,
    cell_index,
    main_runs,
    models_frame,
    paired_values,
    read_examples,
)
from tailored.params import NOTEBOOKS_DIR, declared
from tailored.paths import REPO_ROOT
from tailored.rundir import RunModel, checkpoint_name, lora_runs

FAMILIES = ("paper", "pruning", "levels", "lora", "prompts", "fewshot")
GENERATED_KINDS = ("extractive_qa", "summarization")
PLAN_COLUMNS = ["family", "model", "task", "prompt", "k", "n"]


@dataclass(frozen=True)
class PlanSettings:
    """Notebook 05's parameters that say what is evaluated (their meaning is the notebook's)."""

    tasks: tuple[str, ...]
    claims: ClaimSettings = ClaimSettings()
    prompts: tuple[str, ...] = ("harness", "general", "task_specific")
    generation_prompts: tuple[str, ...] | None = ("task_specific",)
    limit: int | None = 100
    adapter_limit: int | None = None
    generation_limit: int | None = None
    k_sweep_tasks: tuple[str, ...] = ()
    k_sweep_limit: int | None = None
    claim_n: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @classmethod
    def from_params(cls, p: Mapping) -> PlanSettings:
        """From notebook 05's parameter values (``globals()`` there, or a resolved profile)."""
        claims = ClaimSettings(headline=(p["headline_prompt"], p["main_k"]), deciding_tasks=tuple(p["deciding_tasks"]),
                               claim_checkpoints=tuple(p["claim_checkpoints"]), prompt_models=tuple(p["prompt_models"]),
                               fewshot_models=tuple(p["fewshot_models"]), k_sweep=tuple(p["k_sweep"]),
                               delta=float(p["delta"]), margin_delta=float(p["margin_delta"]),
                               half_width=float(p["delta"]), tolerance=float(p["tolerance"]), seed=p["seed"])
        gen = p["generation_prompts"]
        return cls(tasks=tuple(p["tasks"]), claims=claims, prompts=tuple(p["prompts"]),
                   generation_prompts=tuple(gen) if gen is not None else None, limit=p["limit"],
                   adapter_limit=p["adapter_limit"], generation_limit=p["generation_limit"],
                   k_sweep_tasks=tuple(p["k_sweep_tasks"]), k_sweep_limit=p["k_sweep_limit"],
                   claim_n={f: dict(v) for f, v in (p["claim_n"] or {}).items()})


def _has_train(task: str) -> bool:
    return "train" in data.splits(task)


def _kind(task: str) -> str:
    return data.TASKS[task].kind


def evaluation_plan(models: pd.DataFrame, p: PlanSettings,
                    has_train: Callable[[str], bool] = _has_train) -> pd.DataFrame:
    """The plan's cells: one row per (family, model, task, prompt, k) with ``n``, the examples to score (``None``:
    all). ``models``: ``tailored.analysis.models_frame`` of the run. Raises ``ValueError`` for a family of
    ``claim_n`` that does not exist or a claim model the run does not have."""
    unknown = sorted(set(p.claim_n) - set(FAMILIES[1:]))
    if unknown:
        raise ValueError(f"claim_n names {unknown}: the families are {list(FAMILIES[1:])}")
    c = p.claims
    main = main_runs(models)
    names = set(models["model"])
    missing = sorted({*c.claim_checkpoints, *c.prompt_models, *c.fewshot_models} - names)
    if missing:
        raise ValueError(f"claim models {missing} are not models of this run ({sorted(names)}); name the dense model "
                         "'dense' and pruned checkpoints by folder (block_20)")
    head_prompt, main_k = c.headline
    scored = [t for t in p.tasks if _kind(t) != "text"]
    texts = [t for t in p.tasks if _kind(t) == "text"] or ["wikitext"]
    deciding = [t for t in c.deciding_tasks if t in scored] if c.deciding_tasks else [
        t for t in scored if _kind(t) not in GENERATED_KINDS]
    rows: list[dict] = []
    dense = main.loc[main["kind"] == "dense", "model"].tolist()
    pruned = main.loc[main["kind"] == "pruned", "model"].tolist()
    checkpoints = [m for m in pruned if not c.claim_checkpoints or m in c.claim_checkpoints]
    lora = models[models["kind"] == "lora"]

    def shots(task, k):
        return k if has_train(task) else 0

    def n_for(family, task, fallback):
        n = (p.claim_n.get(family) or {}).get(task)
        return n if n is not None else fallback

    def add(family, model, tasks, prompt, k, n):
        for t in tasks:
            rows.append({"family": family, "model": model, "task": t, "prompt": prompt, "k": shots(t, k),
                         "n": n(t) if callable(n) else n})

    for _, m in models.iterrows():  # the paper's table, and the sweep runs' own prompt
        mine = [t for t in scored if m["tasks"] in ("all", "") or t in m["tasks"].split(", ")]
        if m["kind"] == "lora":
            n = p.adapter_limit or p.limit
            if pd.isna(m["n"]):
                add("paper", m["model"], [t for t in mine if _kind(t) not in GENERATED_KINDS], head_prompt, main_k, n)
            own = m["prompt"] or "task_specific"  # generation at generation_limit, as for every model
            add("paper", m["model"], [t for t in mine if _kind(t) not in GENERATED_KINDS], own, main_k, n)
            add("paper", m["model"], [t for t in mine if _kind(t) in GENERATED_KINDS], own, main_k,
                p.generation_limit or n)
        else:
            add("paper", m["model"], [t for t in scored if _kind(t) not in GENERATED_KINDS], head_prompt, main_k,
                p.limit)
            ladder_only = m["kind"] == "pruned" and m["model"] not in checkpoints  # accuracy only: generation is slow
            for prompt in () if ladder_only else p.generation_prompts or p.prompts:
                add("paper", m["model"], [t for t in scored if _kind(t) in GENERATED_KINDS], prompt, main_k,
                    p.generation_limit or p.limit)
        if m["kind"] != "lora" or pd.isna(m["n"]):
            add("paper", m["model"], texts, None, 0, None)
    for m in dense + checkpoints:
        add("pruning", m, deciding, head_prompt, main_k, lambda t: n_for("pruning", t, p.limit))
    for m in dense + pruned:  # the ladder from 0 to 50% is read on the examples every share of it was scored on
        add("levels", m, deciding, head_prompt, main_k,
            lambda t: n_for("levels", t, n_for("pruning", t, p.limit)))
    if len(lora):
        main_lora = lora[lora["n"].isna()]
        for _, m in main_lora.iterrows():
            trained = [t for t in deciding if m["tasks"] in ("all", "") or t in m["tasks"].split(", ")]
            for model in (m["model"], m["base"]):
                add("lora", model, trained, c.lora_prompt, main_k, lambda t: n_for("lora", t, p.limit))
        add("lora", dense[0], deciding, c.lora_prompt, main_k, lambda t: n_for("lora", t, p.limit))
    for m in c.prompt_models or dense + checkpoints:
        for prompt in p.prompts:
            add("prompts", m, deciding, prompt, main_k, lambda t: n_for("prompts", t, p.limit))
    ends = (min(c.k_sweep), max(c.k_sweep)) if c.k_sweep else ()
    for m in c.fewshot_models or dense + checkpoints:
        for k in c.k_sweep:  # the claim reads the fewest and the most shots; the ks between draw the curve
            add("fewshot", m, list(p.k_sweep_tasks), "task_specific", k,
                lambda t, k=k: n_for("fewshot", t, p.k_sweep_limit or p.limit) if k in ends
                else p.k_sweep_limit or p.limit)
    plan = pd.DataFrame(rows, columns=PLAN_COLUMNS)
    return plan.drop_duplicates(["family", "model", "task", "prompt", "k"]).reset_index(drop=True)


def cells(plan: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation (model, task, prompt, k) at the largest n any family asks for (``None`` = all),
    with the families that read it: what is run, in plan order."""
    key = ["model", "task", "prompt", "k"]
    frame = plan.assign(prompt=plan["prompt"].fillna(""), n=plan["n"].astype(float).fillna(np.inf))
    out = frame.groupby(key, sort=False).agg(n=("n", "max"), families=("family", lambda f: ", ".join(dict.fromkeys(f))))
    out = out.reset_index()
    out["prompt"] = pd.Series([p or None for p in out["prompt"]], dtype=object, index=out.index)
    out["n"] = pd.Series([None if not np.isfinite(n) else int(n) for n in out["n"]], dtype=object, index=out.index)
    return out


def examples_per_task(plan: pd.DataFrame) -> dict[str, int | None]:
    """``{task: the most examples any cell scores}`` (``None``: the whole split): what to load once per task."""
    out: dict[str, int | None] = {}
    for task, n in cells(plan)[["task", "n"]].itertuples(index=False):
        out[task] = None if n is None or out.get(task, 0) is None else max(out.get(task, 0), n)
    return out


def summary(plan: pd.DataFrame) -> pd.DataFrame:
    """The plan for a reader: one row per (family, prompt, k) with its models and examples per task."""
    out = []
    for (family, prompt, k), part in plan.assign(prompt=plan["prompt"].fillna("")).groupby(
            ["family", "prompt", "k"], sort=False):
        per_task = part.drop_duplicates("task")
        out.append({"claims": family, "prompt": prompt or None, "k": k,
                    "models": ", ".join(dict.fromkeys(part["model"])),
                    "examples per task": ", ".join(f"{t} {'all' if pd.isna(n) else int(n)}"
                                                   for t, n in zip(per_task["task"], per_task["n"]))})
    return pd.DataFrame(out)


# ============================================================================== sizing from a per-example file
def comparison_variances(examples: pd.DataFrame, pairs: Sequence[tuple[tuple, tuple]],
                         tasks: Sequence[str]) -> pd.DataFrame:
    """Per task and comparison, the per-example variance of the paired difference ``b − a`` of the task's table
    metric (a fraction²) and how many pairs it rests on: ``task, a, b, n, variance``."""
    idx = cell_index(examples)
    out = []
    for a, b in pairs:
        for t, (va, vb) in paired_values(idx, a, b, tasks).items():
            if len(va) > 1:
                out.append({"task": t, "a": "/".join(map(str, a)), "b": "/".join(map(str, b)), "n": len(va),
                            "variance": float(np.var(vb - va, ddof=1))})
    return pd.DataFrame(out, columns=["task", "a", "b", "n", "variance"])


def optimal_n(variance: Mapping[str, float], cost: Mapping[str, float], half_width: float,
              available: Mapping[str, int] | None = None, minimum: int = 50) -> dict[str, int]:
    """Examples per task so that the pooled difference (mean of the task means) has a 95% half-width of
    ``half_width`` (a fraction) at the least cost.

    With per-example variances ``v_t`` and costs ``c_t`` (seconds per example, all the family's cells of that
    task), the half-width is ``1.96 · sqrt(Σ v_t / n_t) / T``; minimising ``Σ c_t n_t`` under it gives
    ``n_t ∝ sqrt(v_t / c_t)`` (Lagrange): cheap and noisy tasks get more examples. A task capped by the size of
    its split (``available``) takes all it has and the others share what is left of the variance budget.
    """
    tasks = [t for t in variance if variance[t] > 0]
    budget = (half_width * len(variance) / Z975) ** 2  # Σ v_t / n_t may not exceed this
    fixed: dict[str, int] = {}
    while True:
        free = [t for t in tasks if t not in fixed]
        left = budget - sum(variance[t] / fixed[t] for t in fixed)
        if not free or left <= 0:
            break
        scale = sum(math.sqrt(variance[t] * cost[t]) for t in free) / left
        n = {t: max(minimum, math.ceil(scale * math.sqrt(variance[t] / cost[t]))) for t in free}
        over = [t for t in free if available and t in available and n[t] > available[t]]
        if not over:
            return {**{t: minimum for t in variance if t not in tasks}, **fixed, **n}
        fixed |= {t: available[t] for t in over}
    return {**{t: minimum for t in variance}, **fixed}  # the splits cannot reach the half-width: all they have


def family_pairs(family: str, models: pd.DataFrame, c: ClaimSettings) -> list[tuple[tuple, tuple]]:
    """The comparisons a family's deciding rows make (``(model, prompt, k)`` pairs, as ``claim_verdicts``)."""
    main = main_runs(models)
    dense = main.loc[main["kind"] == "dense", "model"].iloc[0]
    pruned = main.loc[main["kind"] == "pruned", "model"].tolist()
    checkpoints = [m for m in pruned if not c.claim_checkpoints or m in c.claim_checkpoints]
    head, k0 = tuple(c.headline), c.headline[1]
    lora = main[main["kind"] == "lora"]
    if family == "pruning":
        return [((m, *head), (dense, *head)) for m in checkpoints]
    if family == "levels":
        return [((m, *head), (dense, *head)) for m in pruned if m not in checkpoints]
    if family == "lora":
        out = [((m["base"], c.lora_prompt, k0), (m["model"], c.lora_prompt, k0)) for _, m in lora.iterrows()]
        for _, part in lora.groupby("base", sort=False):
            g, t = part[part["recipe"] == "generic"], part[part["recipe"] == "tailored"]
            out += [((g["model"].iloc[0], c.lora_prompt, k0), (x, c.lora_prompt, k0)) for x in t["model"] if len(g)]
        return out
    if family == "prompts":
        return [((m, "general", k0), (m, "task_specific", k0)) for m in c.prompt_models or [dense, *checkpoints]]
    if family == "fewshot" and len(c.k_sweep) > 1:
        return [((m, "task_specific", min(c.k_sweep)), (m, "task_specific", max(c.k_sweep)))
                for m in c.fewshot_models or [dense, *checkpoints]]
    return []


def size_families(examples: pd.DataFrame, models: pd.DataFrame, plan: pd.DataFrame, costs: pd.DataFrame,
                  c: ClaimSettings, available: Mapping[str, int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Propose ``claim_n``: per family and deciding task, the examples its deciding rows need for a half-width of
    ``c.half_width`` points, from the variances the per-example file shows.

    A comparison the file does not hold (the pilot has no adapters) takes, per task, the largest variance of the
    comparisons it does hold (``source`` says ``proxy``): conservative, since LoRA and prompts change a model
    less than 50% pruning does. Each task's cost is the seconds per example of all the family's cells on it.
    Returns ``(sizes, variances)``: ``family, task, variance, source, seconds, n`` and every measured variance.
    """
    deciding = list(c.deciding_tasks)
    measured = comparison_variances(examples, [p for f in FAMILIES for p in family_pairs(f, models, c)], deciding)
    fallback = measured.groupby("task")["variance"].max().to_dict()
    out = []
    for family in FAMILIES[1:]:
        pairs = family_pairs(family, models, c)
        if not pairs:
            continue
        keys = {("/".join(map(str, a)), "/".join(map(str, b))) for a, b in pairs}
        mine = measured[[(a, b) in keys for a, b in zip(measured["a"], measured["b"])]]
        var = mine.groupby("task")["variance"].max().to_dict()
        family_cells = plan[plan["family"] == family]
        seconds = {t: sum(cell_cost(costs, t, r.prompt, r.k) for r in family_cells[family_cells["task"] == t].itertuples())
                   for t in deciding}
        use = {t: var.get(t, fallback.get(t, np.nan)) for t in deciding if seconds.get(t)}
        use = {t: v for t, v in use.items() if np.isfinite(v)}
        n = optimal_n(use, {t: seconds[t] for t in use}, c.half_width / 100, available)
        out += [{"family": family, "task": t, "variance": use[t], "source": "measured" if t in var else "proxy",
                 "seconds": seconds[t], "n": n[t]} for t in use]
    return pd.DataFrame(out), measured


def cell_cost(costs: pd.DataFrame, task: str, prompt: str | None, k: int) -> float:
    """Seconds per example of one evaluation: the costs table's row for (task, k) if measured, else (task, 0)
    scaled by the k-shot factor of the nearest measured k of that task (linear in k between them)."""
    part = costs[costs["task"] == task]
    if part.empty:
        raise ValueError(f"no cost for task {task!r} in the costs table (tasks: {sorted(set(costs['task']))})")
    exact = part[(part["k"] == k) & (part["prompt"].fillna("") == (prompt or ""))]
    exact = exact if len(exact) else part[part["k"] == k]
    if len(exact):
        return float(exact["seconds_per_example"].mean())
    base = float(part.loc[part["k"] == part["k"].min(), "seconds_per_example"].mean())
    shot = part[part["k"] > 0]
    if shot.empty:
        return base
    kk = int(shot["k"].max())
    factor = float(shot.loc[shot["k"] == kk, "seconds_per_example"].mean()) / base
    return base * (1 + (factor - 1) * k / kk)


def combine_costs(reference: pd.DataFrame, timing: pd.DataFrame | None = None) -> pd.DataFrame:
    """The costs table ``cell_cost`` reads: ``reference`` (seconds per example of each task under the harness
    prompt at k = 0, measured on the machine the plan is for), and for every other (task, prompt, k) that
    ``timing`` measured (``scripts/pilot_evaluation.py --timing``), the reference scaled by the ratio measured
    side by side against the harness prompt at k = 0 on the same examples (the median over repetitions). A
    ``wikitext`` row of ``timing`` (seconds per model) is scaled by the mean ratio of reference to measured
    harness costs of the timed tasks."""
    ref = reference[["task", "prompt", "k", "seconds_per_example"]].copy()
    if timing is None or timing.empty:
        return ref
    base = timing[(timing["prompt"] == "harness") & (timing["k"] == 0)].set_index(["task", "rep"])["seconds_per_example"]
    scored = timing[timing["task"] != "wikitext"]
    ratio = scored.assign(ratio=[r.seconds_per_example / base[(r.task, r.rep)] for r in scored.itertuples()])
    ratio = ratio.groupby(["task", "prompt", "k"], as_index=False)["ratio"].median()
    at = ref.set_index("task")["seconds_per_example"]
    rows = [{"task": r.task, "prompt": r.prompt, "k": r.k, "seconds_per_example": at[r.task] * r.ratio}
            for r in ratio.itertuples() if r.task in at.index and not (r.prompt == "harness" and r.k == 0)]
    text = timing[timing["task"] == "wikitext"]
    timed = [t for t in dict.fromkeys(base.index.get_level_values(0)) if t in at.index]
    if len(text) and timed:
        scale = np.mean([at[t] / base.loc[t].median() for t in timed])
        rows.append({"task": "wikitext", "prompt": None, "k": 0,
                     "seconds_per_example": float(text["seconds_per_example"].median()) * scale})
    return pd.concat([ref, pd.DataFrame(rows)], ignore_index=True)


def plan_cost(plan: pd.DataFrame, costs: pd.DataFrame, available: Mapping[str, int]) -> pd.DataFrame:
    """Seconds of every evaluation of the plan at the costs' seconds per example: ``cells`` with ``seconds``
    (perplexity: the costs' ``wikitext`` row is seconds per model; ``nan`` where the costs have no row)."""
    out = cells(plan)
    out["examples"] = [1 if data.TASKS[t].kind == "text" else (n if n is not None else available.get(t, 0))
                       for t, n in zip(out["task"], out["n"])]
    out["examples"] = [min(e, available.get(t, e)) for t, e in zip(out["task"], out["examples"])]
    out["seconds"] = [_priced(costs, t, p, k) * e for t, p, k, e in
                      zip(out["task"], out["prompt"], out["k"], out["examples"])]
    return out


def _priced(costs: pd.DataFrame, task: str, prompt: str | None, k: int) -> float:
    """``cell_cost``, or ``nan`` for a task the costs table has no row for (left out of the sums, and shown)."""
    try:
        return cell_cost(costs, task, prompt, k)
    except ValueError:
        return float("nan")


# ============================================================================== a profile's plan, from the command line
def profile_params(profile: str, params_dir: Path = REPO_ROOT / "params") -> dict[str, dict]:
    """Each notebook's parameters under a profile: the parameters cell's defaults, then ``common``, then the
    profile's ``steps`` (what the runner passes; checked by it, not here)."""
    raw = yaml.safe_load((Path(params_dir) / f"{profile}.yaml").read_text())
    out = {}
    for nb in sorted(NOTEBOOKS_DIR.glob("0[345]_*.ipynb")):
        decl = declared(nb)
        values = {k: d.default for k, d in decl.items()}
        values |= {k: v for k, v in (raw.get("common") or {}).items() if k in decl}
        values |= (raw.get("steps") or {}).get(nb.stem) or {}
        out[nb.stem] = values
    return out


def profile_models(params: Mapping[str, Mapping]) -> pd.DataFrame:
    """The models a profile's run will have (notebooks 03 and 04's plans), before it runs."""
    p3, p4 = params["03_prune"], params["04_lora_tune"]
    mode = "layer" if p3["method"].startswith("layer") else "block"
    shares = {checkpoint_name(mode, t): t for t in p3["targets"]}
    tuned = {n: s for n, s in shares.items() if not p4["pruned"] or n in p4["pruned"]}
    entries = [RunModel("dense", "dense", "model")] + [RunModel(n, "pruned", n, s) for n, s in shares.items()]
    for r in lora_runs(tuned, p4["tailored_tasks"], p4["tailored_mode"], p4["n_train"], p4["n_sweep"],
                       p4["sweep_model"]):
        entries.append(RunModel(r.name, "lora", r.base, r.share_decoder, base=r.base, recipe=r.recipe,
                                tasks=tuple(r.tasks or ()), prompt=r.prompt or "", n=r.n))
    return models_frame(entries)


def main(argv: Sequence[str] | None = None) -> int:
    """Size a profile's evaluation from a per-example file and say what it costs."""
    ap = argparse.ArgumentParser(prog="python -m tailored.plan", description=main.__doc__)
    ap.add_argument("examples", type=Path, help="a per-example file (a pilot's, or an earlier run's examples.csv.gz)")
    ap.add_argument("--profile", default="study")
    ap.add_argument("--costs", type=Path, default=REPO_ROOT / "params" / "eval_costs.csv",
                    help="seconds per example per task (and k): task,prompt,k,seconds_per_example")
    ap.add_argument("--timing", type=Path, help="scripts/pilot_evaluation.py --timing's timing.csv: the ratios "
                    "of other prompts and k to the reference costs")
    ap.add_argument("--budget", type=float, help="minutes of evaluation the plan may take: the claim families' n "
                    "are scaled down together until it fits, and their half-widths grow as 1 / sqrt(n)")
    args = ap.parse_args(argv)
    params = profile_params(args.profile)
    models = profile_models(params)
    settings = PlanSettings.from_params(params["05_evaluate"])
    costs = combine_costs(pd.read_csv(args.costs, comment="#"),
                          pd.read_csv(args.timing) if args.timing else None)
    available = {t: data.splits(t).get(data.TASKS[t].eval_split, 0) for t in data.TASKS if data.TASKS[t].eval_split}
    examples, _ = read_examples(args.examples)
    plan = evaluation_plan(models, settings)
    sizes, measured = size_families(examples, models, plan, costs, settings.claims, available)
    proposed = PlanSettings(**{**settings.__dict__, "claim_n": {f: dict(zip(g["task"], g["n"].astype(int)))
                                                                for f, g in sizes.groupby("family", sort=False)}})
    now, then = plan_cost(plan, costs, available), plan_cost(evaluation_plan(models, proposed), costs, available)
    pd.set_option("display.width", 200)
    print("seconds per example (2 cores):\n", costs.round(3).to_string())
    print("variance of the paired difference per example (fraction²), measured:\n", measured.round(4).to_string())
    print("\nproposed examples per deciding task (half-width", settings.claims.half_width, "points):\n",
          sizes.round(4).to_string())
    print("\nclaim_n:", yaml.safe_dump(proposed.claim_n, default_flow_style=True, sort_keys=False).strip())
    per_record = args.examples.stat().st_size / max(1, len(examples))  # compressed bytes per record, as measured
    for name, cost in (("the profile's plan", now), ("the proposed plan", then)):
        by = cost.groupby("families")["seconds"].sum().div(60).round(1)
        records = int(cost.loc[cost["task"] != "wikitext", "examples"].sum())
        print(f"\n{name}: {cost['seconds'].sum() / 60:.1f} min of evaluation at these costs "
              f"({cost['seconds'].isna().sum()} evaluations not priced); {records:,} per-example records, about "
              f"{records * per_record / 1e6:.1f} MB compressed; by families:\n{by.to_string()}")
    if args.budget:
        factor, fitted = fit_budget(models, proposed, costs, available, 60 * args.budget)
        print(f"\nwithin {args.budget:g} min: every claim family at {factor:.2f} of the proposed n (half-widths "
              f"about {proposed.claims.half_width / math.sqrt(factor):.1f} points), {fitted / 60:.1f} min; claim_n:",
              yaml.safe_dump(scaled(proposed, factor).claim_n, default_flow_style=True, sort_keys=False).strip())
    return 0


def scaled(p: PlanSettings, factor: float, minimum: int = 50) -> PlanSettings:
    """``p`` with every family's n times ``factor`` (at least ``minimum``)."""
    claim_n = {f: {t: max(minimum, int(n * factor)) for t, n in v.items()} for f, v in p.claim_n.items()}
    return PlanSettings(**{**p.__dict__, "claim_n": claim_n})


def fit_budget(models: pd.DataFrame, p: PlanSettings, costs: pd.DataFrame, available: Mapping[str, int],
               seconds: float) -> tuple[float, float]:
    """The largest factor (to 1%) by which the claim families' n can be scaled so the plan takes ``seconds``,
    and what it then takes (bisection: the cost grows with the factor)."""
    def total(f):
        return float(plan_cost(evaluation_plan(models, scaled(p, f)), costs, available)["seconds"].sum())

    lo, hi = 0.0, 1.0
    if total(hi) <= seconds:
        return 1.0, total(hi)
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) <= seconds else (lo, mid)
    return lo, total(lo)


if __name__ == "__main__":
    raise SystemExit(main())
