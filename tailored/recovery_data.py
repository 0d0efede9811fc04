"""What LoRA recovery trains on: generic and tailored examples, their train/validation split, and their tokens.

*Generic* examples are instruction data (the offline stand-in for LLM-Pruner's Alpaca), *tailored* ones a
task's TRAIN split written with the prompt the model is later evaluated with (Tailored-LLaMA's point). Both
come from train splits only; a validation part is held out of the same split (``train_and_validation``),
so that neither training nor the choice of an adapter ever sees the evaluated examples. ``encode`` turns
an example into token ids with a completion-only loss mask, exactly as the evaluator tokenizes a request.

The same tailored data, written as plain documents (``calibration_texts``), can calibrate pruning on the
tasks' own text (notebook 02): this module needs nothing of LoRA itself.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tailored.data import load_task
from tailored.prompts import get_prompt

# training tokenizes exactly as evaluation scores: the same contract, so the two can never drift apart
from tailored.tokens import encode as encode_text
from tailored.tokens import leading_special_ids, move_trailing_space

IGNORE = -100  # the label of a token the loss skips (PyTorch's cross_entropy ignore_index)

# A generic instruction template (Alpaca-like sections); the answer is the text after "### Response:\n".
GENERIC_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
GENERIC_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# ============================================================================================ examples
@dataclass(frozen=True)
class TrainExample:
    """One supervised example: the model reads ``prompt + answer`` and is trained on the answer only."""

    prompt: str
    answer: str
    source: str = ""  # "<task>/<example id>", for tracing


def generic_examples(n: int, seed: int = 0, skip: int = 0) -> list[TrainExample]:
    """``n`` instruction-following examples (the "instructions" task): instruction (+ input) -> output.

    This is the *generic* recovery data, the offline stand-in for LLM-Pruner's Alpaca. ``skip`` drops the
    first examples of the seeded order (used to keep a validation part apart, see ``train_and_validation``).
    """
    out = []
    for ex in load_task("instructions", split="train", limit=skip + n, seed=seed)[skip:]:
        if not ex.references:
            continue
        instruction, extra = ex.fields.get("instruction", ""), ex.fields.get("input", "")
        prompt = (GENERIC_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=extra) if extra.strip()
                  else GENERIC_TEMPLATE.format(instruction=instruction))
        out.append(TrainExample(prompt, ex.references[0], f"instructions/{ex.id}"))
    return out


def tailored_examples(task: str | Sequence[str], prompt_name: str = "task_specific", n: int = 500,
                      seed: int = 0, skip: int = 0) -> list[TrainExample]:
    """``n`` examples of a task's TRAIN split written with one of its prompts (the *tailored* data).

    ``prompt = render_context(example)``, ``answer = render_target(example)`` (the gold answer with its
    leading delimiter), exactly the strings the evaluator scores. Given several tasks, ``n`` examples of
    each are mixed in one seeded order (multi-task recovery). Examples without a gold answer are skipped.
    """
    tasks = [task] if isinstance(task, str) else list(task)
    out: list[TrainExample] = []
    for name in tasks:
        prompt = get_prompt(name, prompt_name)
        for ex in load_task(name, split="train", limit=skip + n, seed=seed)[skip:]:
            if ex.label is None and not ex.references:
                continue
            out.append(TrainExample(prompt.render_context(ex), prompt.render_target(ex), f"{name}/{ex.id}"))
    return mix_examples(out, seed) if len(tasks) > 1 else out


def calibration_texts(task: str | Sequence[str], n: int = 500, prompt_name: str = "task_specific",
                      per_document: int = 50, seed: int = 0) -> list[str]:
    """The tailored training data as plain documents, to calibrate pruning on the tasks' own text.

    ``n`` examples of each task (``tailored_examples``: the train split, never the evaluated examples),
    each written ``prompt + answer``, joined by blank lines into documents of ``per_document`` examples,
    so that ``importance.calibration_batch(..., per_text=k)`` can cut windows of a few hundred tokens.
    """
    if per_document < 1:
        raise ValueError(f"per_document={per_document}: a document holds at least one example")
    rows = [ex.prompt + ex.answer for ex in tailored_examples(task, prompt_name, n, seed=seed)]
    return ["\n\n".join(rows[i:i + per_document]) for i in range(0, len(rows), per_document)]


def mix_examples(examples: Sequence[TrainExample], seed: int = 0) -> list[TrainExample]:
    """One seeded shuffle of examples from several sources (multi-task or generic + tailored mixes)."""
    out = list(examples)
    random.Random(seed).shuffle(out)
    return out


def train_and_validation(task: str | Sequence[str], n: int, n_validation: int = 0,
                         prompt_name: str = "task_specific", seed: int = 0
                         ) -> tuple[list[TrainExample], list[TrainExample]]:
    """Training examples and a disjoint validation part, both from the TRAIN split.

    ``task="generic"`` takes instruction data. The first ``n_validation`` examples of the seeded order are
    the validation part, the next ``n`` the training set: the validation part is the same for every ``n``
    and training sets of a sweep are nested (n=50 is a prefix of n=500). The evaluated examples come from
    the evaluation split and never take part in training or checkpoint choice.
    """
    if task == "generic":
        both = generic_examples(n_validation + n, seed=seed)
    else:
        tasks = [task] if isinstance(task, str) else list(task)
        both, val = [], []
        for name in tasks:  # split each task, so every task has its own validation part
            rows = tailored_examples(name, prompt_name, n_validation + n, seed=seed)
            val += rows[:n_validation]
            both += rows[n_validation:]
        return (mix_examples(both, seed) if len(tasks) > 1 else both), val
    return both[n_validation:], both[:n_validation]


# ============================================================================================== tokens
@dataclass(frozen=True)
class Encoded:
    """Token ids of one example and its labels: ``IGNORE`` (-100) on every prompt token."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: int = 0  # prompt (or answer) tokens dropped to fit max_seq_len

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(tokenizer, example: TrainExample, max_seq_len: int = 256) -> Encoded:
    """Tokenize ``prompt + answer + EOS`` with a completion-only loss mask (labels -100 on the prompt).

    The split follows the evaluator (``tailored.evaluate.encode_request``, lm-evaluation-harness): trailing
    whitespace of the prompt moves to the answer, and the answer tokens are those that ``enc(prompt +
    answer)`` adds after ``enc(prompt)``, so training sees the tokens the evaluator scores. The tokenizer's
    leading special tokens (a BOS) start the sequence. Too long a sequence loses prompt tokens from the left
    (the BOS and the end of the prompt, next to the answer, are kept); an answer longer than the whole
    budget is cut on the right.
    """
    prompt, answer = move_trailing_space(example.prompt, example.answer)
    lead = leading_special_ids(tokenizer)
    prompt_ids = encode_text(tokenizer, prompt)
    whole = encode_text(tokenizer, prompt + answer)
    if whole[: len(prompt_ids)] == prompt_ids and len(whole) > len(prompt_ids):
        answer_ids = whole[len(prompt_ids):]
    else:  # the tokenizer merged across the boundary: tokenize the answer on its own
        answer_ids = encode_text(tokenizer, answer)
    if not answer_ids:
        raise ValueError(f"example {example.source!r} has an empty answer: there is nothing to train on")
    target_ids = answer_ids + [tokenizer.eos_token_id]
    dropped = 0
    budget = max_seq_len - len(lead) - 1  # keep at least one context token before the first answer token
    if budget < 1:
        raise ValueError(f"max_seq_len {max_seq_len} leaves no room for an answer after {len(lead)} special tokens")
    if len(target_ids) > budget:
        dropped += len(target_ids) - budget
        target_ids = target_ids[:budget]
    room = max_seq_len - len(lead) - len(target_ids)
    if len(prompt_ids) > room:
        dropped += len(prompt_ids) - room
        prompt_ids = prompt_ids[len(prompt_ids) - room:]
    prompt_ids = lead + prompt_ids
    if not prompt_ids:
        raise ValueError(f"example {example.source!r} has an empty prompt: the first answer token needs a context")
    return Encoded(tuple(prompt_ids) + tuple(target_ids), (IGNORE,) * len(prompt_ids) + tuple(target_ids), dropped)


def loss_mask(encoded: Encoded) -> list[bool]:
    """True on the tokens the loss is computed on: exactly the answer tokens and the closing EOS.

    (Whitespace at the end of a prompt counts as the answer's, as in ``encode``.)
    """
    return [lab != IGNORE for lab in encoded.labels]


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``labels``, each (batch, longest).

    Right padding keeps every sequence at positions 0..len-1, as when it is scored alone.
    """
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e)] = torch.tensor(e.input_ids)
        labels[i, : len(e)] = torch.tensor(e.labels)
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
