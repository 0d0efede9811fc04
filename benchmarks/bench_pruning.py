"""Which pruning keeps more? Held-out perplexity of SmolLM2-135M pruned by each method, before any training.

    python benchmarks/bench_pruning.py                       # everything (about 3 h on 1 busy CPU thread)
    python benchmarks/bench_pruning.py --quick               # 0.2 and 0.5, the main methods, no sweep
    python benchmarks/bench_pruning.py --only sweep          # the calibration sweep alone
    python benchmarks/bench_pruning.py --only curve --shares 0.2,0.5 --fresh \
        --methods fisher_bias,fisher_bias_round64,fisher_bias_round128 --out benchmarks/results/alignment_cpu.json
                                                             # what kept widths in multiples of 64 / 128 cost

Protocol (the same for every model): ``tailored.scoring.perplexity(model, tok, [text], max_length=128,
stride=128)`` on the first ``--ppl-tokens`` tokens (default 20,480: 160 disjoint windows of 128) of the
held-out Wikipedia articles (``tailored.data.text_corpus("perplexity")``, joined by blank lines), decoded
back to text once. Every method prunes the same dense model with the same calibration batch (``--calibration``,
Wikipedia training articles, seed 0) unless its name says otherwise (``name@NxL``: N windows of L tokens).

Sections:

- *curve*: each method in ``--methods`` at each share in ``--shares`` of the decoder's parameters:
  perplexity, × dense, and × random (random's perplexity over the method's at the same share: how many
  times better than chance). Depth pruning removes whole layers (3.3% of the decoder each), so at 0.35 it
  lands on 33.3% or 36.7% and its row says so.
- *sweep*: calibration size (windows × tokens) and source (Wikipedia, or the tasks' own training data
  written with their prompts, ``recovery_data.calibration_texts``): Spearman correlation of the unit scores of each
  estimator in ``--sweep-estimators`` between successive sizes (over all attention and MLP units), and the
  perplexity after pruning ``--sweep-share`` with the method ``--sweep-method`` calibrated on each.

Rows are appended to ``--out`` (JSON) as they finish; a rerun with the same settings skips the rows it has.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tailored import data, scoring  # noqa: E402
from tailored.anatomy import count_parameters, decoder_layers, decoder_parameters  # noqa: E402
from tailored.graph import trace  # noqa: E402
from tailored.importance import (  # noqa: E402
    READER_ESTIMATORS,
    activation_statistics,
    calibration_batch,
    compute_importance,
    spearman,
)
from tailored.models import load  # noqa: E402
from tailored.recipes import METHODS, prune_model  # noqa: E402
from tailored.recovery_data import calibration_texts  # noqa: E402

DEFAULT_METHODS = [  # the most telling first, so that a partial run already answers the question
    "random", "param_first@10x128", "fisher_refit", "fisher_bias", "flap", "flap_no_bias", "param_first",
    "param_second", "fluctuation_local_bias", "fisher_bias_local", "depth_block_influence",
    "param_first_4_rounds", "param_first_8_rounds", "fisher_refit_4_rounds", "depth_block_influence_iterative",
]
QUICK_METHODS = ["random", "param_first@10x128", "param_first", "param_second", "flap", "fisher_bias",
                 "fisher_refit"]
ONLY_SOME_SHARES = {  # expensive methods: the shares the issue asks about (1 vs 4 vs 8 rounds at 20% / 50%)
    "param_first_4_rounds": (0.2, 0.5), "param_first_8_rounds": (0.2, 0.5), "fisher_refit_4_rounds": (0.2, 0.5),
    "depth_block_influence_iterative": (0.2, 0.5),
}
SWEEP_SIZES = [(10, 128), (32, 128), (32, 256), (64, 256), (64, 512), (128, 512)]
TASK_SWEEP_SIZES = [(10, 128), (32, 128), (32, 256), (64, 256)]  # the tasks' source: the sizes that matter
SWEEP_TASKS = ["piqa", "arc_easy", "winogrande", "sst2"]  # the class profile's tailored tasks (params/class.yaml)


def parse_size(text: str) -> tuple[int, int]:
    n, _, length = text.lower().partition("x")
    return int(n), int(length)


def split_name(name: str, default: tuple[int, int]) -> tuple[str, tuple[int, int]]:
    """``"param_first@10x128"`` -> ("param_first", (10, 128)); no ``@``: the default calibration."""
    method, _, size = name.partition("@")
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; tailored.methods.METHODS has {list(METHODS)}")
    return method, parse_size(size) if size else default


def held_out_text(tokenizer, n_tokens: int) -> str:
    joined = "\n\n".join(data.text_corpus("perplexity"))
    ids = tokenizer(joined, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


class Results:
    """The JSON file, written after every row; rows already there (same settings) are skipped."""

    def __init__(self, path: Path, settings: dict, fresh: bool):
        self.path, self.settings = path, settings
        self.doc = {"settings": settings, "dense": None, "curve": [], "sweep": [], "sweep_correlation": []}
        if path.exists() and not fresh:
            old = json.loads(path.read_text())
            if old.get("settings", {}).get("protocol") == settings["protocol"]:
                self.doc.update({k: old.get(k, v) for k, v in self.doc.items() if k != "settings"})

    def has(self, section: str, **key) -> dict | None:
        return next((r for r in self.doc[section] if all(r.get(k) == v for k, v in key.items())), None)

    def add(self, section: str, row: dict) -> None:
        self.doc[section].append(row)
        self.save()

    def save(self) -> None:
        self.doc["settings"] = self.settings | {"updated": datetime.datetime.now().isoformat(timespec="seconds")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.doc, indent=1) + "\n")


def run_curve(args, res: Results, dense, tok, text: str, batches: dict) -> None:
    dense_ppl = res.doc["dense"]["perplexity"]
    for name in args.methods:
        method, size = split_name(name, args.calibration)
        for share in args.shares:
            if name in ONLY_SOME_SHARES and share not in ONLY_SOME_SHARES[name] and not args.all_shares:
                continue
            if res.has("curve", method=name, target=share):
                continue
            batch = batches.setdefault(("wikipedia",) + size, make_batch(tok, "wikipedia", size))
            t0 = time.perf_counter()
            try:
                pruned = prune_model(copy.deepcopy(dense), batch, share, METHODS[method], progress=False)
            except ValueError as e:  # e.g. a share out of a layer range's reach: say so in the table
                res.add("curve", {"method": name, "target": share, "error": str(e)})
                print(f"{name:34s} {share:.2f}  cannot: {e}", flush=True)
                continue
            t1 = time.perf_counter()
            ppl = scoring.perplexity(pruned.model, tok, [text], max_length=128, stride=128)
            t2 = time.perf_counter()
            row = {"method": name, "target": share, "calibration": list(size), "share_decoder": pruned.share_decoder,
                   "share_model": pruned.share_model, "within_1pt": abs(pruned.share_decoder - share) <= 0.01,
                   "params": count_parameters(pruned.model), "perplexity": ppl["perplexity"],
                   "x_dense": ppl["perplexity"] / dense_ppl, "prune_s": round(t1 - t0, 1),
                   "ppl_s": round(t2 - t1, 1), "definition": METHODS[method].to_dict(),
                   "mlp_widths": [layer.mlp.gate_proj.out_features for layer in decoder_layers(pruned.model)]}
            res.add("curve", row)
            print(f"{name:34s} {share:.2f} share {pruned.share_decoder:.3f}  ppl {row['perplexity']:9.2f}  "
                  f"x{row['x_dense']:7.2f}  ({row['prune_s']:.0f} s + {row['ppl_s']:.0f} s)", flush=True)
            del pruned
    for row in res.doc["curve"]:  # × random: how many times lower than chance at the same share
        floor = res.has("curve", method="random", target=row["target"])
        if floor and "perplexity" in row and "perplexity" in floor:
            row["x_random"] = floor["perplexity"] / row["perplexity"]
    res.save()


def make_batch(tok, source: str, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """N windows of L tokens: of the Wikipedia calibration articles, or of the tasks' training data."""
    n, length = size
    texts = data.text_corpus("calibration") if source == "wikipedia" else calibration_texts(SWEEP_TASKS)
    per_text = 1 if source == "wikipedia" and n <= 48 else 8
    return calibration_batch(tok, texts, n_samples=n, seq_len=length, seed=seed, per_text=per_text)


