"""Metrics of the study: accuracy from log-likelihoods, SQuAD exact match and F1, ROUGE, intervals.

All metrics are fractions in [0, 1] (SQuAD's official script multiplies by 100). Standard errors and
intervals follow lm-evaluation-harness (``std(ddof=1) / sqrt(n)``, normal approximation).
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from tailored.prompts import ExampleLike

Z95 = 1.959963984540054  # two-sided 95% normal quantile
ACCURACY_METRICS = ("acc", "acc_norm")


# =========================================================================================== choices
def choice_predictions(lls: Sequence[float], choice_texts: Sequence[str]) -> tuple[int, int]:
    """``(pred, pred_norm)``: argmax of the log-likelihoods, and of log-likelihood per UTF-8 byte of the answer.

    The harness divides by ``len(answer)``; bytes equal characters for ASCII answers and make the
    normalization independent of the script the answer is written in.
    """
    lls = np.asarray(lls, dtype=np.float64)
    n_bytes = np.array(choice_bytes(choice_texts), dtype=np.float64)
    return int(np.argmax(lls)), int(np.argmax(lls / n_bytes))


def choice_bytes(choice_texts: Sequence[str]) -> list[int]:
    """Each answer's length in UTF-8 bytes (at least 1): what ``acc_norm`` divides a log-likelihood by."""
    return [max(len(t.encode("utf-8")), 1) for t in choice_texts]


def gold_margin(lls: Sequence[float], gold: int, n_bytes: Sequence[int] | None = None) -> float:
    """How far the gold answer's score lies above the best wrong answer's: ``s_gold − max_{j≠gold} s_j``.

    ``s_j`` is the log-likelihood of answer j (nats), or per byte of the answer with ``n_bytes`` (nats per
    byte, as ``acc_norm`` scores). Positive: the model prefers the gold answer (it is right); the size says by
    how much, which 0/1 accuracy does not. ``nan`` for fewer than two answers.
    """
    s = np.asarray(lls, dtype=np.float64)
    if n_bytes is not None:
        s = s / np.asarray(n_bytes, dtype=np.float64)
    if len(s) < 2:
        return float("nan")
    return float(s[gold] - np.delete(s, gold).max())

# =========================================================================================== text metrics
def normalize_answer(text: str) -> str:
    """SQuAD's official normalization: lower case, drop punctuation and articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals a normalized reference, else 0.0."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token F1 (bag of normalized words), the best over the references."""
    return max(_f1(prediction, r) for r in references)


def rouge_scores(prediction: str, references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measure (Porter stemming, as in the XSum papers), the best over the references."""
    scorer = _rouge_scorer()
    best = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for ref in references:
        s = scorer.score(ref, prediction)
        best = {m: max(best[m], s[m].fmeasure) for m in best}
    return best


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)

# =========================================================================================== statistics
def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error, ``std(ddof=1) / sqrt(n)`` (the harness's stderr; 0 for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    return float(arr.mean()), se


def ci95(mean: float, stderr: float, low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
    """Normal-approximation 95% interval ``mean ± 1.96 stderr``, clipped to [low, high]."""
    return max(low, mean - Z95 * stderr), min(high, mean + Z95 * stderr)


def perplexity_interval(window_nll: Sequence[float], window_tokens: Sequence[int], n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """95% interval of a perplexity ``exp(Σ nll / Σ tokens)``, resampling its windows (percentile bootstrap): the
    ratio interval against a model that loses nothing on any window."""
    _, low, high = perplexity_ratio_interval(np.zeros(len(window_nll)), window_nll, window_tokens, n_boot, seed)
    return low, high


def perplexity_ratio_interval(base_nll: Sequence[float], other_nll: Sequence[float], window_tokens: Sequence[int],
                              n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``other``'s perplexity over ``base``'s on the same windows, with a paired 95% interval (both resampled
    with the same windows, percentile bootstrap): ``(ratio, low, high)``. An interval that holds 1 is a step
    these tokens cannot tell from none."""
    a, b = np.asarray(base_nll, dtype=float), np.asarray(other_nll, dtype=float)
    tokens = np.asarray(window_tokens, dtype=float)
    if a.shape != b.shape or a.shape != tokens.shape:
        raise ValueError(f"paired windows needed: {a.shape}, {b.shape} and {tokens.shape} windows")
    ratio = float(np.exp((b.sum() - a.sum()) / tokens.sum()))
    if len(a) < 2:
        return ratio, float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    boots = np.exp((b[idx].sum(1) - a[idx].sum(1)) / tokens[idx].sum(1))
    low, high = np.percentile(boots, [2.5, 97.5])
    return ratio, float(low), float(high)


def majority_baseline(train_examples: Sequence[ExampleLike],
                      examples: Sequence[ExampleLike]) -> tuple[int | None, float | None]:
    """The most frequent TRAIN label and the accuracy of always answering it on the evaluated examples."""
    labels = [ex.label for ex in train_examples if ex.label is not None]
    if not labels:
        return None, None
    label = Counter(labels).most_common(1)[0][0]
    return label, float(np.mean([ex.label == label for ex in examples]))


def not_above_chance(value: float, chance: float, stderr: float) -> bool:
    """True unless ``value`` is above ``chance`` by more than two standard errors: a model at chance, or below it
    (a prompt it answers the wrong way), has no accuracy that pruning could keep (the † of notebook 05)."""
    return bool(value - chance <= 2 * stderr)
