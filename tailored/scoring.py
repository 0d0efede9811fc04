"""Scoring a language model: log-likelihoods of answers, greedy generation, perplexity; few-shot prefixes.

How a task is scored follows lm-evaluation-harness (Gao et al.):

- **multiple choice and classification**: each answer ``a_j`` is a continuation of the context ``c``;
  the model's score of the answer is its log-likelihood ``log p(a_j | c) = sum_t log p(a_j,t | c, a_j,<t)``
  (``loglikelihood``); ``tailored.metrics.choice_predictions`` turns them into ``acc`` and ``acc_norm``.
- **extractive QA and summarization**: greedy generation until a stop string (``greedy_generate``).
- **perplexity**: ``exp`` of the mean negative log-likelihood per token over a sliding window.

k-shot evaluation puts k solved training examples in front of every evaluated one (``build_fewshot_prefix``).
Here the same k shots (drawn once by seed) serve every example of a task, so the model reads that prefix
**once**: its keys and values are cached, and every batch attends to that one copy (``shared_prefix_attention``:
never copied into each row). With k = 25 the ARC-Easy prefix is ~700 tokens and each request ~30, so this is
where the speed comes from; the naive path (``use_prefix_cache=False``) re-encodes the whole sequence per
request and scores identical token ids. The answers of one question share a row too: their common token prefix
is read once and each answer attends to it and to itself only (``share_context``; see ``score_token_requests``,
which also batches by a token budget and runs the LM head only where an answer token is predicted).

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
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tailored.anatomy import preserved
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
SCORE_DTYPES = ("float32", "bfloat16")
# padded tokens per forward pass (rows x width) by device type: on the CPU, passes of about 512 tokens were the
# fastest (benchmarks/README.md: larger ones spill the activations out of the caches); elsewhere, more
BATCH_TOKENS = {"cpu": 512}
BATCH_TOKENS_ELSEWHERE = 8192
SHARED_PREFIX = "tailored_shared_prefix"  # the attention implementation that reads the cached prefix once per batch


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Evaluate with dropout off (LoRA adds some), without gradients; every module's mode restored afterwards."""
    with preserved(model), torch.inference_mode():
        model.eval()
        yield


def check_score_dtype(score_dtype: str) -> str:
    """``score_dtype`` if it is one of ``SCORE_DTYPES``, else a ``ValueError`` saying what it means."""
    if score_dtype not in SCORE_DTYPES:
        raise ValueError(f"score_dtype = {score_dtype!r}: choose one of {list(SCORE_DTYPES)} (the precision of the "
                         "decoder's matrix products while scoring; the LM head and log-softmax stay float32)")
    return score_dtype


@contextlib.contextmanager
def _precision(model: torch.nn.Module, score_dtype: str) -> Iterator[None]:
    """``bfloat16``: the decoder's matrix products in bf16 (autocast); the residual stream and the norms stay in
    the weights' dtype, and the LM head and log-softmax run in float32 (``_log_probs``). ``float32``: as loaded."""
    if check_score_dtype(score_dtype) == "float32":
        yield
        return
    with torch.autocast(device_type=_device(model).type, dtype=torch.bfloat16):
        yield


