"""The tokenization contract: how a text, and a (context, continuation) pair, become token ids.

Training (``tailored.lora``) and scoring (``tailored.scoring``) both encode through these functions, so the
tokens a LoRA adapter is trained on are exactly the tokens the evaluator scores. The split of a
``(context, continuation)`` pair follows lm-evaluation-harness::

    whole = enc(context + continuation);  ctx = enc(context);  cont = whole[len(ctx):]

with trailing whitespace of the context moved to the continuation first (``"Answer: " + "yes"`` is scored
as ``"Answer:" + " yes"``). A leaf module: it imports nothing of ours.
"""

from __future__ import annotations


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (``[]`` for ``""``)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens a tokenizer puts in front of a text by default: LLaMA-1/2's BOS, none for SmolLM2.

    They start every sequence the evaluator scores (in front of the few-shot prefix) and every training
    sequence, as they would in the model's training data.
    """
    full = list(tokenizer("a")["input_ids"])
    plain = encode(tokenizer, "a")
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context moves to the continuation: ``("Answer: ", "yes") -> ("Answer:", " yes")``."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Encode one ``(context, continuation)`` pair the way the harness does: ``(ctx_ids, cont_ids)``.

    ``cont_ids = enc(context + continuation)[len(enc(context)):]``, so the continuation's tokens are the
    ones the model would read after the context.
    """
    context, continuation = move_trailing_space(context, continuation)
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} adds no token after context ...{context[-40:]!r}")
    return ctx, cont


def padding_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