def run_sweep(args, res: Results, dense, tok, text: str, batches: dict) -> None:
    """Unit scores at every calibration size and source; correlation between successive sizes; perplexity."""
    graph = trace(dense)
    kinds = ("attention", "mlp")
    dense_ppl = res.doc["dense"]["perplexity"]
    for source in args.sweep_sources:
        previous: dict[str, torch.Tensor] = {}
        for size in args.sweep_sizes if source == "wikipedia" else [s for s in args.sweep_sizes
                                                                     if s in TASK_SWEEP_SIZES]:
            batch = batches.setdefault((source,) + size, make_batch(tok, source, size))
            acts = None  # the Fisher pass is shared by the estimator's scores and the pruned model
            if "fisher_fluctuation" in args.sweep_estimators or args.sweep_method.startswith("fisher"):
                acts = activation_statistics(dense, graph, batch, kinds=kinds, gradients=True, progress=False)
            for est in args.sweep_estimators:
                t0 = time.perf_counter()
                imp = compute_importance(dense, graph, batch, estimators=(est,), kinds=kinds, progress=False,
                                         activations=acts if est in READER_ESTIMATORS else None)
                flat = torch.cat([imp.score(est, g.name) for g in graph.groups if g.kind in kinds])
                by_kind = {k: torch.cat([imp.score(est, g.name) for g in graph.groups if g.kind == k]) for k in kinds}
                if est in previous:
                    prev_size, prev_flat, prev_kind = previous[est]
                    row = {"source": source, "estimator": est, "from": list(prev_size), "to": list(size),
                           "spearman_all_units": spearman(prev_flat, flat),
                           **{f"spearman_{k}": spearman(prev_kind[k], by_kind[k]) for k in kinds},
                           "seconds": round(time.perf_counter() - t0, 1)}
                    if not res.has("sweep_correlation", source=source, estimator=est, to=list(size)):
                        res.add("sweep_correlation", row)
                        print(f"sweep {source:9s} {est:18s} {prev_size} -> {size}: spearman "
                              f"{row['spearman_all_units']:.4f} (attention {row['spearman_attention']:.3f}, "
                              f"mlp {row['spearman_mlp']:.4f})", flush=True)
                previous[est] = (size, flat, by_kind)
            if args.sweep_method and not res.has("sweep", source=source, size=list(size)):
                t0 = time.perf_counter()
                method = METHODS[args.sweep_method]
                pruned = prune_model(copy.deepcopy(dense), batch, args.sweep_share, method, progress=False,
                                     activations=acts if method.compensation != "refit" else None)
                ppl = scoring.perplexity(pruned.model, tok, [text], max_length=128, stride=128)["perplexity"]
                row = {"source": source, "size": list(size), "tokens": size[0] * size[1], "method": args.sweep_method,
                       "target": args.sweep_share, "perplexity": ppl, "x_dense": ppl / dense_ppl,
                       "seconds": round(time.perf_counter() - t0, 1)}
                res.add("sweep", row)
                print(f"sweep {source:9s} {args.sweep_method} @ {size}: ppl {ppl:.2f} x{ppl / dense_ppl:.2f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=None, help="comma-separated names of tailored.methods.METHODS (name@NxL "
                                                    "for another calibration size)")
    ap.add_argument("--shares", default="0.2,0.35,0.5")
    ap.add_argument("--all-shares", action="store_true", help="run the expensive methods at every share too")
    ap.add_argument("--calibration", default="32x256", help="windows x tokens of Wikipedia for every method")
    ap.add_argument("--ppl-tokens", type=int, default=20480)
    ap.add_argument("--sweep-sizes", default=",".join(f"{n}x{t}" for n, t in SWEEP_SIZES))
    ap.add_argument("--sweep-sources", default="wikipedia,tasks")
    ap.add_argument("--sweep-estimators", default="param_first,fisher_fluctuation")
    ap.add_argument("--sweep-method", default="fisher_bias", help="method pruned with each calibration ('' for none)")
    ap.add_argument("--sweep-share", type=float, default=0.2)
    ap.add_argument("--only", choices=("curve", "sweep"), default=None)
    ap.add_argument("--quick", action="store_true", help="shares 0.2 and 0.5, the main methods, no sweep")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in --out")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "pruning_cpu.json"))
    ap.add_argument("--table", action="store_true", help="print the table of what --out holds; compute nothing")
    args = ap.parse_args(argv)
    if args.table:
        print_table(json.loads(Path(args.out).read_text()))
        return 0

    torch.set_num_threads(args.threads)
    args.shares = [float(x) for x in args.shares.split(",")] if not args.quick else [0.2, 0.5]
    args.methods = args.methods.split(",") if args.methods else QUICK_METHODS if args.quick else DEFAULT_METHODS
    args.calibration = parse_size(args.calibration)
    args.sweep_sizes = [parse_size(x) for x in args.sweep_sizes.split(",")]
    args.sweep_sources = args.sweep_sources.split(",")
    args.sweep_estimators = args.sweep_estimators.split(",")
    for name in args.methods:
        split_name(name, args.calibration)

    dense, tok = load(args.model)
    text = held_out_text(tok, args.ppl_tokens)
    protocol = {"model": args.model, "ppl_tokens": args.ppl_tokens, "max_length": 128, "stride": 128,
                "calibration": list(args.calibration), "calibration_source": "wikipedia train articles, seed 0"}
    settings = {"protocol": protocol, "command": " ".join(["python", "benchmarks/bench_pruning.py", *(argv or sys.argv[1:])]),
                "threads": args.threads, "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "torch": torch.__version__}
    res = Results(Path(args.out), settings, args.fresh)
    started = time.perf_counter()
    if res.doc["dense"] is None:
        t0 = time.perf_counter()
        ppl = scoring.perplexity(dense, tok, [text], max_length=128, stride=128)
        res.doc["dense"] = {"perplexity": ppl["perplexity"], "n_tokens": ppl["n_tokens"], "params": count_parameters(dense),
                            "decoder_params": decoder_parameters(dense), "ppl_s": round(time.perf_counter() - t0, 1)}
        res.save()
    print(f"dense: perplexity {res.doc['dense']['perplexity']:.3f} on {res.doc['dense']['n_tokens']} tokens", flush=True)
    batches: dict = {}
    if args.only in (None, "curve"):
        run_curve(args, res, dense, tok, text, batches)
    if args.only in (None, "sweep") and not args.quick:
        run_sweep(args, res, dense, tok, text, batches)
    res.doc.setdefault("wall_s", {})[args.only or ("quick" if args.quick else "all")] = round(
        time.perf_counter() - started, 1)
    res.save()
    print_table(res.doc)
    return 0


def print_table(doc: dict) -> None:
    """The curve as a Markdown table: perplexity (× dense, × random) per method and share."""
    rows = [r for r in doc["curve"] if "perplexity" in r]
    shares = sorted({r["target"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    floor = {r["target"]: r["perplexity"] for r in rows if r["method"] == "random"}
    print(f"\ndense perplexity {doc['dense']['perplexity']:.2f} ({doc['dense']['n_tokens']} tokens)\n")
    print("| method | " + " | ".join(f"{s:.0%} of decoder" for s in shares) + " |")
    print("|---|" + "---|" * len(shares))
    for m in methods:
        cells = []
        for s in shares:
            r = next((r for r in rows if r["method"] == m and r["target"] == s), None)
            if r is None:
                cells.append("")
                continue
            mark = "" if r["within_1pt"] else f" (at {r['share_decoder']:.1%})"
            cells.append(f"{r['perplexity']:.1f} ({r['x_dense']:.2f}×, {floor.get(s, float('nan')) / r['perplexity']:.1f}× better "
                         f"than random){mark}")
        print(f"| {m} | " + " | ".join(cells) + " |")
    if doc.get("sweep_correlation"):
        print("\nCalibration sweep: Spearman correlation of the unit scores between successive calibration sizes "
              "(windows × tokens)\n")
        print("| source | estimator | from | to | all units | attention | MLP |")
        print("|---|---|---|---|---|---|---|")
        for r in doc["sweep_correlation"]:
            print(f"| {r['source']} | {r['estimator']} | {r['from'][0]}×{r['from'][1]} | {r['to'][0]}×{r['to'][1]} | "
                  f"{r['spearman_all_units']:.4f} | {r['spearman_attention']:.3f} | {r['spearman_mlp']:.4f} |")
    if doc.get("sweep"):
        print("\nCalibration sweep: perplexity after pruning with each calibration\n")
        print("| source | calibration | tokens | method | share | perplexity | × dense |")
        print("|---|---|---|---|---|---|---|")
        for r in doc["sweep"]:
            print(f"| {r['source']} | {r['size'][0]}×{r['size'][1]} | {r['tokens']} | {r['method']} | {r['target']:.0%} | "
                  f"{r['perplexity']:.1f} | {r['x_dense']:.2f}× |")


if __name__ == "__main__":
    raise SystemExit(main())
