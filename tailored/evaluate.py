"""Few-shot evaluation, with lm-evaluation-harness's conventions and a shared-prefix KV cache.

How a task is scored (Gao et al., lm-evaluation-harness):

- **multiple choice and classification**: each answer ``a_j`` is a continuation of the context ``c``;
  the model's score of the answer is its log-likelihood ``log p(a_j | c) = sum_t log p(a_j,t | c, a_j,<t)``.
  ``acc`` takes the argmax; ``acc_norm`` the argmax of ``log p(a_j | c) / bytes(a_j)``, so that long
  answers are not penalized for having more tokens. Classification is multiple choice over verbalizers.
- **WinoGrande** (partial scoring): one context per option (sentence up to the blank, option filled in),
  one shared continuation (the rest of the sentence); the option whose context makes the rest most
  likely wins.
- **extractive QA** (SQuAD): greedy generation until a newline, then exact match and token F1 after
  SQuAD's official answer normalization, the best over the reference answers.
- **summarization** (XSum): greedy generation of one line, ROUGE-1/2/L F-measure (``rouge-score``).
- **perplexity**: ``exp`` of the mean negative log-likelihood per token over a sliding window.

k-shot evaluation puts k solved training examples in front of every evaluated one. Here the same k shots
(drawn once by seed) serve every example of a task, so the model reads that prefix **once**: its keys and
values are cached and reused for every example and every answer, expanded along the batch. With k = 25
the ARC-Easy prefix is ~700 tokens and each request ~30, so this is where the speed comes from; the naive path
(``use_prefix_cache=False``) re-encodes the whole sequence per request and scores identical token ids.
The answers of one question share their context too: they are packed in one row, the context read once and
each answer attending to it and to itself only (``share_context``; see ``score_token_requests``).

Tokenization follows the harness: ``context`` and ``continuation`` are encoded as
``whole = enc(context + continuation)``, ``ctx = enc(context)``, ``cont = whole[len(ctx):]`` (trailing
spaces of the context move to the continuation). The few-shot prefix is encoded on its own and its ids are
concatenated in front (``prefix_ids + ctx + cont``) in *both* paths, which makes the prefix a token prefix of
every request. (The harness encodes ``prefix + context`` as one string; the two differ only in how the
``"\\n\\n"`` between them is split into tokens.)

All metrics are fractions in [0, 1] (SQuAD's official script multiplies by 100).

API at a glance::

    result = evaluate_task(model, tokenizer, "arc_easy", prompt="task_specific", k=25, limit=200)
    result["metrics"]["acc"], result["ci95"]["acc"], result["chance"], result["majority"], result["k_used"]
    rows = evaluate_many({"dense": "smollm2-135m", "pruned": run_dir / "pruned/p20"},
                         ["boolq", "sst2", "squad", "wikitext"], prompts=["harness", "task_specific"], ks=[0, 5])
    pandas.DataFrame(rows)           # one row per (model, task, prompt, k, metric)

    # the pieces underneath, for a closer look
    prefix = build_fewshot_prefix("sst2", "task_specific", 5, train, seed=0, tokenizer=tokenizer)
    loglikelihood(model, tokenizer, [(context, " positive"), (context, " negative")], prefix=prefix)
    greedy_generate(model, tokenizer, [context], prefix=prefix, max_new_tokens=32)
    perplexity(model, tokenizer, texts, max_length=128, stride=64)
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import re
import string
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tailored.prompts import ExampleLike, Prompt, get_prompt

Z95 = 1.959963984540054  # two-sided 95% normal quantile
ACCURACY_METRICS = ("acc", "acc_norm")


# =========================================================================================== tokens
def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (``[]`` for ``""``)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens a tokenizer puts in front of a text by default: LLaMA-1/2's BOS, none for SmolLM2.

    They start every sequence the evaluator scores (in front of the few-shot prefix), as they would in
    the model's training data.
    """
    full = list(tokenizer("a")["input_ids"])
    plain = encode(tokenizer, "a")
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Encode one ``(context, continuation)`` pair the way the harness does: ``(ctx_ids, cont_ids)``.

    ``cont_ids = enc(context + continuation)[len(enc(context)):]``, so the continuation's tokens are the
    ones the model would read after the context; trailing whitespace of the context moves to the
    continuation first (``"Answer: " + "yes"`` is scored as ``"Answer:" + " yes"``).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} adds no token after context ...{context[-40:]!r}")
    return ctx, cont


