"""Scoring a language model: log-likelihoods of answers, greedy generation, perplexity; few-shot prefixes.

How a task is scored follows lm-evaluation-harness (Gao et al.):

- **multiple choice and classification**: each answer ``a_j`` is a continuation of the context ``c``;
  the model's score of the answer is its log-likelihood ``log p(a_j | c) = sum_t log p(a_j,t | c, a_j,<t)``
  (``loglikelihood``); ``tailored.metrics.choice_predictions`` turns them into ``acc`` and ``acc_norm``.
- **extractive QA and summarization**: greedy generation until a stop string (``greedy_generate``).
- **perplexity**: ``exp`` of the mean negative log-likelihood per token over a sliding window.

k-shot evaluation puts k solved training examples in front of every evaluated one (``build_fewshot_prefix``).
Here the same k shots (drawn once by seed) serve every example of a task, so the model reads that prefix
**once**: its keys and values are cached and reused for every example and every answer, expanded along the
batch. With k = 25 the ARC-Easy prefix is ~700 tokens and each request ~30, so this is where the speed comes
from; the naive path (``use_prefix_cache=False``) re-encodes the whole sequence per request and scores
identical token ids. The answers of one question share their context too: they are packed in one row, the
context read once and each answer attending to it and to itself only (``share_context``; see
``score_token_requests``).

Tokenization is ``tailored.tokens``' contract. The few-shot prefix is encoded on its own and its ids are
concatenated in front (``prefix_ids + ctx + cont``) in *both* paths, which makes the prefix a token prefix of
every request. (The harness encodes ``prefix + context`` as one string; the two differ only in how the
``"\\n\\n"`` between them is split into tokens.)

::

    prefix = build_fewshot_prefix("sst2", "task_specific", 5, train, seed=0, tokenizer=tokenizer)
    loglikelihood(model, tokenizer, [(context, " positive"), (context, " negative")], prefix=prefix)
    greedy_generate(model, tokenizer, [context], prefix=prefix, max_new_tokens=32)
    perplexity(model, tokenizer, texts, max_length=128, stride=64)
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from tailored.prompts import ExampleLike, Prompt, get_prompt
from tailored.tokens import encode, encode_request, leading_special_ids, padding_id


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


def prefix_token_ids(tokenizer, prefix: FewShotPrefix | str | Sequence[int] = "") -> list[int]:
    """The token ids in front of every request: a ``FewShotPrefix``'s, or leading specials + ``enc(prefix)``."""
    if isinstance(prefix, FewShotPrefix):
        return list(prefix.token_ids)
    if isinstance(prefix, str):
        return leading_special_ids(tokenizer) + encode(tokenizer, prefix)
    return list(prefix)

# =========================================================================================== model plumbing
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


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
    return score_token_requests(model, prefix_token_ids(tokenizer, prefix), encoded, pad_id=padding_id(tokenizer),
                                batch_size=batch_size, use_prefix_cache=use_prefix_cache,
                                share_context=share_context, progress=progress)

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
    pad_id, eos_id = padding_id(tokenizer), tokenizer.eos_token_id
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

# =========================================================================================== perplexity
def perplexity(model: torch.nn.Module, tokenizer, texts: Sequence[str] | str, max_length: int = 128,
               stride: int | None = None, batch_size: int = 8, joiner: str = "\n\n",
               progress: bool = False, max_tokens: int | None = None) -> dict[str, float]:
    """Sliding-window perplexity of a corpus: ``exp(mean NLL per token)``.

    The texts are joined by ``joiner`` and encoded once (leading special tokens first). Windows of
    ``max_length`` tokens start every ``stride`` tokens (default ``stride = max_length``: disjoint windows,
    LLM-Pruner's setting with 128). Each token is scored once, by the first window that holds it and is not
    its first position, so a stride below ``max_length`` gives every token more context. The first token of the
    corpus has no context and is not scored. ``max_tokens`` keeps the first that many tokens of the corpus:
    every model of a study is scored on the very same tokens. Returns perplexity, mean NLL (nats/token),
    counts, and each window's NLL sum and token count (``window_nll``, ``window_tokens``: what an interval
    resamples, ``tailored.metrics.perplexity_interval``).
    """
    stride = stride or max_length
    if max_length < 2 or not 1 <= stride <= max_length:
        raise ValueError(f"max_length = {max_length}, stride = {stride}: need max_length >= 2 and "
                         "1 <= stride <= max_length (a larger stride would skip tokens)")
    ids = leading_special_ids(tokenizer) + encode(tokenizer, texts if isinstance(texts, str) else joiner.join(texts))
    if max_tokens is not None:
        if len(ids) < max_tokens:
            raise ValueError(f"the text has {len(ids)} tokens, fewer than max_tokens = {max_tokens}: give more text "
                             "or lower max_tokens")
        ids = ids[:max_tokens]
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
    window_nll, window_tokens = [0.0] * len(windows), [0] * len(windows)
    with _eval_mode(model):
        for batch in tqdm(_batches(list(range(len(windows))), batch_size), desc="perplexity",
                          disable=not progress, leave=False):
            width = max(windows[w][1] - windows[w][0] for w in batch)
            x = torch.full((len(batch), width), padding_id(tokenizer), dtype=torch.long)  # (B, max_length)
            for b, w in enumerate(batch):
                begin, end, _ = windows[w]
                x[b, :end - begin] = torch.tensor(ids[begin:end])
            logits = model(input_ids=x.to(dev), use_cache=False).logits  # (B, T, vocab)
            for b, w in enumerate(batch):
                begin, end, first = windows[w]
                targets = torch.tensor(ids[first:end], device=logits.device)  # tokens first..end-1
                logp = F.log_softmax(logits[b, first - 1 - begin:end - 1 - begin].float(), dim=-1)
                window_nll[w] = -logp.gather(-1, targets[:, None]).sum().item()
                window_tokens[w] = len(targets)
    nll = sum(window_nll) / sum(window_tokens)
    return {"perplexity": math.exp(nll), "nll": nll, "n_tokens": sum(window_tokens), "n_windows": len(windows),
            "max_length": max_length, "stride": stride, "window_nll": window_nll, "window_tokens": window_tokens}
