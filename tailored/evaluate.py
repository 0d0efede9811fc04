"""Evaluate models on tasks: one task with one prompt and k shots, or a grid of them, resumable.

The task driver of the study, standing on ``tailored.scoring`` (log-likelihoods, generation, perplexity,
few-shot prefixes) and ``tailored.metrics`` (accuracy, EM/F1, ROUGE, intervals):

- **multiple choice and classification**: every answer is scored by its log-likelihood after the context;
  ``acc`` takes the argmax, ``acc_norm`` the argmax per byte of the answer. Classification is multiple
  choice over verbalizers; WinoGrande uses partial scoring (one context per option, a shared continuation).
- **extractive QA** (SQuAD): greedy generation until a newline, exact match and token F1.
- **summarization** (XSum): greedy generation of one line, ROUGE-1/2/L.
- **perplexity** (the ``text`` task): sliding windows over held-out Wikipedia.

::

    result = evaluate_task(model, tokenizer, "arc_easy", prompt="task_specific", k=25, limit=200)
    result["metrics"]["acc"], result["ci95"]["acc"], result["chance"], result["majority"], result["k_used"]
    rows = evaluate_many({"dense": "smollm2-135m", "pruned": run_dir / "pruned/block_20"},
                         ["boolq", "sst2", "squad", "wikitext"], prompts=["harness", "task_specific"], ks=[0, 5])
    pandas.DataFrame(rows)           # one row per (model, task, prompt, k, metric)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from tailored import adapters, data, rundir
from tailored.metrics import (
    ACCURACY_METRICS,
    choice_bytes,
    choice_predictions,
    ci95,
    exact_match,
    f1_score,
    majority_baseline,
    mean_stderr,
    not_above_chance,
    perplexity_interval,
    rouge_scores,
)
from tailored.models import load
from tailored.prompts import ExampleLike, Prompt, get_prompt
from tailored.scoring import (
    FewShotPrefix,
    build_fewshot_prefix,
    greedy_generate,
    loglikelihood,
    perplexity,
    prefix_token_ids,
)
from tailored.tokens import encode, encode_request

SCORED_KINDS = ("multiple_choice", "classification", "extractive_qa", "summarization")
GENERATED_KINDS = ("extractive_qa", "summarization")
# what each example's record holds beside its metrics: scored answers (False), generated ones (True)
RECORD_FIELDS = {False: ("gold", "pred", "pred_norm", "loglikelihoods", "choice_bytes"), True: ("prediction",)}
RECORDS_VERSION = 2  # in every result key: results stored before the records held this evidence are redone


# =========================================================================================== one task
def task_info(task: str) -> data.TaskInfo:
    """The ``TaskInfo`` of a task; an unknown name raises ``ValueError`` listing the tasks."""
    if task not in data.TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(data.TASKS)}")
    return data.TASKS[task]


def _longest_request(tokenizer, prompt: Prompt, examples: Sequence[ExampleLike],
                     max_new_tokens: int) -> int:
    if prompt.scoring == "generate":
        return max(len(encode(tokenizer, prompt.render_context(ex))) for ex in examples) + max_new_tokens
    return max(sum(len(t) for t in encode_request(tokenizer, c, a)) for ex in examples for c, a in prompt.requests(ex))


def evaluate_examples(model: torch.nn.Module, tokenizer, prompt: Prompt, examples: Sequence[ExampleLike],
                      prefix: FewShotPrefix | str = "", batch_size: int = 16, use_prefix_cache: bool = True,
                      share_context: bool = True,
                      max_new_tokens: int | None = None, progress: bool = False,
                      details: bool = False, score_dtype: str = "float32",
                      batch_tokens: int | str | None = "auto") -> dict[str, Any]:
    """Score examples with a prompt and a shared prefix: per-example values and their means.

    Returns ``{"n", "metrics": {name: mean}, "stderr": {name: se}, "ci95": {name: (lo, hi)}, "per_example"}``
    and, with ``details``, ``"examples"``: one record per example (log-likelihoods and predictions, or
    generations). ``per_example`` holds one list per field, in example order: ``ids`` and each metric's value
    (what paired statistics between two models read), and the evidence behind them (``RECORD_FIELDS``): for
    scored answers ``gold``, ``pred``, ``pred_norm``, ``loglikelihoods`` (one list per example: every
    answer's log-likelihood, nats) and ``choice_bytes`` (each answer's length in bytes, what ``acc_norm``
    divides by); for generated ones the ``prediction`` text. From these alone accuracy and the gold answer's
    margin (``tailored.metrics.gold_margin``) can be recomputed. ``score_dtype`` and ``batch_tokens``: see
    ``scoring.score_token_requests`` (log-likelihood tasks; generation runs in the weights' dtype).
    """
    if not examples:
        raise ValueError(f"no examples to evaluate for task {prompt.task!r}")
    per_example: dict[str, list] = {m: [] for m in prompt.metrics}
    evidence: dict[str, list] = {f: [] for f in RECORD_FIELDS[prompt.scoring == "generate"]}
    records: list[dict[str, Any]] = []
    if prompt.scoring in ("choices", "partial"):
        requests = [prompt.requests(ex) for ex in examples]
        flat = [r for reqs in requests for r in reqs]
        starts = np.cumsum([0] + [len(reqs) for reqs in requests])
        lls = loglikelihood(model, tokenizer, flat, prefix=prefix, batch_size=batch_size,
                            use_prefix_cache=use_prefix_cache, share_context=share_context, progress=progress,
                            groups=[range(a, b) for a, b in zip(starts[:-1], starts[1:])],  # one row per example
                            batch_tokens=batch_tokens, score_dtype=score_dtype)
        at = 0
        for ex, reqs in zip(examples, requests):
            ex_lls = lls[at:at + len(reqs)]
            at += len(reqs)
            pred, pred_norm = choice_predictions(ex_lls, prompt.choice_texts(ex))
            gold = prompt.gold_index(ex)
            values = {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}
            for m in prompt.metrics:
                per_example[m].append(values[m])
            for field, value in (("gold", gold), ("pred", pred), ("pred_norm", pred_norm),
                                 ("loglikelihoods", [float(v) for v in ex_lls]),
                                 ("choice_bytes", choice_bytes(prompt.choice_texts(ex)))):
                evidence[field].append(value)
            if details:
                records.append({"id": ex.id, "label": gold, "pred": pred, "pred_norm": pred_norm,
                                "loglikelihoods": [float(v) for v in ex_lls]})
    else:
        budget = max_new_tokens or prompt.max_new_tokens
        max_ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        n_prefix = len(prefix_token_ids(tokenizer, prefix))
        outputs = greedy_generate(model, tokenizer, [prompt.render_context(ex) for ex in examples], prefix=prefix,
                                  max_new_tokens=budget, until=prompt.until, batch_size=batch_size,
                                  use_prefix_cache=use_prefix_cache, progress=progress,
                                  max_context_tokens=max(1, max_ctx - n_prefix - budget) if max_ctx else None)
        for ex, out in zip(examples, outputs):
            refs = list(ex.references)
            if not refs:
                raise ValueError(f"example {ex.id!r} of task {prompt.task!r} has no references to score against")
            values = {"exact_match": exact_match(out, refs), "f1": f1_score(out, refs)}
            if any(m.startswith("rouge") for m in prompt.metrics):
                values.update(rouge_scores(out, refs))
            for m in prompt.metrics:
                per_example[m].append(values[m])
            evidence["prediction"].append(out)
            if details:
                records.append({"id": ex.id, "prediction": out, "references": refs,
                                **{m: values[m] for m in prompt.metrics}})
    result: dict[str, Any] = {"n": len(examples), "metrics": {}, "stderr": {}, "ci95": {},
                              "per_example": {"ids": [ex.id for ex in examples], **per_example, **evidence}}
    for m, vals in per_example.items():
        mean, se = mean_stderr(vals)
        result["metrics"][m], result["stderr"][m], result["ci95"][m] = mean, se, ci95(mean, se)
    if details:
        result["examples"] = records
    return result




def evaluate_task(model: torch.nn.Module, tokenizer, task: str, prompt: str | Prompt = "task_specific", k: int = 0,
                  limit: int | None = None, seed: int = 0, batch_size: int = 16, use_prefix_cache: bool = True,
                  share_context: bool = True, progress: bool = True, max_new_tokens: int | None = None,
                  max_tokens: int | None = None,
                  max_length: int = 128, stride: int | None = None, ppl_tokens: int | None = None,
                  examples: Sequence[ExampleLike] | None = None,
                  train_examples: Sequence[ExampleLike] | None = None,
                  details: bool = False, score_dtype: str = "float32",
                  batch_tokens: int | str | None = "auto") -> dict[str, Any]:
    """Evaluate a model on one task with one prompt and k shots; a dict ready for ``metrics.json``.

    - ``task``: a name from ``tailored.data.TASKS``; a ``text`` task (WikiText) is scored by perplexity
      (windows of ``max_length`` every ``stride`` tokens over the first ``ppl_tokens`` tokens of the documents;
      ``limit`` = number of documents; ``examples`` may be a list of texts), with a 95% interval over windows,
      and ignores ``prompt`` and ``k``.
    - ``prompt``: ``"harness"``, ``"general"`` or ``"task_specific"`` (see ``prompts.yaml``), or a ``Prompt``.
    - ``k``: shots drawn by ``seed`` from the train split (never the evaluated examples), the same for all
      examples; dropped from the end if they do not fit ``max_tokens`` (default: the model's
      ``max_position_embeddings``); ``k_used`` says how many were used.
    - ``limit``: evaluate this many examples (``load_task(task, "eval", limit, seed)``); ``examples`` and
      ``train_examples`` may be passed instead, to reuse loaded data.
    - ``use_prefix_cache=False`` re-encodes the prefix for every request, ``share_context=False`` the context for
      every answer (same scores, slower).
    - ``max_new_tokens`` (generation; default the prompt's) and ``details`` (add per-example records under
      ``"examples"``: log-likelihoods and predictions, or generated answers).
    - ``score_dtype`` (``"float32"`` or ``"bfloat16"``) and ``batch_tokens``: how log-likelihoods are computed
      (``scoring.score_token_requests``); the result records ``score_dtype`` and the weights' ``dtype``.

    Returns ``task, kind, prompt, k, k_used, n, metrics, stderr, ci95`` (normal approximation), ``chance``
    and ``majority`` (accuracy of always answering the most frequent train label), ``near_chance``
    (the accuracy is within two standard errors of chance), ``prefix_tokens`` and ``seconds``.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit = {limit}: give a positive number of examples, or None for all")
    info = task_info(task)
    t0 = time.perf_counter()
    base = {"task": task, "kind": info.kind, "seed": seed, "limit": limit,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "score_dtype": score_dtype}
    if info.kind == "text":
        texts = list(examples) if examples is not None else data.text_corpus("perplexity")
        texts = texts[:limit] if limit else texts
        ppl = perplexity(model, tokenizer, texts, max_length=max_length, stride=stride, batch_size=batch_size,
                         progress=progress, max_tokens=ppl_tokens)
        interval = perplexity_interval(ppl["window_nll"], ppl["window_tokens"], seed=seed)
        windows = {"ids": [str(i) for i in range(len(ppl["window_nll"]))], "nll": list(ppl["window_nll"]),
                   "tokens": list(ppl["window_tokens"])}  # per window: what the perplexity is recomputed from
        return {**base, "prompt": None, "k": 0, "k_used": 0, "n": len(texts), "n_tokens": ppl["n_tokens"],
                "per_example": windows,
                "metrics": {"perplexity": ppl["perplexity"], "nll": ppl["nll"]}, "stderr": {},
                "ci95": {"perplexity": interval}, "max_length": ppl["max_length"], "stride": ppl["stride"],
                "chance": None, "majority": None, "near_chance": None, "seconds": time.perf_counter() - t0}
    if info.kind not in ("multiple_choice", "classification", "extractive_qa", "summarization"):
        raise ValueError(f"task {task!r} is {info.kind!r} data (for training), not an evaluation task")
    p = prompt if isinstance(prompt, Prompt) else get_prompt(task, prompt)
    if k < 0:
        raise ValueError(f"k = {k} shots: the number of few-shot examples must be >= 0")
    if examples is None:
        examples = data.load_task(task, split="eval", limit=limit, seed=seed)
    elif limit is not None:
        examples = list(examples)[:limit]
    if train_examples is None:  # a task without a train split is scored zero-shot only: load_task refuses k > 0
        zero_shot_only = k == 0 and "train" not in data.splits(task)
        train_examples = [] if zero_shot_only else data.load_task(task, split="train")
    budget = max_new_tokens or p.max_new_tokens
    max_tokens = max_tokens or getattr(model.config, "max_position_embeddings", None)
    longest = _longest_request(tokenizer, p, examples, budget)
    prefix = build_fewshot_prefix(task, p, k, train_examples, seed, tokenizer, max_tokens=max_tokens,
                                  longest_request=longest, exclude_ids=[ex.id for ex in examples])
    scored = evaluate_examples(model, tokenizer, p, examples, prefix=prefix, batch_size=batch_size,
                               use_prefix_cache=use_prefix_cache, share_context=share_context,
                               max_new_tokens=budget, progress=progress, details=details, score_dtype=score_dtype,
                               batch_tokens=batch_tokens)
    chance = majority = majority_label = near_chance = None
    if p.scoring != "generate":
        chance = info.chance if info.chance is not None else float(np.mean([1 / len(p.options(e)) for e in examples]))
        majority_label, majority = majority_baseline(train_examples, examples)
        near_chance = not_above_chance(scored["metrics"]["acc"], chance, scored["stderr"]["acc"])
    return {**base, "prompt": p.name, "k": k, "k_used": prefix.k_used, "shot_ids": list(prefix.shot_ids),
            **scored, "chance": chance, "majority": majority, "majority_label": majority_label,
            "near_chance": near_chance, "prefix_tokens": prefix.n_tokens, "use_prefix_cache": use_prefix_cache,
            "seconds": time.perf_counter() - t0}


def result_rows(result: Mapping[str, Any], model: str) -> list[dict[str, Any]]:
    """Flatten one ``evaluate_task`` result into long rows, one per metric (for pandas and metrics.json).

    Columns: model, task, kind, prompt, k, k_used, n, metric, value, stderr, ci_low, ci_high, chance,
    majority, near_chance, seconds.
    """
    rows = []
    for metric, value in result["metrics"].items():
        low, high = result["ci95"].get(metric, (None, None))
        near = None
        if metric in ACCURACY_METRICS and result.get("chance") is not None and metric in result["stderr"]:
            near = not_above_chance(value, result["chance"], result["stderr"][metric])
        rows.append({"model": model, "task": result["task"], "kind": result["kind"], "prompt": result["prompt"],
                     "k": result["k"], "k_used": result["k_used"], "n": result["n"], "metric": metric,
                     "value": value, "stderr": result["stderr"].get(metric), "ci_low": low, "ci_high": high,
                     "chance": result.get("chance"), "majority": result.get("majority"), "near_chance": near,
                     "seconds": result["seconds"]})
    return rows


# =========================================================================================== many
@dataclass(frozen=True)
class EvalJob:
    """One evaluation of one model: ``task`` with ``prompt`` and ``k`` shots (``prompt=None`` for perplexity), on
    the first ``limit`` of the task's evaluated examples (``None``: all of them; the same first ones for every
    model, so evaluations stay paired)."""

    task: str
    prompt: str | None = "task_specific"
    k: int = 0
    limit: int | None = None

    @property
    def label(self) -> str:
        n = f" n={self.limit}" if self.limit else ""
        return f"{self.task} {self.prompt or ''} k={self.k}{n}".replace("  ", " ")


class ResultStore(Protocol):
    """Where finished results are kept, so an interrupted evaluation resumes (``tailored.rundir.EvalStore``)."""

    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, result: dict) -> None: ...