def prefix_token_ids(tokenizer, prefix: FewShotPrefix | str | Sequence[int] = "") -> list[int]:
    """The token ids in front of every request: a ``FewShotPrefix``'s, or leading specials + ``enc(prefix)``."""
    if isinstance(prefix, FewShotPrefix):
        return list(prefix.token_ids)
    if isinstance(prefix, str):
        return leading_special_ids(tokenizer) + encode(tokenizer, prefix)
    return list(prefix)


# =========================================================================================== few-shot
@dataclass(frozen=True)
class FewShotPrefix:
    """The solved shots put in front of every evaluated example of a task (one prefix per task).

    ``text`` is the shots joined by the prompt's ``fewshot_separator``, ending with it (``""`` for k = 0);
    ``token_ids`` = the tokenizer's leading special tokens + ``enc(text)``, a token prefix of every request.
    ``k_used`` may be below ``k_requested`` when the shots did not fit the context window.
    """

    task: str
    prompt: str
    k_requested: int
    k_used: int
    seed: int
    shot_ids: tuple[str, ...]
    text: str
    token_ids: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def build_fewshot_prefix(task: str, prompt: Prompt | str, k: int, train_examples: Sequence[ExampleLike], seed: int,
                         tokenizer, max_tokens: int | None = None, longest_request: int = 0,
                         exclude_ids: Sequence[str] = ()) -> FewShotPrefix:
    """Draw ``k`` shots from the TRAIN split, deterministically by ``seed``, and render the shared prefix.

    Rule when the shots do not fit: shots are dropped from the end (the last drawn first) until
    ``len(prefix tokens) + longest_request <= max_tokens``, where ``longest_request`` is the token length
    of the longest evaluated request (context + continuation, or context + max_new_tokens for generation);
    ``k_used`` records how many remain. Examples whose id is in ``exclude_ids`` (the evaluated ones) are
    never drawn.

    Raises ``ValueError`` when ``k`` is negative or larger than the train split.
    """
    prompt = prompt if isinstance(prompt, Prompt) else get_prompt(task, prompt)
    if k < 0:
        raise ValueError(f"k = {k} shots: the number of few-shot examples must be >= 0")
    excluded = set(exclude_ids)
    pool = [ex for ex in train_examples if ex.id not in excluded]
    if k > len(pool):
        raise ValueError(f"k = {k} shots asked for, but the train split of {task!r} has only {len(pool)} "
                         f"examples to draw from ({len(train_examples) - len(pool)} excluded as evaluated); "
                         f"use k <= {len(pool)}")
    shots = random.Random(seed).sample(pool, k)
    texts = [prompt.render_example(ex) for ex in shots]
    lead = leading_special_ids(tokenizer)

    def render(j: int) -> tuple[str, list[int]]:
        text = prompt.fewshot_separator.join(texts[:j]) + prompt.fewshot_separator if j else ""
        return text, lead + encode(tokenizer, text)

    used = k
    text, ids = render(used)
    while max_tokens is not None and used > 0 and len(ids) + longest_request > max_tokens:
        used -= 1
        text, ids = render(used)
    return FewShotPrefix(task=task, prompt=prompt.name, k_requested=k, k_used=used, seed=seed,
                         shot_ids=tuple(ex.id for ex in shots[:used]), text=text, token_ids=tuple(ids))


# =========================================================================================== model plumbing
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate with dropout off (LoRA adds some), then restore the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _encode_prefix(model: torch.nn.Module, ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the model once over the prefix and keep every layer's keys and values, each (1, kv_heads, P, head_dim)."""
    x = torch.tensor([list(ids)], device=_device(model))  # (1, P)
    out = model(input_ids=x, use_cache=True, logits_to_keep=1)
    # a layer whose attention was pruned away entirely holds no keys: it stays empty
    return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in out.past_key_values.layers]


def _cache_for_batch(prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None, batch: int):
    """A fresh ``DynamicCache`` holding the prefix for ``batch`` rows, (batch, kv_heads, P, head_dim) per layer.

    ``expand`` makes views; the cache's first update concatenates, so the shared prefix tensors are never
    written to and every batch starts from the same prefix.
    """
    if prefix_kv is None:
        return None
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(None, None) if k is None else
                                        (k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                        for k, v in prefix_kv])


def _split_prefix(model, prefix_ids: list[int], use_prefix_cache: bool):
    """How many prefix tokens go to the cache, and their keys/values.

    All prefix tokens but the last are cached; the last one starts every request, so that every request
    has at least one input token and the first continuation token is always predicted inside the batch.
    """
    cached = len(prefix_ids) - 1 if use_prefix_cache and len(prefix_ids) > 1 else 0
    return cached, (_encode_prefix(model, prefix_ids[:cached]) if cached else None)


