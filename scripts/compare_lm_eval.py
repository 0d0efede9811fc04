"""Does ``tailored.evaluate`` score like lm-evaluation-harness? Zero-shot PIQA and ARC-Easy, same examples, both.

    pip install lm-eval==0.4.13                      # not a dependency of tailored: this check only
    python scripts/compare_lm_eval.py --n 500        # SmolLM2-135M, 500 examples per task, CPU
    python scripts/compare_lm_eval.py --n 0          # the full splits (PIQA 1838, ARC-Easy 2376)

Offline, like the rest of the study: our normalized examples are written back in the harness's raw schema
(PIQA: goal, sol1, sol2, label; ARC: question, choices {text, label}, answerKey) to local JSON files, and a
task config is written for each that copies the harness's own ``doc_to_text``, ``doc_to_choice``,
``doc_to_target`` and metrics from its installed YAML (``lm_eval/tasks/piqa/piqa.yaml``,
``lm_eval/tasks/arc/arc_easy.yaml``) and only points ``dataset_path: json`` at the local file. The harness
scores the already-loaded model through its ``HFLM`` wrapper; ``evaluate_task(..., prompt="harness", k=0)``
scores the same examples. The script prints acc and acc_norm of both, their difference in points, how many
examples got a different prediction, and the largest log-likelihood difference between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from tailored import data  # noqa: E402
from tailored.evaluate import evaluate_task  # noqa: E402
from tailored.models import load  # noqa: E402

HARNESS_YAML = {"piqa": ("piqa", "piqa.yaml"), "arc_easy": ("arc", "arc_easy.yaml"),
                "arc_challenge": ("arc", "arc_challenge.yaml")}
COPIED_KEYS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter",
               "fewshot_delimiter", "metric_list")


def raw_doc(task: str, ex) -> dict:
    """An ``Example`` back in the harness dataset's own columns."""
    if task == "piqa":
        return {"goal": ex.fields["goal"], "sol1": ex.choices[0], "sol2": ex.choices[1], "label": ex.label}
    letters = [chr(ord("A") + i) for i in range(len(ex.choices))]
    return {"question": ex.fields["question"], "choices": {"text": list(ex.choices), "label": letters},
            "answerKey": letters[ex.label]}


def write_task(task: str, examples, folder: Path) -> str:
    """Write the examples as JSONL and a task YAML that reuses the harness's prompt; return the task name."""
    import lm_eval

    subdir, name = HARNESS_YAML[task]
    harness = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / subdir / name).read_text())
    docs = folder / f"{task}.jsonl"
    docs.write_text("".join(json.dumps(raw_doc(task, ex)) + "\n" for ex in examples))
    config = {"task": f"tailored_{task}", "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {"test": str(docs)}},
              "training_split": None, "validation_split": None, "test_split": "test",
              **{k: harness[k] for k in COPIED_KEYS if k in harness}, "metadata": {"version": 1.0}}
    (folder / f"tailored_{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return config["task"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["piqa", "arc_easy"], choices=sorted(HARNESS_YAML))
    parser.add_argument("--n", type=int, default=500, help="examples per task (seeded subset); 0 = the full split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tokenizer = load(args.model, device=args.device)
    report = {"model": args.model, "n": args.n or None, "seed": args.seed, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ours, names = {}, {}
        for task in args.tasks:
            examples = data.load_task(task, "eval", limit=args.n or None, seed=args.seed)
            names[task] = write_task(task, examples, Path(tmp))
            t0 = time.perf_counter()
            ours[task] = evaluate_task(model, tokenizer, task, prompt="harness", k=0, examples=examples,
                                       batch_size=args.batch_size, details=True, progress=True)
            ours[task]["wall"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device=args.device)
        out = simple_evaluate(model=lm, tasks=list(names.values()), num_fewshot=0,
                              task_manager=TaskManager(include_path=tmp), bootstrap_iters=0, log_samples=True)
        t_harness = time.perf_counter() - t0

    for task, name in names.items():
        mine_all, res = ours[task], out["results"][name]
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        harness_lls = [np.array([r[0] for r in s["filtered_resps"]], dtype=float) for s in samples]
        ours_lls = [np.array(r["loglikelihoods"]) for r in mine_all["examples"]]
        max_ll = max(float(np.abs(a - b).max()) for a, b in zip(harness_lls, ours_lls))
        row = {"n": mine_all["n"], "seconds_tailored": mine_all["wall"], "seconds_lm_eval_all_tasks": t_harness,
               "max_abs_loglikelihood_diff": max_ll}
        for metric in ("acc", "acc_norm"):
            theirs = [float(s[metric]) for s in samples]
            mine = [float(r["pred" if metric == "acc" else "pred_norm"] == r["label"]) for r in mine_all["examples"]]
            row[metric] = {"tailored": mine_all["metrics"][metric], "lm_eval": res[f"{metric},none"],
                           "diff_points": 100 * (mine_all["metrics"][metric] - res[f"{metric},none"]),
                           "examples_differing": int(sum(a != b for a, b in zip(mine, theirs)))}
        report["tasks"][task] = row
        print(f"\n{task}: {row['n']} examples, zero-shot, harness prompt; largest log-likelihood difference "
              f"{max_ll:.2e} nats (tailored {mine_all['wall']:.0f} s; lm-eval, all tasks, {t_harness:.0f} s)")
        for metric in ("acc", "acc_norm"):
            m = row[metric]
            print(f"  {metric:8s} tailored {100 * m['tailored']:6.2f}   lm-eval {100 * m['lm_eval']:6.2f}   "
                  f"difference {m['diff_points']:+.2f} points   ({m['examples_differing']} examples differ)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