def result_key(model_id: str, job: EvalJob, examples: Sequence[Any], seed: int, settings: Mapping[str, Any]) -> str:
    """What a result depends on, hashed: the model, the task, the prompt's *text*, k, the seed, the evaluated
    examples and the scoring settings. A result stored under the same key is the same result."""
    prompt = asdict(get_prompt(job.task, job.prompt)) if job.prompt else None
    ids = [getattr(e, "id", None) or hashlib.sha256(str(e).encode()).hexdigest()[:12] for e in examples]
    blob = json.dumps({"model": model_id, "job": asdict(job), "prompt": prompt, "seed": seed, "examples": ids,
                       "settings": dict(settings), "records": RECORDS_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def evaluate_jobs(model: torch.nn.Module, tokenizer, jobs: Sequence[EvalJob],
                  examples: Callable[[str], tuple[Sequence[Any], Sequence[Any] | None]], seed: int = 0,
                  store: ResultStore | None = None, model_id: str = "", progress: bool = True, desc: str = "",
                  **task_kwargs: Any) -> list[dict[str, Any]]:
    """Run ``jobs`` on one loaded model; one ``evaluate_task`` result per job, in order.

    ``examples(task)`` gives ``(evaluated examples, train examples)`` (train ``None`` for a text task), so
    every model is scored on the same examples. With a ``store`` and a ``model_id`` (what identifies the
    weights, e.g. a hash of the checkpoint and adapter files), each finished result is stored as soon as it is
    done and found again on a rerun under the same key (``result_key``): an interrupted evaluation resumes
    where it stopped, and a changed model, prompt or example set is evaluated afresh.
    """
    out = []
    for job in tqdm(jobs, desc=desc or "evaluate", disable=not progress, leave=False):
        evaluated, train = examples(job.task)
        if job.limit is not None:
            evaluated = evaluated[: job.limit]
        settings = {k: v for k, v in task_kwargs.items() if k != "score_dtype"} | _precision(model, task_kwargs)
        key = result_key(model_id, job, evaluated, seed, settings) if store is not None and model_id else None
        result = store.get(key) if key else None
        if result is None:
            result = evaluate_task(model, tokenizer, job.task, prompt=job.prompt or "task_specific", k=job.k,
                                   seed=seed, progress=False, examples=evaluated, train_examples=train, **task_kwargs)
            if key:
                store.put(key, result)
        out.append(result)
    return out


def _precision(model: torch.nn.Module, task_kwargs: Mapping[str, Any]) -> dict[str, str]:
    """The weights' dtype and ``score_dtype`` for a result's key, so that an evaluation stored in one precision is
    never reused for another; empty for float32 weights scored in float32 (keys stored before this was recorded)."""
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    scored = task_kwargs.get("score_dtype", "float32")
    return {} if (weights, scored) == ("float32", "float32") else {"weights_dtype": weights, "score_dtype": scored}


def grid(tasks: Sequence[str], prompts: Sequence[str] = ("task_specific",), ks: Sequence[int] = (0,)) -> list[EvalJob]:
    """Every (task, prompt, k); a text task once (prompt and k do not apply)."""
    for task in tasks:
        if task_info(task).kind != "text":
            for name in prompts:
                get_prompt(task, name)  # fail before any model runs
    return [job for task in tasks for job in
            ([EvalJob(task, None, 0)] if task_info(task).kind == "text" else
             [EvalJob(task, p, k) for p in prompts for k in ks])]


def load_examples(tasks: Sequence[str], limit: int | None = None, seed: int = 0,
                  limits: Mapping[str, int | None] | None = None) -> dict[str, tuple[list, list | None]]:
    """``{task: (evaluated examples, train examples)}``, each task's data loaded once for every model.

    ``limit`` examples per task (``limits[task]`` overrides it): a seeded subset of the evaluation split,
    the same for every model; for a text task, that many perplexity documents. A task without a train split
    gets ``None`` for it (zero-shot only).
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit = {limit}: give a positive number of examples, or None for all")
    out: dict[str, tuple[list, list | None]] = {}
    for task in tasks:
        n = (limits or {}).get(task, limit)
        if task_info(task).kind == "text":
            texts = data.text_corpus("perplexity")
            out[task] = (texts[:n] if n else texts, None)
        else:
            out[task] = (data.load_task(task, split="eval", limit=n, seed=seed),
                         data.load_task(task, split="train") if "train" in data.splits(task) else None)
    return out


def evaluate_many(models: Mapping[str, str | Path | tuple[torch.nn.Module, Any]], tasks: Sequence[str],
                  prompts: Sequence[str] = ("task_specific",), ks: Sequence[int] = (0,), limit: int | None = None,
                  seed: int = 0, progress: bool = True, device: str = "cpu", dtype: str = "float32",
                  **task_kwargs: Any) -> list[dict[str, Any]]:
    """Evaluate every model on every (task, prompt, k): long rows (see ``result_rows``).

    ``models`` maps a display name to a loaded ``(model, tokenizer)`` or to a spec for
    ``tailored.models.load`` (``"smollm2-135m"``, a pruned checkpoint folder…), which is loaded on ``device``
    and released after its tasks. Each task's data is loaded once and shared by all models, prompts and ks.
    A ``text`` task is evaluated once per model (prompt and k do not apply). Extra keyword arguments go to
    ``evaluate_task``.

    >>> rows = evaluate_many({"dense": "smollm2-135m"}, ["sst2", "boolq"], ks=[0, 5], limit=100)
    >>> pandas.DataFrame(rows).pivot_table(index=["task", "k"], columns="model", values="value")
    """
    jobs = grid(tasks, prompts, ks)
    loaded = load_examples(tasks, limit, seed)
    rows: list[dict[str, Any]] = []
    for name, spec in tqdm(models.items(), desc="evaluate", disable=not progress):
        model, tokenizer = spec if isinstance(spec, tuple) else load(str(spec), device=device, dtype=dtype)
        for result in evaluate_jobs(model, tokenizer, jobs, loaded.__getitem__, seed=seed, progress=progress,
                                    desc=name, **task_kwargs):
            rows.extend(result_rows(result, name))
        del model
    return rows


# =========================================================================================== a run's models
def load_run_model(entry: rundir.RunModel, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                   device_map: str | dict | None = None):
    """``(model, tokenizer)`` of a ``RunModel``; a LoRA adapter is loaded onto its base and merged in.

    ``device_map`` spreads a model that does not fit one device over several (``tailored.models.load``).
    """
    model, tokenizer = load(entry.spec, device=device, dtype=dtype, seed=seed, device_map=device_map)
    if entry.kind == "lora":
        model = adapters.merge(adapters.load_adapter(model, entry.adapter))
        model.eval()
    return model, tokenizer


def evaluation_jobs(cells: Iterable[Mapping[str, Any]], model: str) -> list[EvalJob]:
    """What notebook 05 evaluates on one model: its cells of the evaluation plan (``tailored.plan.cells``
    records: ``model, task, prompt, k, n``), in plan order (the headline first), each on the first ``n`` of
    its task's examples (``None``: all of them)."""
    return [EvalJob(c["task"], c["prompt"], int(c["k"]), None if c["n"] is None or c["n"] != c["n"] else int(c["n"]))
            for c in cells if c["model"] == model]  # n != n: a NaN, pandas' None