def _batches(order: list[int], size: int) -> list[list[int]]:
    if size < 1:
        raise ValueError(f"batch_size = {size}: it must be a positive number of requests")
    return [order[i:i + size] for i in range(0, len(order), size)]


# =========================================================================================== log-likelihood
def _pack_rows(requests: Sequence[tuple[Sequence[int], Sequence[int]]], share_context: bool) -> list[list[int]]:
    """Request indices grouped into rows: one row per distinct context (or one per request)."""
    if not share_context:
        return [[i] for i in range(len(requests))]
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        rows.setdefault(tuple(ctx), []).append(i)
    return list(rows.values())


def score_token_requests(model: torch.nn.Module, prefix_ids: Sequence[int],
                         requests: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0,
                         batch_size: int = 16, use_prefix_cache: bool = True, share_context: bool = True,
                         progress: bool = False, desc: str = "log-likelihood") -> np.ndarray:
    """Log-likelihood of each continuation given prefix + context, in nats: (n_requests,) float64.

    ``requests`` are ``(ctx_ids, cont_ids)``; every scored sequence is ``prefix_ids + ctx_ids + cont_ids``.
    Two savings, each computing exactly what the plain forward pass over that sequence would:

    - ``use_prefix_cache``: the prefix shared by all requests (the few-shot examples) is encoded once and its
      KV cache expanded along the batch; positions continue from the cache length.
    - ``share_context``: the requests with the same context (the choices of one question) share one row: the
      context once, then every continuation's tokens, each continuation attending to the prefix, the context
      and itself only (a 4-D attention mask, positions restarting after the context). A 4-choice ARC question
      reads its context once instead of four times; a yes/no answer of one token adds no input token at all,
      since the context's last logit already predicts it.

    Rows are sorted longest first and batched with right padding.
    """
    prefix_ids = list(prefix_ids)
    scores = np.zeros(len(requests), dtype=np.float64)
    if not requests:
        return scores
    rows = _pack_rows(requests, share_context)
    dev = _device(model)
    dtype = next(model.parameters()).dtype  # of the additive attention mask
    with _eval_mode(model):
        cached, prefix_kv = _split_prefix(model, prefix_ids, use_prefix_cache)
        # each row's input: (prefix + ctx)[cached:] (the base), then cont[:-1] of each of its requests; the
        # last token of a continuation is only ever predicted, never read
        bases = [(prefix_ids + list(requests[row[0]][0]))[cached:] for row in rows]
        lengths = [len(b) + sum(len(requests[i][1]) - 1 for i in row) for b, row in zip(bases, rows)]
        order = sorted(range(len(rows)), key=lambda r: -lengths[r])
        for batch in tqdm(_batches(order, batch_size), desc=desc, disable=not progress, leave=False):
            width = max(lengths[r] for r in batch)
            x = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
            segment = torch.full((len(batch), width), -1, dtype=torch.long)  # 0 base, j + 1 continuation j
            position = torch.zeros((len(batch), width), dtype=torch.long)
            targets: list[tuple[int, int, list[int], Sequence[int]]] = []  # (request, row b, logit indices, ids)
            for b, r in enumerate(batch):
                n_base = len(bases[r])
                x[b, :n_base] = torch.tensor(bases[r])
                position[b, :n_base] = torch.arange(cached, cached + n_base)
                segment[b, :n_base] = 0
                at = n_base
                for j, i in enumerate(rows[r]):
                    cont = list(requests[i][1])
                    seg = cont[:-1]
                    x[b, at:at + len(seg)] = torch.tensor(seg, dtype=torch.long)
                    position[b, at:at + len(seg)] = torch.arange(cached + n_base, cached + n_base + len(seg))
                    segment[b, at:at + len(seg)] = j + 1
                    # the base's last logit predicts the first token; token m of the segment predicts m + 1
                    targets.append((i, b, [n_base - 1] + list(range(at, at + len(seg))), cont))
                    at += len(seg)
                position[b, at:] = torch.arange(width - at) + cached + n_base  # padding: any in-range position
            # a query sees the cached prefix, the base causally, and its own continuation causally; padding sees
            # the base and padding before it (so no row of the mask is empty)
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            allowed = causal & ((segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))
            allowed = torch.cat([torch.ones(len(batch), width, cached, dtype=torch.bool), allowed], dim=-1)
            mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
            keep = width - min(t[2][0] for t in targets)  # only the last `keep` positions need logits
            out = model(input_ids=x.to(dev), attention_mask=mask[:, None].to(dev), position_ids=position.to(dev),
                        past_key_values=_cache_for_batch(prefix_kv, len(batch)), use_cache=prefix_kv is not None,
                        logits_to_keep=keep)
            logits = out.logits  # (B, keep, vocab)
            offset = width - keep
            for i, b, idx, cont in targets:
                rows_logits = logits[b, [t - offset for t in idx]].float()  # (n_cont, vocab)
                logp = F.log_softmax(rows_logits, dim=-1)
                scores[i] = logp.gather(-1, torch.tensor(cont, device=logp.device)[:, None]).sum().item()
    return scores