@contextlib.contextmanager
def _attention(model: torch.nn.Module, implementation: str | None) -> Iterator[None]:
    """Run the model's attention with ``implementation`` (``None``: as it is), then restore every config's own."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if hasattr(c, "_attn_implementation")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        if implementation is not None:
            for c in configs.values():
                c._attn_implementation = implementation
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


def shared_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                            shared_prefix: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over a prefix every row shares, then each row's own keys, without copying the prefix per row.

    ``query`` (B, H, T, d); ``key``, ``value`` (B, KV, S, d): each row's own tokens (S = T, or T plus the own
    tokens cached while generating); ``shared_prefix[layer]`` = (keys, values), each (1, KV, P, d), seen by every
    query; ``attention_mask`` over the own keys only, (B, 1, T, S) additive or boolean (True: attend), or ``None``
    (causal). It computes ``softmax([q·K_p, q·K_own + mask] * scale) @ [V_p; V_own]``, the softmax split in two:
    the prefix's part is one matrix product per KV head with the batch folded into its rows, ``(KV, B·g·T, d) @
    (KV, d, P)``, so the prefix is read once per batch and never expanded to B rows (nor repeated g times for
    grouped-query attention). Returns (B, T, H, d) as ``sdpa_attention_forward`` does.
    """
    prefix = shared_prefix[module.layer_idx] if shared_prefix is not None else None
    if prefix is None or prefix[0] is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    pk, pv = prefix  # (1, KV, P, d)
    b, h, t, d = query.shape
    kv, s = key.shape[1], key.shape[2]
    g = h // kv  # query heads per KV head: head j·g + i reads KV head j
    scale = scaling if scaling is not None else d ** -0.5
    q = query.reshape(b, kv, g * t, d)  # (B, KV, g·T, d)
    folded = q.transpose(0, 1).reshape(kv, b * g * t, d)  # (KV, B·g·T, d)
    s_pre = torch.matmul(folded, pk[0].transpose(-1, -2)).float().mul_(scale)  # (KV, B·g·T, P)
    s_own = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scale).view(b, kv, g, t, s)  # (B, KV, g, T, S)
    if attention_mask is None:
        allowed = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
        s_own.masked_fill_(~allowed, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        s_own.masked_fill_(~attention_mask[:, :, None], float("-inf"))
    else:
        s_own.add_(attention_mask[:, :, None].float())
    s_own = s_own.view(b, kv, g * t, s)
    top = torch.maximum(s_pre.amax(-1).view(kv, b, g * t).transpose(0, 1), s_own.amax(-1))  # (B, KV, g·T)
    s_pre.sub_(top.transpose(0, 1).reshape(kv, b * g * t, 1)).exp_()
    s_own.sub_(top[..., None]).exp_()
    total = s_pre.sum(-1).view(kv, b, g * t).transpose(0, 1) + s_own.sum(-1)  # (B, KV, g·T)
    out_pre = torch.matmul(s_pre.to(pv.dtype), pv[0]).view(kv, b, g * t, d).transpose(0, 1)  # (B, KV, g·T, d)
    out = (out_pre.float() + torch.matmul(s_own.to(value.dtype), value).float()) / total[..., None]
    return out.to(query.dtype).reshape(b, h, t, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_PREFIX, shared_prefix_attention)
AttentionMaskInterface.register(SHARED_PREFIX, sdpa_mask)  # 2-D masks over the own tokens, as for sdpa


def _encode_prefix(model: torch.nn.Module, ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the model once over the prefix and keep every layer's keys and values, each (1, kv_heads, P, head_dim)."""
    x = torch.tensor([list(ids)], device=_device(model))  # (1, P)
    out = model(input_ids=x, use_cache=True, logits_to_keep=1)
    # a layer whose attention was pruned away entirely holds no keys: it stays empty
    return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in out.past_key_values.layers]


def _cache_for_batch(prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None, batch: int):
    """A ``DynamicCache`` holding the prefix copied for ``batch`` rows, (batch, kv_heads, P, head_dim) per layer.

    ``expand`` makes views, but the cache's first update concatenates, which copies the prefix into every row
    (``shared_prefix=False``: the way before ``shared_prefix_attention``, kept to measure it against).
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


def _batches(order: list[int], size: int, lengths: Sequence[int] | None = None,
             max_tokens: int | None = None) -> list[list[int]]:
    """Consecutive items of ``order`` in batches of at most ``size``; with ``lengths`` (``order`` sorted longest
    first) and ``max_tokens``, also at most ``max_tokens`` padded tokens each (rows x the first row's length),
    so that short rows travel many to a pass and long ones few. A row longer than the budget goes alone."""
    if size < 1:
        raise ValueError(f"batch_size = {size}: it must be a positive number of requests")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"batch_tokens = {max_tokens}: give a positive number of tokens per pass, or None")
    if lengths is None or max_tokens is None:
        return [order[i:i + size] for i in range(0, len(order), size)]
    batches: list[list[int]] = []
    for r in order:
        if batches and len(batches[-1]) < size and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(r)
        else:
            batches.append([r])
    return batches

# =========================================================================================== log-likelihood
@dataclass(frozen=True)
class _Row:
    """One input row: ``base`` (token ids at positions ``start``.., read once) followed by each request's own
    ids; ``targets[j]`` = (request, row indices of the logits that predict it, its continuation ids)."""

    start: int
    base: list[int]
    segments: list[list[int]]
    targets: list[tuple[int, list[int], list[int]]]

    @property
    def length(self) -> int:
        return len(self.base) + sum(len(s) for s in self.segments)


def _common_length(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _pack_rows(prefix_ids: Sequence[int], requests: Sequence[tuple[Sequence[int], Sequence[int]]],
               groups: Sequence[Sequence[int]], cached: int) -> list[_Row]:
    """One row per group of requests: their common token prefix read once, then each one's remaining tokens.

    A request reads ``(prefix + ctx + cont)[:-1]`` (the last token is only predicted); the logit at sequence
    position q predicts token q + 1. The choices of an ARC question share their context, WinoGrande's two
    options everything before the blank; a one-token answer whose context is the common part adds no token.
    """
    prefix_ids = list(prefix_ids)
    rows = []
    for group in groups:
        reads = [prefix_ids + list(requests[i][0]) + list(requests[i][1])[:-1] for i in group]
        common = max(_common_length(reads), cached)
        base, segments, targets, at = reads[0][cached:common], [], [], common - cached
        for i, read in zip(group, reads):
            ctx, cont = requests[i]
            first = len(prefix_ids) + len(ctx) - 1  # the position predicting the first continuation token
            if first < cached or first < 0:
                raise ValueError(f"request {i} has no context and there is no prefix: nothing predicts its first "
                                 "token (give a context or a prefix)")
            seg = read[common:]
            idx = [q - cached if q < common else at + q - common for q in range(first, len(read))]
            segments.append(seg)
            targets.append((i, idx, list(cont)))
            at += len(seg)
        rows.append(_Row(cached, base, segments, targets))
    return rows


def _groups(requests: Sequence[tuple[Sequence[int], Sequence[int]]], share_context: bool,
            groups: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """Which requests share a row: the given ``groups`` (e.g. the choices of each question), else the requests
    with the very same context; one row each without ``share_context``."""
    if not share_context:
        return [[i] for i in range(len(requests))]
    if groups is not None:
        seen = sorted(i for g in groups for i in g)
        if seen != list(range(len(requests))):
            raise ValueError(f"groups must hold every request index 0..{len(requests) - 1} exactly once")
        return [list(g) for g in groups if g]
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(requests):
        rows.setdefault(tuple(ctx), []).append(i)
    return list(rows.values())


def _batch_inputs(rows: Sequence[_Row], pad_id: int, dtype: torch.dtype, with_prefix_columns: bool):
    """Input ids, positions and the additive 4-D mask of a batch of rows, right-padded: (B, W) and (B, 1, W, K).

    A query sees the base causally and its own segment causally; padding sees the base and the padding before it
    (so no row of the mask is empty). ``with_prefix_columns`` puts the cached prefix's columns first (K = cached +
    W, all visible), for a cache that holds the prefix; otherwise K = W.
    """
    width = max(r.length for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, W)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # 0 base, j + 1 segment j
    position = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids = row.base + [t for s in row.segments for t in s]
        x[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        segment[b, :len(row.base)] = 0
        position[b, :len(row.base)] = torch.arange(row.start, row.start + len(row.base))
        at, end_base = len(row.base), row.start + len(row.base)
        for j, seg in enumerate(row.segments):
            segment[b, at:at + len(seg)] = j + 1
            position[b, at:at + len(seg)] = torch.arange(end_base, end_base + len(seg))
            at += len(seg)
        position[b, at:] = torch.arange(width - at) + end_base  # padding: any in-range position
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & ((segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None]))
    if with_prefix_columns:
        allowed = torch.cat([torch.ones(len(rows), width, rows[0].start, dtype=torch.bool), allowed], dim=-1)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return x, position, mask[:, None]


def _log_probs(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """``log p(target)`` from final hidden states, the LM head and log-softmax in float32: (N, hidden) -> (N,).

    Taken ``chunk`` positions at a time, so that the (chunk, vocab) logits stay small."""
    head = model.get_output_embeddings()
    out = []
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        for i in range(0, len(hidden), chunk):
            h = hidden[i:i + chunk]
            if head.weight.dtype == torch.float32:
                logits = head(h.float())
            else:  # bf16 / fp16 weights: the head's product in float32 too
                w = head.weight
                logits = F.linear(h.to(w.device).float(), w.float(), None if head.bias is None else head.bias.float())
            logp = F.log_softmax(logits.float(), dim=-1)
            out.append(logp.gather(-1, targets[i:i + chunk, None].to(logp.device))[:, 0])
    return torch.cat(out)


def _scored_positions(rows: Sequence[_Row], width: int) -> tuple[torch.Tensor, list[int]]:
    """Flat indices into the batch's (B·W) hidden states that predict a continuation token, in the order of the
    rows' targets, and how many each request has."""
    flat, counts = [], []
    for b, row in enumerate(rows):
        for _, idx, _ in row.targets:
            flat += [b * width + t for t in idx]
            counts.append(len(idx))
    return torch.tensor(flat, dtype=torch.long), counts


def score_token_requests(model: torch.nn.Module, prefix_ids: Sequence[int],
                         requests: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0,
                         batch_size: int = 16, use_prefix_cache: bool = True, share_context: bool = True,
                         progress: bool = False, desc: str = "log-likelihood",
                         groups: Sequence[Sequence[int]] | None = None, batch_tokens: int | str | None = "auto",
                         score_dtype: str = "float32", shared_prefix: bool = True,
                         scored_head: bool = True) -> np.ndarray:
    """Log-likelihood of each continuation given prefix + context, in nats: (n_requests,) float64.

    ``requests`` are ``(ctx_ids, cont_ids)``; every scored sequence is ``prefix_ids + ctx_ids + cont_ids``. Each
    saving computes exactly what the plain forward pass over that sequence would (float32; tests assert it):

    - ``use_prefix_cache``: the prefix shared by all requests (the few-shot examples) is encoded once; with
      ``shared_prefix`` every batch attends to its keys and values as one copy (``shared_prefix_attention``),
      without, they are copied into each row (the older way, to measure against).
    - ``share_context``: the requests of one group (``groups``, e.g. the choices of each question; default: the
      requests with the same context) share one row: their common token prefix once, then each request's
      remaining tokens, each attending to the prefix, the common part and itself only (a 4-D mask, positions
      continuing after the common part). An ARC question reads its context once for its four answers;
      WinoGrande's two options share the sentence before the blank.
    - rows are sorted longest first; a pass takes at most ``batch_size`` rows and ``batch_tokens`` padded tokens
      (``"auto"``: ``BATCH_TOKENS`` for the model's device type; ``None``: always ``batch_size`` rows).
    - ``scored_head``: the LM head (and log-softmax, float32) only on the positions that predict a continuation
      token; without it, on every position from the batch's first scored one.
    - ``score_dtype="bfloat16"``: the decoder's matrix products in bf16 (faster on CPUs with AVX-512 BF16 and on
      GPUs; scores change, see benchmarks/README.md for where that was measured to keep predictions).
    """
    scores = np.zeros(len(requests), dtype=np.float64)
    if not requests:
        return scores
    dev = _device(model)
    dtype = next(model.parameters()).dtype  # of the additive attention mask
    if batch_tokens == "auto":
        batch_tokens = BATCH_TOKENS.get(dev.type, BATCH_TOKENS_ELSEWHERE)
    with _eval_mode(model), _precision(model, score_dtype):
        cached, prefix_kv = _split_prefix(model, list(prefix_ids), use_prefix_cache)
        rows = _pack_rows(prefix_ids, requests, _groups(requests, share_context, groups), cached)
        order = sorted(range(len(rows)), key=lambda r: -rows[r].length)
        broadcast = shared_prefix and prefix_kv is not None
        decoder = model.get_decoder()
        for batch in tqdm(_batches(order, batch_size, [r.length for r in rows], batch_tokens), desc=desc,
                          disable=not progress, leave=False):
            chosen = [rows[r] for r in batch]
            x, position, mask = _batch_inputs(chosen, pad_id, dtype, with_prefix_columns=not broadcast and cached > 0)
            extra = ({"shared_prefix": prefix_kv} if broadcast else
                     {"cache": _cache_for_batch(prefix_kv, len(batch)), "use_cache": prefix_kv is not None})
            with _attention(model, SHARED_PREFIX if broadcast else None):
                hidden = decoder(input_ids=x.to(dev), attention_mask=mask.to(dev), position_ids=position.to(dev),
                                 **({"use_cache": False} | extra)).last_hidden_state  # (B, W, hidden)
            index, counts = _scored_positions(chosen, x.shape[1])
            target_ids = torch.tensor([t for row in chosen for _, _, cont in row.targets for t in cont])
            if scored_head:
                logp = _log_probs(model, hidden.reshape(-1, hidden.shape[-1])[index.to(hidden.device)], target_ids)
            else:
                logp = _log_probs_from_first(model, hidden, index, target_ids)
            sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(
                0, torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)), logp.double().cpu())
            for (i, _, _), value in zip((t for row in chosen for t in row.targets), sums.tolist()):
                scores[i] = value
    return scores