def loglikelihood(model: torch.nn.Module, tokenizer, requests: Sequence[tuple[str, str]],
                  prefix: FewShotPrefix | str = "", batch_size: int = 16, use_prefix_cache: bool = True,
                  share_context: bool = True, progress: bool = False) -> np.ndarray:
    """``log p(continuation | prefix + context)`` for each ``(context, continuation)``: (n,) float64, nats."""
    encoded = [encode_request(tokenizer, c, a) for c, a in requests]
    return score_token_requests(model, prefix_token_ids(tokenizer, prefix), encoded, pad_id=_pad_id(tokenizer),
                                batch_size=batch_size, use_prefix_cache=use_prefix_cache,
                                share_context=share_context, progress=progress)


def choice_predictions(lls: Sequence[float], choice_texts: Sequence[str]) -> tuple[int, int]:
    """``(pred, pred_norm)``: argmax of the log-likelihoods, and of log-likelihood per UTF-8 byte of the answer.

    The harness divides by ``len(answer)``; bytes equal characters for ASCII answers and make the
    normalization independent of the script the answer is written in.
    """
    lls = np.asarray(lls, dtype=np.float64)
    n_bytes = np.array([max(len(t.encode("utf-8")), 1) for t in choice_texts], dtype=np.float64)
    return int(np.argmax(lls)), int(np.argmax(lls / n_bytes))


# =========================================================================================== generation
def greedy_generate(model: torch.nn.Module, tokenizer, contexts: Sequence[str],
                    prefix: FewShotPrefix | str = "", max_new_tokens: int = 32, until: Sequence[str] = ("\n",),
                    batch_size: int = 8, use_prefix_cache: bool = True, progress: bool = False,
                    max_context_tokens: int | None = None) -> list[str]:
    """Greedy continuation of ``prefix + context`` for each context, cut at the first stop string: (n,) strings.

    Leading whitespace of the continuation is skipped before the stop strings apply, so a model that starts
    its answer on a new line after ``"Answer:"`` is not cut to an empty answer (the harness would be).
    Contexts are left-padded *after* the cached prefix, so the attention mask hides the padding and
    ``position_ids`` skip it: row b's first real token sits at position ``len(prefix)``. A context longer than
    ``max_context_tokens`` keeps its last tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: generate at least one token")
    prefix_ids = prefix_token_ids(tokenizer, prefix)
    ctx_ids = [encode(tokenizer, c) for c in contexts]
    if max_context_tokens is not None:
        ctx_ids = [c[-max_context_tokens:] for c in ctx_ids]
    if not prefix_ids and any(not c for c in ctx_ids):
        raise ValueError("an empty context with no prefix gives the model nothing to continue from")
    pad_id, eos_id = _pad_id(tokenizer), tokenizer.eos_token_id
    dev = _device(model)
    texts: list[str] = [""] * len(contexts)
    order = sorted(range(len(contexts)), key=lambda i: -len(ctx_ids[i]))
    with _eval_mode(model):
        cached, prefix_kv = _split_prefix(model, prefix_ids, use_prefix_cache)
        for batch in tqdm(_batches(order, batch_size), desc="generate", disable=not progress, leave=False):
            rows = [(prefix_ids + ctx_ids[i])[cached:] for i in batch]
            width = max(len(r) for r in rows)
            x = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T), left-padded
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b, row in enumerate(rows):
                x[b, width - len(row):] = torch.tensor(row)
                mask[b, width - len(row):] = 1
            positions = (cached + mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): pads repeat position `cached`
            attention = torch.cat([torch.ones((len(batch), cached), dtype=torch.long), mask], dim=1)  # (B, P-1+T)
            out = model(input_ids=x.to(dev), attention_mask=attention.to(dev), position_ids=positions.to(dev),
                        past_key_values=_cache_for_batch(prefix_kv, len(batch)), use_cache=True, logits_to_keep=1)
            next_pos = positions[:, -1:].to(dev) + 1  # (B, 1)
            attention = attention.to(dev)
            generated: list[list[int]] = [[] for _ in batch]
            done = [False] * len(batch)
            for step in range(max_new_tokens):
                tokens = out.logits[:, -1].argmax(-1)  # (B,)
                for b, tok in enumerate(tokens.tolist()):
                    if done[b]:
                        continue
                    if tok == eos_id:
                        done[b] = True
                        continue
                    generated[b].append(tok)
                    if any(u in tokenizer.decode(generated[b]).lstrip() for u in until):
                        done[b] = True
                if all(done) or step == max_new_tokens - 1:
                    break
                attention = torch.cat([attention, attention.new_ones((len(batch), 1))], dim=1)
                out = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_pos,
                            past_key_values=out.past_key_values, use_cache=True)
                next_pos = next_pos + 1
            for b, i in enumerate(batch):
                text = tokenizer.decode(generated[b], skip_special_tokens=True).lstrip()
                for u in until:
                    text = text.split(u)[0]
                texts[i] = text.strip()
    return texts


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


# =========================================================================================== perplexity
def perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[str] | str, max_length: int = 128,
               stride: int | None = None, batch_size: int = 8, joiner: str = "\n\n",
               progress: bool = False) -> dict[str, float]:
    """Sliding-window perplexity of a corpus: ``exp(mean NLL per token)``.

    The texts are joined by ``joiner`` and encoded once (leading special tokens first). Windows of
    ``max_length`` tokens start every ``stride`` tokens (default ``stride = max_length``: disjoint windows,
    LLM-Pruner's setting with 128). Each token is scored once, by the first window that holds it and is not
    its first position, so a stride below ``max_length`` gives every token more context. The first token of the
    corpus has no context and is not scored. Returns perplexity, mean NLL (nats/token) and counts.
    """
    stride = stride or max_length
    if max_length < 2 or not 1 <= stride <= max_length:
        raise ValueError(f"max_length = {max_length}, stride = {stride}: need max_length >= 2 and "
                         "1 <= stride <= max_length (a larger stride would skip tokens)")
    ids = leading_special_ids(tokenizer) + encode(tokenizer, texts if isinstance(texts, str) else joiner.join(texts))
    n = len(ids)
    if n < 2:
        raise ValueError("the text has fewer than 2 tokens: nothing to score")
    windows: list[tuple[int, int, int]] = []  # (begin, end, first scored token)
    prev_end = 0
    for begin in range(0, n - 1, stride):
        end = min(begin + max_length, n)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    dev = _device(model)
    total_nll, n_scored = 0.0, 0
    with _eval_mode(model):
        for batch in tqdm(_batches(list(range(len(windows))), batch_size), desc="perplexity",
                          disable=not progress, leave=False):
            width = max(windows[w][1] - windows[w][0] for w in batch)
            x = torch.full((len(batch), width), _pad_id(tokenizer), dtype=torch.long)  # (B, max_length)
            for b, w in enumerate(batch):
                begin, end, _ = windows[w]
                x[b, :end - begin] = torch.tensor(ids[begin:end])
            logits = model(input_ids=x.to(dev), use_cache=False).logits  # (B, T, vocab)
            for b, w in enumerate(batch):
                begin, end, first = windows[w]
                targets = torch.tensor(ids[first:end], device=logits.device)  # tokens first..end-1
                logp = F.log_softmax(logits[b, first - 1 - begin:end - 1 - begin].float(), dim=-1)
                total_nll -= logp.gather(-1, targets[:, None]).sum().item()
                n_scored += len(targets)
    nll = total_nll / n_scored
    return {"perplexity": math.exp(nll), "nll": nll, "n_tokens": n_scored, "n_windows": len(windows),
            "max_length": max_length, "stride": stride}


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


# =========================================================================================== one task
def _longest_request(tokenizer, prompt: Prompt, examples: Sequence[ExampleLike],
                     max_new_tokens: int) -> int:
    if prompt.scoring == "generate":
        return max(len(encode(tokenizer, prompt.render_context(ex))) for ex in examples) + max_new_tokens
    return max(sum(len(t) for t in encode_request(tokenizer, c, a)) for ex in examples for c, a in prompt.requests(ex))


def evaluate_examples(model: torch.nn.Module, tokenizer, prompt: Prompt, examples: Sequence[ExampleLike],
                      prefix: FewShotPrefix | str = "", batch_size: int = 16, use_prefix_cache: bool = True,
                      share_context: bool = True,
                      max_new_tokens: int | None = None, progress: bool = False,
                      details: bool = False) -> dict[str, Any]:
    """Score examples with a prompt and a shared prefix: per-example values and their means.

    Returns ``{"n", "metrics": {name: mean}, "stderr": {name: se}, "ci95": {name: (lo, hi)}}`` and, with
    ``details``, ``"examples"``: one record per example (log-likelihoods and predictions, or generations).
    """
    if not examples:
        raise ValueError(f"no examples to evaluate for task {prompt.task!r}")
    per_example: dict[str, list[float]] = {m: [] for m in prompt.metrics}
    records: list[dict[str, Any]] = []
    if prompt.scoring in ("choices", "partial"):
        requests = [prompt.requests(ex) for ex in examples]
        flat = [r for reqs in requests for r in reqs]
        lls = loglikelihood(model, tokenizer, flat, prefix=prefix, batch_size=batch_size,
                            use_prefix_cache=use_prefix_cache, share_context=share_context, progress=progress)
        at = 0
        for ex, reqs in zip(examples, requests):
            ex_lls = lls[at:at + len(reqs)]
            at += len(reqs)
            pred, pred_norm = choice_predictions(ex_lls, prompt.choice_texts(ex))
            gold = prompt.gold_index(ex)
            values = {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}
            for m in prompt.metrics:
                per_example[m].append(values[m])
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
            if details:
                records.append({"id": ex.id, "prediction": out, "references": refs,
                                **{m: values[m] for m in prompt.metrics}})
    result: dict[str, Any] = {"n": len(examples), "metrics": {}, "stderr": {}, "ci95": {}}
    for m, vals in per_example.items():
        mean, se = mean_stderr(vals)
        result["metrics"][m], result["stderr"][m], result["ci95"][m] = mean, se, ci95(mean, se)
    if details:
        result["examples"] = records
    return result


def _data():
    from tailored import data

    return data


def task_info(task: str):
    """The ``TaskInfo`` of a task; an unknown name raises ``ValueError`` listing the tasks."""
    tasks = _data().TASKS
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(tasks)}")
    return tasks[task]


def majority_baseline(train_examples: Sequence[ExampleLike],
                      examples: Sequence[ExampleLike]) -> tuple[int | None, float | None]:
    """The most frequent TRAIN label and the accuracy of always answering it on the evaluated examples."""
    labels = [ex.label for ex in train_examples if ex.label is not None]
    if not labels:
        return None, None
    label = Counter(labels).most_common(1)[0][0]
    return label, float(np.mean([ex.label == label for ex in examples]))


def evaluate_task(model: torch.nn.Module, tokenizer, task: str, prompt: str | Prompt = "task_specific", k: int = 0,
                  limit: int | None = None, seed: int = 0, batch_size: int = 16, use_prefix_cache: bool = True,
                  share_context: bool = True, progress: bool = True, max_new_tokens: int | None = None,
                  max_tokens: int | None = None,
                  max_length: int = 128, stride: int | None = None,
                  examples: Sequence[ExampleLike] | None = None,
                  train_examples: Sequence[ExampleLike] | None = None,
                  details: bool = False) -> dict[str, Any]:
    """Evaluate a model on one task with one prompt and k shots; a dict ready for ``metrics.json``.

    - ``task``: a name from ``tailored.data.TASKS``; a ``text`` task (WikiText) is scored by perplexity
      (``max_length``, ``stride``; ``limit`` = number of documents; ``examples`` may be a list of texts)
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

    Returns ``task, kind, prompt, k, k_used, n, metrics, stderr, ci95`` (normal approximation), ``chance``
    and ``majority`` (accuracy of always answering the most frequent train label), ``near_chance``
    (the accuracy is within two standard errors of chance), ``prefix_tokens`` and ``seconds``.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit = {limit}: give a positive number of examples, or None for all")
    info = task_info(task)
    t0 = time.perf_counter()
    base = {"task": task, "kind": info.kind, "seed": seed, "limit": limit}
    if info.kind == "text":
        texts = list(examples) if examples is not None else _data().text_corpus("perplexity")
        texts = texts[:limit] if limit else texts
        ppl = perplexity(model, tokenizer, texts, max_length=max_length, stride=stride, batch_size=batch_size,
                         progress=progress)
        return {**base, "prompt": None, "k": 0, "k_used": 0, "n": len(texts), "n_tokens": ppl["n_tokens"],
                "metrics": {"perplexity": ppl["perplexity"], "nll": ppl["nll"]}, "stderr": {}, "ci95": {},
                "max_length": ppl["max_length"], "stride": ppl["stride"], "chance": None, "majority": None,
                "near_chance": None, "seconds": time.perf_counter() - t0}
    if info.kind not in ("multiple_choice", "classification", "extractive_qa", "summarization"):
        raise ValueError(f"task {task!r} is {info.kind!r} data (for training), not an evaluation task")
    p = prompt if isinstance(prompt, Prompt) else get_prompt(task, prompt)
    if k < 0:
        raise ValueError(f"k = {k} shots: the number of few-shot examples must be >= 0")
    if examples is None:
        examples = _data().load_task(task, split="eval", limit=limit, seed=seed)
    elif limit is not None:
        examples = list(examples)[:limit]
    if train_examples is None:  # a task without a train split is scored zero-shot only: load_task refuses k > 0
        zero_shot_only = k == 0 and "train" not in _data().splits(task)
        train_examples = [] if zero_shot_only else _data().load_task(task, split="train")
    budget = max_new_tokens or p.max_new_tokens
    max_tokens = max_tokens or getattr(model.config, "max_position_embeddings", None)
    longest = _longest_request(tokenizer, p, examples, budget)
    prefix = build_fewshot_prefix(task, p, k, train_examples, seed, tokenizer, max_tokens=max_tokens,
                                  longest_request=longest, exclude_ids=[ex.id for ex in examples])
    scored = evaluate_examples(model, tokenizer, p, examples, prefix=prefix, batch_size=batch_size,
                               use_prefix_cache=use_prefix_cache, share_context=share_context,
                               max_new_tokens=budget, progress=progress, details=details)
    chance = majority = majority_label = near_chance = None
    if p.scoring != "generate":
        chance = info.chance if info.chance is not None else float(np.mean([1 / len(p.options(e)) for e in examples]))
        majority_label, majority = majority_baseline(train_examples, examples)
        near_chance = bool(abs(scored["metrics"]["acc"] - chance) <= 2 * scored["stderr"]["acc"])
    return {**base, "prompt": p.name, "k": k, "k_used": prefix.k_used, "shot_ids": list(prefix.shot_ids),
            **scored, "chance": chance, "majority": majority, "majority_label": majority_label,
            "near_chance": near_chance, "prefix_tokens": prefix.n_tokens, "use_prefix_cache": use_prefix_cache,
            "seconds": time.perf_counter() - t0}


# =========================================================================================== many
def result_rows(result: Mapping[str, Any], model: str) -> list[dict[str, Any]]:
    """Flatten one ``evaluate_task`` result into long rows, one per metric (for pandas and metrics.json).

    Columns: model, task, kind, prompt, k, k_used, n, metric, value, stderr, ci_low, ci_high, chance,
    majority, near_chance, seconds.
    """
    rows = []
    for metric, value in result["metrics"].items():
        low, high = result["ci95"].get(metric, (None, None))
        near = result.get("near_chance") if metric in ACCURACY_METRICS else None
        if metric == "acc_norm" and result.get("chance") is not None:
            near = bool(abs(value - result["chance"]) <= 2 * result["stderr"][metric])
        rows.append({"model": model, "task": result["task"], "kind": result["kind"], "prompt": result["prompt"],
                     "k": result["k"], "k_used": result["k_used"], "n": result["n"], "metric": metric,
                     "value": value, "stderr": result["stderr"].get(metric), "ci_low": low, "ci_high": high,
                     "chance": result.get("chance"), "majority": result.get("majority"), "near_chance": near,
                     "seconds": result["seconds"]})
    return rows


def evaluate_many(models: Mapping[str, str | Path | tuple[torch.nn.Module, Any]], tasks: Sequence[str],
                  prompts: Sequence[str] = ("task_specific",), ks: Sequence[int] = (0,), limit: int | None = None,
                  seed: int = 0, batch_size: int = 16, use_prefix_cache: bool = True, progress: bool = True,
                  device: str = "cpu", dtype: str = "float32", **task_kwargs: Any) -> list[dict[str, Any]]:
    """Evaluate every model on every (task, prompt, k): long rows (see ``result_rows``).

    ``models`` maps a display name to a loaded ``(model, tokenizer)`` or to a spec for
    ``tailored.models.load`` (``"smollm2-135m"``, a pruned checkpoint folder…), which is loaded on ``device``
    and released after its tasks. Each task's data is loaded once and shared by all models, prompts and ks.
    A ``text`` task is evaluated once per model (prompt and k do not apply). Extra keyword arguments go to
    ``evaluate_task``.

    >>> rows = evaluate_many({"dense": "smollm2-135m"}, ["sst2", "boolq"], ks=[0, 5], limit=100)
    >>> pandas.DataFrame(rows).pivot_table(index=["task", "k"], columns="model", values="value")
    """
    for task in tasks:
        info = task_info(task)
        if info.kind != "text":
            for name in prompts:
                get_prompt(task, name)  # fail before any model runs
    if limit is not None and limit <= 0:
        raise ValueError(f"limit = {limit}: give a positive number of examples, or None for all")
    data = _data()
    loaded: dict[str, tuple[Any, Any]] = {}
    for task in tasks:
        if task_info(task).kind == "text":
            texts = data.text_corpus("perplexity")
            loaded[task] = (texts[:limit] if limit else texts, None)
        else:
            zero_shot_only = max(ks, default=0) == 0 and "train" not in data.splits(task)  # else k > 0 is refused
            loaded[task] = (data.load_task(task, split="eval", limit=limit, seed=seed),
                            [] if zero_shot_only else data.load_task(task, split="train"))
    jobs = [(task, name, k) for task in tasks
            for name, k in ([(None, 0)] if task_info(task).kind == "text" else [(p, k) for p in prompts for k in ks])]
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(models) * len(jobs), desc="evaluate", disable=not progress)
    for model_name, spec in models.items():
        if isinstance(spec, tuple):
            model, tokenizer = spec
        else:
            from tailored.models import load

            model, tokenizer = load(str(spec), device=device, dtype=dtype)
        for task, name, k in jobs:
            bar.set_postfix_str(f"{model_name} {task} {name or ''} k={k}")
            examples, train = loaded[task]
            result = evaluate_task(model, tokenizer, task, prompt=name or "task_specific", k=k, seed=seed,
                                   batch_size=batch_size, use_prefix_cache=use_prefix_cache, progress=False,
                                   examples=examples, train_examples=train, **task_kwargs)
            rows.extend(result_rows(result, model_name))
            bar.update()
        if not isinstance(spec, tuple):
            del model
    bar.close()
    return rows