def _log_probs_from_first(model: torch.nn.Module, hidden: torch.Tensor, index: torch.Tensor,
                          targets: torch.Tensor) -> torch.Tensor:
    """As ``_log_probs``, but the LM head on every position of ``hidden`` (B, W, hidden) from the first scored one
    to the end, as ``logits_to_keep`` would (``scored_head=False``: kept to measure against)."""
    width = hidden.shape[1]
    first = int((index % width).min())
    head = model.get_output_embeddings()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = head(hidden[:, first:].to(head.weight.dtype))  # (B, W - first, vocab)
        picked = logits.reshape(-1, logits.shape[-1])[(index // width) * (width - first) + index % width - first]
        logp = F.log_softmax(picked.float(), dim=-1)
    return logp.gather(-1, targets[:, None].to(logp.device))[:, 0]


def loglikelihood(model: torch.nn.Module, tokenizer, requests: Sequence[tuple[str, str]],
                  prefix: FewShotPrefix | str = "", batch_size: int = 16, use_prefix_cache: bool = True,
                  share_context: bool = True, progress: bool = False, **options) -> np.ndarray:
    """``log p(continuation | prefix + context)`` for each ``(context, continuation)``: (n,) float64, nats.

    ``options`` go to ``score_token_requests`` (``groups``, ``batch_tokens``, ``score_dtype``...)."""
    encoded = [encode_request(tokenizer, c, a) for c, a in requests]
    return score_token_requests(model, prefix_token_ids(tokenizer, prefix), encoded, pad_id=padding_id(tokenizer),
                                batch_size=batch_size, use_prefix_cache=use_prefix_cache,
                                share_context=share_context, progress=progress, **options)

# =========================================================================================== generation
def greedy_generate(model: torch.nn.Module, tokenizer, contexts: Sequence[str],
                    prefix: FewShotPrefix | str = "", max_new_tokens: int = 32, until: Sequence[str] = ("\n",),
                    batch_size: int = 8, use_prefix_cache: bool = True, progress: bool = False,
                    max_context_tokens: int | None = None) -> list[str]:
    """Greedy continuation of ``prefix + context`` for each context, cut at the first stop string: (n,) strings.

    Leading whitespace of the continuation is skipped before the stop strings apply, so a model that starts
    its answer on a new line after ``"Answer:"`` is not cut to an empty answer (the harness would be).
    Contexts are left-padded *after* the cached prefix, so the attention mask hides the padding and
    ``position_ids`` skip it: row b's first real token sits at position ``len(prefix)``. The cached prefix is one
    copy that every row attends to (``shared_prefix_attention``); the cache holds the rows' own tokens only. A context longer than
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
            attention = mask.to(dev)  # (B, T): the own tokens; every row sees the shared prefix whole
            shared = {} if prefix_kv is None else {"shared_prefix": prefix_kv}
            with _attention(model, SHARED_PREFIX if shared else None):
                out = model(input_ids=x.to(dev), attention_mask=attention, position_ids=positions.to(dev),
                            use_cache=True, logits_to_keep=1, **shared)
            next_pos = positions[:, -1:].to(dev) + 1  # (B, 1)
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
                with _attention(model, SHARED_PREFIX if shared else None):
                    out = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=next_pos,
                                past_key_values=out.past_key_values, use_cache=True, **shared)
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