# =========================================================================================== a run's models
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

    Pruned checkpoints are the folders ``run_dir/pruned/*/`` holding a ``pruning.json`` (notebook 03); their
    share comes from the plan recorded there. LoRA models are the entries of ``run_dir/adapters/index.json``
    (notebook 04): ``{"name", "base", "adapter", "recipe", "tasks", "prompt", "n"}``, paths relative to
    ``run_dir``; ``tasks`` and ``prompt`` may be null (a generic adapter), ``n`` is null except for the runs
    of a data sweep.
    A run with neither gives the dense model alone.
    """
    import json

    from tailored.prune import Plan

    run_dir = Path(run_dir)
    out = [RunModel("dense", "dense", dense)]
    pruned = {}
    for record_file in sorted(run_dir.glob("pruned/*/pruning.json")):
        record = json.loads(record_file.read_text()).get("record", {})
        share = Plan.from_dict(record["plan"]).share_decoder if "plan" in record else float("nan")
        pruned[record_file.parent.name] = RunModel(record_file.parent.name, "pruned", str(record_file.parent), share)
    out += sorted(pruned.values(), key=lambda m: (m.share, m.name))
    index = run_dir / "adapters" / "index.json"
    if index.exists():
        for e in json.loads(index.read_text()):
            base = Path(e["base"]).name
            if base not in pruned:
                raise FileNotFoundError(f"{index}: adapter {e['name']!r} was tuned from {e['base']!r}, which is not "
                                        f"a pruned checkpoint of this run ({sorted(pruned)}); rerun notebook 03")
            recipe = e.get("recipe") or ""
            tasks = () if recipe == "generic" else tuple(e.get("tasks") or ())
            out.append(RunModel(e["name"], "lora", pruned[base].spec, pruned[base].share, base=base,
                                adapter=str(run_dir / e["adapter"]), recipe=recipe, tasks=tasks,
                                prompt=e.get("prompt") or "", n=e.get("n")))
    order = {m.name: i for i, m in enumerate(out)}
    return sorted(out, key=lambda m: (m.share if m.kind != "dense" else -1.0, m.kind == "lora", m.n is not None,
                                      order[m.name]))


def load_run_model(entry: RunModel, device: str = "cpu", dtype: str = "float32", seed: int = 0):
    """``(model, tokenizer)`` of a ``RunModel``; a LoRA adapter is loaded onto its base and merged in."""
    from tailored.models import load

    model, tokenizer = load(entry.spec, device=device, dtype=dtype, seed=seed)
    if entry.kind == "lora":
        from tailored.lora import load_adapter, merge

        model = merge(load_adapter(model, entry.adapter))
        model.eval()
    return model, tokenizer
