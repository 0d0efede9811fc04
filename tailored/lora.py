"""Recover a pruned model with LoRA: generic (instruction data) or tailored (the task's own prompt).

LoRA (Hu et al., 2021) freezes every weight ``W`` of the model and learns a low-rank update beside it::

    h = W x + (alpha / r) * B A x        A: (r, d_in), B: (d_out, r), B = 0 at the start

so a few million parameters (rank 8 on all seven projections of every block) move a pruned model back
towards what it could do. Tailored-LLaMA's point is *what* it is tuned on: the task's training split
written with the task-specific prompt the model is later evaluated with ("tailored"), against generic
instruction data (LLM-Pruner's Alpaca recipe, "generic").

The recipe follows Tailored-LLaMA's ``*_fine_tune.py`` scripts (rank 8, alpha 16, dropout 0.1, the seven
q/k/v/o/gate/up/down projections, AdamW at 1e-4, cosine schedule with warm-up, loss on the answer only).
Two things differ on purpose:

- **No checkpoint is chosen on evaluation data.** The paper (and LLM-Pruner) kept the checkpoint with the
  lowest loss on the evaluation split (``load_best_model_at_end``). Here the last checkpoint is kept, or,
  with ``select="validation"``, the best one on a *validation* part of the train split that is disjoint
  from both the training subset and the evaluated examples (``train_and_validation``).
- **A fixed budget** of optimizer steps (or trained tokens) instead of 30 epochs, so that runs with 50 and
  500 training examples cost the same and a class run fits in minutes on a laptop.

The training loop is plain PyTorch (no HF ``Trainer``): ~60 lines to read. It saves the adapter in PEFT
format with its optimizer, schedule and random state every ``save_every`` steps (safetensors + JSON, never
pickles), and a rerun with the same ``out_dir`` continues from the last saved step instead of restarting::

    train, val = train_and_validation("boolq", n=500, n_validation=100)
    result = train_lora(model, tokenizer, train, LoraSettings(max_steps=40), run_dir / "adapters/boolq",
                        validation=val)
    merged = merge(result.model)           # plain model, saved with checkpoint.save_pruned
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tailored.anatomy import preserved, set_checkpointing, weights_fingerprint
from tailored.artifacts import read_json, write_json
from tailored.data import load_task
from tailored.lock import pid_alive
from tailored.prompts import get_prompt

# training tokenizes exactly as evaluation scores: the same contract, so the two can never drift apart
from tailored.tokens import encode as encode_text
from tailored.tokens import leading_special_ids, move_trailing_space

IGNORE = -100  # the label of a token the loss skips (PyTorch's cross_entropy ignore_index)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("auto", "bf16", "fp32")
SELECTIONS = ("last", "validation")
DISTILL_TOKENS = ("answer", "all")
METRICS_FILE = "train_metrics.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# The divergence rule (see ``divergence``): the smoothing window of the blow-up test, how many steps pinned
# at ln(vocab) make a collapse, and how close (nats) counts as "at" it.
SMOOTHING_STEPS = 5
COLLAPSE_STEPS = 3
UNIFORM_TOLERANCE = 1e-3

# A generic instruction template (Alpaca-like sections); the answer is the text after "### Response:\n".
GENERIC_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
GENERIC_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


# ============================================================================================ settings
@dataclass(frozen=True)
class LoraSettings:
    """Everything that decides a LoRA run. Defaults: Tailored-LLaMA's recipe, with a class-sized budget.

    Budget: ``max_steps`` optimizer steps of ``batch_size`` sequences each (split into forward passes of
    ``micro_batch_size`` to bound memory; the loss is the mean over the answer tokens of the whole batch,
    so the split does not change the update). With ``max_tokens``, training also stops once that many
    tokens (prompt + answer, padding excluded) have been trained on; the schedule spans the steps that
    budget takes (known in advance: the data order is fixed by ``seed``).

    ``precision="auto"`` trains under bf16 autocast on a CUDA device that supports it, else in fp32.
    ``gradient_checkpointing`` recomputes each decoder layer in the backward pass instead of keeping its
    activations: about one more forward pass per step, for the memory of one layer's activations instead of
    all of them (the paper profile's 16 × 256 micro-batches at LLaMA-7B). It changes memory and time, not the
    result, so a run may be continued with it switched.

    Distillation (``distill`` > 0, with ``train_lora(..., teacher=dense_model)``): the loss becomes
    ``(1 − distill) · CE(answer) + distill · T² · KL(p_teacher,T ‖ p_student,T)``, the KL averaged over the
    ``distill_tokens`` positions of the batch (``"answer"``: those the LM loss uses; ``"all"``: every
    position, so the prompt's tokens teach too, at the same token budget). The teacher is the dense model
    the pruned one came from: recovery then aims at what the model could do, not only at the labels.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = PROJECTIONS
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05  # share of the steps with a linear warm-up (the paper: 100 steps)
    batch_size: int = 8  # sequences per optimizer step (the paper: 4 x 16 accumulated = 64)
    micro_batch_size: int | None = None  # sequences per forward pass; None: the whole batch at once
    max_steps: int = 100
    max_tokens: int | None = None
    max_seq_len: int = 256  # longer sequences lose prompt tokens from the left, never the answer
    max_grad_norm: float | None = 1.0
    precision: str = "auto"
    seed: int = 0
    save_every: int = 50  # steps between saved (resumable) checkpoints; also when validation loss is measured
    select: str = "last"  # which adapter out_dir ends with: the last one, or the best on validation loss
    gradient_checkpointing: bool = False  # recompute layer activations in the backward pass: less memory
    distill: float = 0.0  # weight of the KL to a teacher's next-token distribution (0: plain LM loss; 1: KL alone)
    temperature: float = 1.0  # softens both distributions in the KL (Hinton et al.); the KL is scaled by T²
    distill_tokens: str = "answer"  # where the KL is taken: the answer tokens, or every token ("all")

    def __post_init__(self):
        # Accept a list from YAML for the target modules, but keep the dataclass hashable.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise ValueError(f"LoraSettings: {msg}")

        if not isinstance(self.rank, int) or self.rank < 1:
            bad(f"rank {self.rank!r} must be a positive integer (the paper: 8)")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            bad(f"alpha {self.alpha!r} must be > 0: the update is scaled by alpha / rank (the paper: 16)")
        if not (0.0 <= self.dropout < 1.0):
            bad(f"dropout {self.dropout!r} is outside [0, 1): it is the probability of zeroing a LoRA input")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            bad(f"target_modules {self.target_modules!r} must name at least one module, e.g. {PROJECTIONS}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            bad(f"lr {self.lr!r} must be a finite number > 0 (the paper: 1e-4)")
        if self.weight_decay < 0:
            bad(f"weight_decay {self.weight_decay!r} must be >= 0")
        if not (0.0 <= self.warmup_ratio < 1.0):
            bad(f"warmup_ratio {self.warmup_ratio!r} is outside [0, 1): it is the share of steps warming up")
        for name in ("batch_size", "max_steps", "max_seq_len", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                bad(f"{name} {value!r} must be a positive integer")
        if self.max_seq_len < 2:
            bad(f"max_seq_len {self.max_seq_len} is too short: a context token and an answer token are needed")
        if self.micro_batch_size is not None and not (
                isinstance(self.micro_batch_size, int) and 1 <= self.micro_batch_size <= self.batch_size):
            bad(f"micro_batch_size {self.micro_batch_size!r} must be between 1 and batch_size ({self.batch_size})")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad(f"max_tokens {self.max_tokens!r} must be a positive integer or None (no token budget)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad(f"max_grad_norm {self.max_grad_norm!r} must be > 0 or None (no clipping)")
        if self.precision not in PRECISIONS:
            bad(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad(f"seed {self.seed!r} must be an integer >= 0")
        if self.select not in SELECTIONS:
            bad(f"select {self.select!r} is not one of {SELECTIONS}")
        if not isinstance(self.gradient_checkpointing, bool):
            bad(f"gradient_checkpointing {self.gradient_checkpointing!r} must be True or False")
        if not (isinstance(self.distill, (int, float)) and 0.0 <= self.distill <= 1.0):
            bad(f"distill {self.distill!r} is outside [0, 1]: it is the weight of the KL to the teacher "
                "(0: the plain LM loss, 1: the KL alone)")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and math.isfinite(self.temperature)):
            bad(f"temperature {self.temperature!r} must be a finite number > 0 (1: the distributions as they are)")
        if self.distill_tokens not in DISTILL_TOKENS:
            bad(f"distill_tokens {self.distill_tokens!r} is not one of {DISTILL_TOKENS}")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, d: dict) -> LoraSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LoraSettings: unknown key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**d)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 on a CUDA device that supports it (``"auto"``, ``"bf16"``); ``None`` means plain fp32."""
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        if self.precision == "bf16" and not cuda_bf16:
            raise ValueError(f"precision 'bf16' needs a CUDA device with bf16 support, the model is on {device}; "
                             "use precision='auto' (fp32 there)")
        return torch.bfloat16 if self.precision != "fp32" and cuda_bf16 else None


# ====================================================================================== training data
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


# ========================================================================================= tokenizing
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


def completion_loss(model, batch: dict[str, torch.Tensor], reduction: str = "sum") -> tuple[torch.Tensor, int]:
    """Cross-entropy of the answer tokens: (sum or mean over them, number of answer tokens).

    The LM head is applied to the answer positions only: with a 49k vocabulary, logits for every prompt
    token of a (8, 256) batch would take 400 MB and a fifth of the compute, to be thrown away.
    (Right for LLaMA-family models, whose logits are ``lm_head(final hidden state)``.)
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).last_hidden_state  # (batch, seq, hidden)
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    answer = targets != IGNORE  # (batch, seq - 1)
    logits = head(hidden[:, :-1][answer]).float()  # (n_answer_tokens, vocab)
    loss = F.cross_entropy(logits, targets[answer], reduction=reduction)
    return loss, int(answer.sum())


def distillation_loss(model, teacher, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                      tokens: str = "answer") -> tuple[torch.Tensor, int]:
    """Summed KL(p_teacher ‖ p_student) at temperature T, times T², over the chosen positions; and their count.

    ``tokens="answer"``: the positions ``completion_loss`` uses (those predicting an answer token);
    ``"all"``: every position that predicts a real (not padding) next token. Logits of both models are
    taken at those positions only, as in ``completion_loss``; the teacher runs without gradients.
    """
    _, kl, n = _student_losses(model, teacher, batch, temperature, tokens, with_ce=False)
    return kl, n


def _student_losses(model, teacher, batch: dict[str, torch.Tensor], temperature: float, tokens: str,
                    with_ce: bool) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """(summed answer cross-entropy or None, summed KL · T², KL positions) from ONE pass of the student."""
    if tokens not in DISTILL_TOKENS:
        raise ValueError(f"tokens {tokens!r} is not one of {DISTILL_TOKENS}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    answer = targets != IGNORE  # (batch, seq - 1)
    where = answer if tokens == "answer" else batch["attention_mask"][:, 1:].bool()
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                use_cache=False).last_hidden_state[:, :-1]  # (batch, seq - 1, hidden)
    ce = F.cross_entropy(head(hidden[answer]).float(), targets[answer], reduction="sum") if with_ce else None
    student = head(hidden[where]).float() / temperature  # (n, vocab)
    with torch.no_grad():
        t_hidden = teacher.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         use_cache=False).last_hidden_state[:, :-1]
        target = F.log_softmax(teacher.get_output_embeddings()(t_hidden[where]).float() / temperature, -1)
    kl = F.kl_div(F.log_softmax(student, -1), target, log_target=True, reduction="sum")
    return ce, kl * temperature ** 2, int(where.sum())


def _distill_positions(encoded: Encoded, tokens: str) -> int:
    """How many positions of one example the KL is taken at (see ``distillation_loss``)."""
    return sum(loss_mask(encoded)) if tokens == "answer" else len(encoded) - 1


# ========================================================================================== schedule
def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up, then cosine decay.

    Every step gets a positive rate: warm-up steps k = 1..W get ``peak * k / W``, and the cosine runs from
    ``peak`` at step W + 1 down towards (not to) zero at step ``total``.
    """
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup - 1) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _batch_indices(step: int, n: int, batch_size: int, seed: int, _cache: dict | None = None) -> list[int]:
    """Which examples form step ``step`` (1-based): epochs of seeded permutations, read in order.

    A pure function of (step, seed): resuming needs no data-loader state.
    """
    cache = {} if _cache is None else _cache
    out = []
    for g in range((step - 1) * batch_size, step * batch_size):
        epoch, pos = divmod(g, n)
        if epoch not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=gen).tolist()
        out.append(cache[epoch][pos])
    return out


def plan_steps(encoded: Sequence[Encoded], settings: LoraSettings) -> int:
    """How many optimizer steps the run takes: ``max_steps``, or fewer when ``max_tokens`` runs out first."""
    if settings.max_tokens is None:
        return settings.max_steps
    cache: dict = {}
    seen = 0
    for step in range(1, settings.max_steps + 1):
        seen += sum(len(encoded[i]) for i in _batch_indices(step, len(encoded), settings.batch_size,
                                                             settings.seed, cache))
        if seen >= settings.max_tokens:
            return step
    return settings.max_steps


# ============================================================================================ results
@dataclass(frozen=True)
class TrainResult:
    """What a LoRA run did. ``model`` is the trained ``PeftModel`` (not saved in the JSON)."""

    adapter_dir: Path
    steps: int
    tokens: int
    train_s: float  # seconds spent in forward/backward/update (tokens_per_s divides by this)
    wall_s: float  # whole run including validation and saving, summed over resumed parts
    tokens_per_s: float
    losses: tuple[tuple[int, float], ...]  # (step, training loss)
    validation: tuple[tuple[int, float], ...] = ()  # (step, validation loss)
    selected_step: int = 0
    resumed_from: int = 0  # step the last call started at (0: from scratch)
    n_examples: int = 0
    trainable_params: int = 0
    settings: LoraSettings = field(default_factory=LoraSettings)
    model: Any = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d["settings"] = self.settings.to_dict()
        d["losses"] = [list(x) for x in self.losses]
        d["validation"] = [list(x) for x in self.validation]
        return d

    @classmethod
    def from_dict(cls, d: dict, model=None) -> TrainResult:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}  # train_metrics.json also holds the data fingerprint
        d["adapter_dir"] = Path(d["adapter_dir"])
        d["settings"] = LoraSettings.from_dict(d["settings"])
        d["losses"] = tuple((int(s), float(v)) for s, v in d["losses"])
        d["validation"] = tuple((int(s), float(v)) for s, v in d["validation"])
        return cls(**d, model=model)


def read_train_metrics(out_dir: str | Path) -> TrainResult:
    """The ``TrainResult`` of a finished run, from its ``train_metrics.json`` (for figures and tables)."""
    result = TrainResult.from_dict(read_json(Path(out_dir) / METRICS_FILE))
    return dataclasses.replace(result, adapter_dir=Path(out_dir))  # where it is now, if the run moved


# ============================================================================================= PEFT
def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")


def add_lora(model, settings: LoraSettings):
    """Wrap ``model`` with fresh LoRA adapters (A random under ``settings.seed``, B zero): a ``PeftModel``."""
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ValueError("the model already carries LoRA adapters; pass the base (pruned) model, "
                         "or merge(model) first to tune on top of merged weights")
    if any(hasattr(m, "lora_A") for m in model.modules()):
        raise ValueError("the model already carries LoRA layers (train_lora adds them in place): load the "
                         "(pruned) model afresh for each run, e.g. with checkpoint.load_pruned")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in settings.target_modules if t not in present]
    if missing:
        raise ValueError(f"target_modules {missing} are not modules of {type(model).__name__}; "
                         f"LLaMA-family models have {PROJECTIONS}")
    torch.manual_seed(settings.seed)
    return get_peft_model(model, lora_config(settings))


def load_adapter(model, adapter_dir: str | Path):
    """Put the adapter saved in ``adapter_dir`` (PEFT format) on ``model``: a ``PeftModel`` in eval mode.

    ``model`` must be the same (pruned) model the adapter was trained on: the LoRA shapes follow its
    per-layer widths. ``adapter_dir`` is a finished run's ``out_dir`` or one of its ``checkpoint-<step>``.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        hint = " (the run has not finished; its checkpoint-<step> folders hold adapters)" if adapter_dir.is_dir() else ""
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: not a saved LoRA adapter{hint}")
    if not (adapter_dir / "adapter_model.safetensors").exists():  # PEFT would fall back to a pickle
        pickled = [p.name for p in adapter_dir.glob("adapter_model.*")]
        if pickled:
            raise ValueError(f"{adapter_dir} holds {', '.join(pickled)}, a pickle, which can run code when loaded: "
                             "tailored loads adapters from adapter_model.safetensors only. Train the adapter again, "
                             "or convert it once where you trust it (load it with PEFT, save_pretrained it)")
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_model.safetensors: the adapter's weights are missing")
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    peft_model.eval()
    return peft_model


def merge(model):
    """Fold the LoRA update into the weights, ``W <- W + (alpha / r) B A``: a plain model, no PEFT layers.

    The result has the pruned shapes and no adapter, so ``checkpoint.save_pruned`` saves it as any pruned
    model, and it runs as fast as the model it was tuned from.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ValueError(f"merge expects a PeftModel (from train_lora or load_adapter), got {type(model).__name__}")
    return model.merge_and_unload()


# ======================================================================================== checkpoints
def _trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _fingerprint(encoded: Sequence[Encoded]) -> str:
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()[:16]


def _write_adapter(peft_model, dest: Path) -> None:
    """``save_pretrained`` into a temporary folder, then rename: a reader never sees half an adapter."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    _swap_dir(tmp, dest)


def _swap_dir(tmp: Path, dest: Path) -> None:
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def _save_checkpoint(out_dir: Path, step: int, peft_model, optimizer, state: dict) -> Path:
    """``out_dir/checkpoint-<step>/``: adapter (PEFT), optimizer (safetensors + JSON), RNG, trainer state.

    Written into a temporary folder and renamed, then older checkpoints are removed: a crash at any point
    leaves the last complete checkpoint in place.
    """
    dest = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    # Optimizer: its tensors (per parameter: step, exp_avg, exp_avg_sq) in safetensors, the rest in JSON.
    sd = optimizer.state_dict()
    tensors = {f"{idx}.{key}": value.detach().contiguous().cpu()
               for idx, per_param in sd["state"].items() for key, value in per_param.items()}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])} for g in sd["param_groups"]]
    write_json(tmp / "optimizer.json", {"param_groups": groups,
                                        "param_names": [n for n, _ in _trainable(peft_model)]})
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(rng, str(tmp / "rng.safetensors"))
    write_json(tmp / "trainer_state.json", state)
    _swap_dir(tmp, dest)
    for old in out_dir.glob("checkpoint-*"):
        if old != dest and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return dest


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step that is complete, or None."""
    found = [p for p in Path(out_dir).glob("checkpoint-*")
             if p.is_dir() and (p / "trainer_state.json").exists() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _load_checkpoint(ckpt: Path, peft_model, optimizer) -> dict:
    _load_adapter_weights(peft_model, ckpt)
    meta = read_json(ckpt / "optimizer.json")
    names = [n for n, _ in _trainable(peft_model)]
    if meta["param_names"] != names:
        raise ValueError(f"{ckpt} was saved for other trainable parameters than this model's LoRA layers: "
                         "was it trained on another (pruned) model? Use a fresh out_dir.")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(ckpt / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return read_json(ckpt / "trainer_state.json")


def _changed(saved: dict, settings: LoraSettings, fingerprint: str, base: str) -> str | None:
    """Why a run saved in ``out_dir`` is not the one asked for now (``None``: it is, continue or reuse it).

    A run is the same when its settings, its training examples and its base model's weights are: a checkpoint
    re-pruned with another estimator is another base, even under the same name. Settings that change memory
    and time but not the result (``save_every``, ``gradient_checkpointing``) may differ; so may a setting the
    saved run predates, when it has its default value now.
    """
    now = settings.to_dict()
    free = {"save_every", "gradient_checkpointing"}
    defaults = LoraSettings.__dataclass_fields__
    diff = sorted(k for k in now if k not in free and saved["settings"].get(k, defaults[k].default) != now[k])
    if diff:
        return (f"other settings ({', '.join(diff)}: {({k: saved['settings'].get(k) for k in diff})} there, "
                f"{({k: now[k] for k in diff})} now)")
    if saved["data_fingerprint"] != fingerprint:
        return "other training examples"
    if saved.get("base_fingerprint", base) != base:
        return "another base model (the pruned checkpoint's weights changed since)"
    return None


def _set_aside(out_dir: Path, reason: str) -> Path:
    """Move a stale run to ``<out_dir>.replaced`` (replacing an older one there), saying so: it is kept for a
    look, never read again, and ``out_dir`` trains afresh."""
    aside = out_dir.with_name(out_dir.name + ".replaced")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(out_dir, aside)
    warnings.warn(f"{out_dir} held a LoRA run made from {reason}: it is kept at {aside}, and the run is trained "
                  "afresh", stacklevel=3)
    return aside


# =========================================================================================== divergence
class TrainingDiverged(FloatingPointError):
    """LoRA training blew up or collapsed (see ``divergence``); the adapter was not installed."""


def flattened_at(validation: Sequence[tuple[int, float]], rel: float = 0.01) -> int | None:
    """The step where a validation curve stopped improving: the first point that no later point beats by more
    than ``rel`` (relative). The last step means the curve was still improving when the budget ran out;
    ``None`` without a curve."""
    points = list(validation)
    for i, (step, loss) in enumerate(points):
        if all(later >= loss * (1 - rel) for _, later in points[i + 1:]):
            return int(step)
    return None


def divergence(losses: Sequence[float], vocab_size: int, validation: float | None = None) -> str | None:
    """Why a LoRA run has diverged, or None: the rule ``train_lora`` applies after every step.

    ``losses`` are the training losses of steps 1..t (per answer token, nats), ``validation`` the validation
    loss measured at a checkpoint. With

        L1 = the loss of step 1: the model as given (LoRA's B is zero until the first update)
        S  = the mean of the last 5 step losses (of all of them before step 5)
        U  = ln(vocab_size): the loss of a model that gives every token the same probability

    the run has diverged when

    1. the last loss (or the validation loss) is NaN or infinite;
    2. it blew up: S > max(2·L1, L1 + 1), the smoothed loss more than doubled *and* rose by over a nat;
    3. it collapsed to uniform: the last 3 losses all lie within 0.001 of U, while L1 was more than 0.1
       away from U (an adapter that makes every logit equal; ``lr: 1000`` does this, to 1e-6);
    4. its validation loss lies within 0.001 of U, while L1 was more than 0.1 below U.

    Healthy runs stay clear: batches differ by tens of percent, so a 5-step mean does not double, and a
    real loss never sits at U to a thousandth. A random model (the smoke profile's) starts at U, so rules
    3 and 4 leave it alone; it still fails rules 1 and 2 when it blows up.
    """
    if not losses:
        return None
    last, first, uniform = losses[-1], losses[0], math.log(vocab_size)
    if not math.isfinite(last):
        return f"the training loss is {last}"
    smoothed = sum(losses[-SMOOTHING_STEPS:]) / len(losses[-SMOOTHING_STEPS:])
    if smoothed > max(2 * first, first + 1):
        return (f"the training loss blew up: {smoothed:.3g} (mean of the last {len(losses[-SMOOTHING_STEPS:])} "
                f"steps) against {first:.3g} at step 1")
    pinned = losses[-COLLAPSE_STEPS:]
    if (abs(first - uniform) > 0.1 and len(pinned) == COLLAPSE_STEPS
            and all(abs(v - uniform) < UNIFORM_TOLERANCE for v in pinned)):
        return (f"the model collapsed to a uniform guess: the last {COLLAPSE_STEPS} losses are ln({vocab_size}) = "
                f"{uniform:.4f}, every token equally likely (step 1: {first:.3g})")
    if validation is not None:
        if not math.isfinite(validation):
            return f"the validation loss is {validation}"
        if first < uniform - 0.1 and abs(validation - uniform) < UNIFORM_TOLERANCE:
            return (f"the model collapsed to a uniform guess: the validation loss is ln({vocab_size}) = "
                    f"{uniform:.4f}, every token equally likely (step 1: {first:.3g})")
    return None


# ============================================================================================ training
@torch.no_grad()
def validation_loss(model, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 8,
                    autocast: torch.dtype | None = None) -> float:
    """Mean completion-only loss per answer token over ``encoded`` (eval mode: no dropout)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with preserved(model):
        model.eval()
        for i in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[i: i + batch_size], pad_id).items()}
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss, n = completion_loss(model, batch, reduction="sum")
            total, count = total + float(loss), count + n
    return total / max(count, 1)


def validation_losses(model, tokenizer, by_task: dict[str, Sequence[TrainExample]],
                      settings: LoraSettings | None = None) -> dict[str, float]:
    """Loss per answer token on each task's validation examples, and pooled over all of them (``"all"``,
    weighted by answer tokens). The held-out signal notebook 04 compares recipes with."""
    settings = settings or LoraSettings()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = {t: [encode(tokenizer, e, settings.max_seq_len) for e in exs] for t, exs in by_task.items()}
    out = {t: validation_loss(model, e, pad, settings.micro_batch_size or settings.batch_size,
                              settings.autocast_dtype(device)) for t, e in encoded.items()}
    counts = {t: sum(sum(loss_mask(x)) for x in e) for t, e in encoded.items()}
    return out | {"all": sum(out[t] * counts[t] for t in out) / max(1, sum(counts.values()))}


def _world() -> tuple[int, int]:
    """``(rank, processes)`` of a data-parallel run (``accelerate launch``, see ``tailored.lora_launch``);
    ``(0, 1)`` in a plain process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    """Wait for every process of a data-parallel run (the first one writes, the others then read)."""
    if _world()[1] > 1:
        torch.distributed.barrier()


def _same_start(params: Sequence[torch.nn.Parameter]) -> None:
    """Every process starts from process 0's adapter weights (LoRA's random A matrices)."""
    if _world()[1] > 1:
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def train_lora(model, tokenizer, examples: Sequence[TrainExample], settings: LoraSettings | None = None,
               out_dir: str | Path = "adapter", validation: Sequence[TrainExample] | None = None,
               progress: bool = True, stop_after: int | None = None, teacher=None) -> TrainResult:
    """Train LoRA adapters on ``examples`` with a completion-only loss; save them to ``out_dir``.

    A plain loop: every step takes ``batch_size`` examples (seeded epochs), sets the scheduled learning
    rate, accumulates the answer-token loss over micro-batches, clips the gradient, and updates with AdamW.
    Every ``save_every`` steps a resumable checkpoint is written (and the validation loss measured, if
    ``validation`` is given); at the end ``out_dir`` holds the adapter (PEFT format: ``load_adapter``) and
    ``train_metrics.json``. A rerun with an unfinished ``out_dir`` continues from its last checkpoint; with a
    finished one it loads the adapter and returns at once. Either only if the saved run was made with the same
    settings, the same examples and the same base weights (``weights_fingerprint``); otherwise the old run is
    moved to ``<out_dir>.replaced``, with a warning, and the run trains afresh.

    ``stop_after`` leaves after that many steps, as an interruption would, keeping the schedule of the full
    run (for tests and for splitting a long run over sessions). A diverged run (a NaN loss, a blow-up or a
    collapse to a uniform guess: ``divergence``) raises ``TrainingDiverged`` naming the step, the loss and
    the learning rate; its adapter is never installed and its checkpoints are removed. Leftovers of a killed
    run in ``out_dir`` are removed first (``_clean_leftovers``). ``model`` is wrapped in place
    (``get_peft_model``); the trained ``PeftModel`` is ``result.model``.
    run (for tests and for splitting a long run over sessions). A non-finite loss raises
    ``FloatingPointError`` naming the step. ``model`` is wrapped in place (``get_peft_model``); the trained
    ``PeftModel`` is ``result.model``.

    ``teacher``: the model to distill from when ``settings.distill`` > 0 (the dense model; frozen, eval
    mode, on the same device and tokenizer). The validation loss stays the answer-token cross-entropy, so
    plain and distilled runs are measured alike.

    Data parallel: started by ``accelerate launch`` (``tailored.lora_launch``), every process runs this same
    function on the same examples. Each takes every n-th row of each step's batch, the gradients are summed
    over the processes, and every process makes the same update, so a step is the one-process step up to the
    order of floating-point sums. Process 0 alone writes to ``out_dir``.
    """
    settings = settings or LoraSettings()
    out_dir = Path(out_dir)
    if not examples:
        raise ValueError("no training examples: build them with tailored_examples(...) or generic_examples(...)")
    if settings.select == "validation" and not validation:
        raise ValueError("select='validation' needs validation examples (a part of the train split, "
                         "see train_and_validation); the evaluation set must not choose the checkpoint")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the answer is trained to end with one")
    if settings.distill > 0 and teacher is None:
        raise ValueError(f"settings.distill={settings.distill} needs a teacher: train_lora(..., teacher=dense_model)")
    if teacher is not None:
        if teacher is model:
            raise ValueError("the teacher is the model being trained; pass the dense model it was pruned from")
        teacher.eval()
        teacher.requires_grad_(False)
    t_start = time.perf_counter()
    rank, _ = _world()
    main = rank == 0  # the one process that writes out_dir
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [encode(tokenizer, ex, settings.max_seq_len) for ex in examples]
    val_encoded = [encode(tokenizer, ex, settings.max_seq_len) for ex in validation or ()]
    fingerprint = _fingerprint(encoded)
    total = plan_steps(encoded, settings)
    warmup = round(settings.warmup_ratio * total)
    autocast = settings.autocast_dtype(next(model.parameters()).device)

    base = weights_fingerprint(model)  # what the adapter is made for: reused only on these very weights
    peft_model = add_lora(model, settings)
    if settings.gradient_checkpointing:
        set_checkpointing(peft_model, True)
    params = [p for _, p in _trainable(peft_model)]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    vocab = peft_model.get_base_model().get_output_embeddings().weight.shape[0]
    if main:
        _clean_leftovers(out_dir)
    _barrier()

    def set_aside(reason: str) -> None:  # every process has read the old run before process 0 moves it
        _barrier()
        if main:
            _set_aside(out_dir, reason)
        _barrier()

    # ---- finished before? load and return; unfinished? continue from the last checkpoint; made from
    # anything else (settings, examples, base weights)? set it aside and train afresh
    if (out_dir / METRICS_FILE).exists():
        done = read_json(out_dir / METRICS_FILE)
        reason = _changed(done, settings, fingerprint, base)
        if reason is None:
            _load_adapter_weights(peft_model, out_dir)
            peft_model.eval()
            return dataclasses.replace(TrainResult.from_dict(done, model=peft_model), adapter_dir=out_dir)
        set_aside(reason)
    state = {"step": 0, "tokens": 0, "train_s": 0.0, "wall_s": 0.0, "losses": [], "validation": [],
             "best": None, "settings": settings.to_dict(), "data_fingerprint": fingerprint, "base_fingerprint": base,
             "total_steps": total}
    ckpt = latest_checkpoint(out_dir)
    if ckpt is not None:
        reason = _changed(read_json(ckpt / "trainer_state.json"), settings, fingerprint, base)
        if reason is not None:
            set_aside(reason)
            ckpt = None
    if ckpt is not None:
        state = _load_checkpoint(ckpt, peft_model, optimizer)
        if rank:  # the saved RNG is process 0's: the others draw their own dropout masks from here on
            torch.manual_seed(settings.seed + rank + 7919 * state["step"])
    else:
        _same_start(params)
        # dropout masks from here on are a function of the seed (and, data-parallel, of the process)
        torch.manual_seed(settings.seed + rank)
    resumed_from = state["step"]
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    def diverged(step: int, problem: str) -> TrainingDiverged:
        for old in [*out_dir.glob("checkpoint-*"), out_dir / "best"] if main else ():  # nothing to resume from
            shutil.rmtree(old, ignore_errors=True)
        return TrainingDiverged(
            f"LoRA training diverged at step {step} of {total} (lr {lr_at(step, total, warmup, settings.lr):.3g}): "
            f"{problem}. No adapter was installed in {out_dir}, and its checkpoints were removed. Lower the "
            f"learning rate (settings.lr={settings.lr:g}; the paper: 1e-4) or train in fp32 (precision='fp32'), "
            "then rerun")

    def save_and_validate(step: int, t0: float) -> None:
        if val_encoded:
            v = validation_loss(peft_model, val_encoded, pad_id, settings.micro_batch_size or settings.batch_size,
                                autocast)
            problem = divergence([x for _, x in state["losses"]], vocab, validation=v)
            if problem:
                raise diverged(step, problem)
            state["validation"].append([step, v])
            if state["best"] is None or v < state["best"][1]:
                state["best"] = [step, v]
                if main:
                    _write_adapter(peft_model, out_dir / "best")
        state["wall_s"] += time.perf_counter() - t0
        if main:
            _save_checkpoint(out_dir, step, peft_model, optimizer, state)
        _barrier()

    last = total if stop_after is None else min(total, stop_after)
    perms: dict = {}
    peft_model.train()
    bar = tqdm(total=total, initial=resumed_from, desc=f"LoRA {out_dir.name}", disable=not progress or not main,
               unit="step")
    t_part = t_start  # wall time is booked at each checkpoint, so a resumed run adds to it
    try:
        for step in range(resumed_from + 1, last + 1):
            t_step = time.perf_counter()
            lr = lr_at(step, total, warmup, settings.lr)
            rows = [encoded[i] for i in _batch_indices(step, len(encoded), settings.batch_size, settings.seed, perms)]
            loss = _train_step(peft_model, optimizer, rows, lr, settings, pad_id,
                               teacher=teacher if settings.distill > 0 else None)
            problem = divergence([x for _, x in state["losses"]] + [loss], vocab)
            if problem:
                raise diverged(step, problem)
            state["step"], state["tokens"] = step, state["tokens"] + sum(len(e) for e in rows)
            state["train_s"] += time.perf_counter() - t_step
            state["losses"].append([step, loss])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{state['tokens'] / max(state['train_s'], 1e-9):.0f}")
            if step % settings.save_every == 0 or step == last:
                save_and_validate(step, t_part)
                t_part = time.perf_counter()
    finally:
        bar.close()

    finished = state["step"] == total
    selected = state["step"]
    if finished:  # out_dir gets the chosen adapter, then the metrics (written last: the run is done)
        if settings.select == "validation" and state["best"] is not None:
            selected = state["best"][0]
            if main:
                _install_adapter(out_dir / "best", out_dir)
            _barrier()
            _load_adapter_weights(peft_model, out_dir)  # the returned model carries the chosen adapter too
        elif main:
            _install_adapter(latest_checkpoint(out_dir), out_dir)
    result = TrainResult(
        adapter_dir=out_dir, steps=state["step"], tokens=state["tokens"], train_s=state["train_s"],
        wall_s=state["wall_s"], tokens_per_s=state["tokens"] / max(state["train_s"], 1e-9),
        losses=tuple((s, v) for s, v in state["losses"]), validation=tuple((s, v) for s, v in state["validation"]),
        selected_step=selected, resumed_from=resumed_from, n_examples=len(examples),
        trainable_params=sum(p.numel() for p in params), settings=settings, model=peft_model)
    if finished and main:
        write_json(out_dir / METRICS_FILE, {**result.to_dict(), "data_fingerprint": fingerprint, "base_fingerprint": base})
        for old in [*out_dir.glob("checkpoint-*"), out_dir / "best"]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    peft_model.eval()
    return result


def _train_step(peft_model, optimizer, rows: Sequence[Encoded], lr: float, settings: LoraSettings,
                pad_id: int, teacher=None) -> float:
    """One optimizer step on ``rows``; returns the batch's loss (per answer token, or the mix of it with the
    KL per distilled position); NaN stops before updating."""
    device = next(peft_model.parameters()).device
    autocast = settings.autocast_dtype(device)
    micro = settings.micro_batch_size or settings.batch_size
    for group in optimizer.param_groups:
        group["lr"] = lr
    n_answer = sum(sum(loss_mask(e)) for e in rows)  # the loss is a mean over all answer tokens of the batch
    alpha = settings.distill if teacher is not None else 0.0
    n_kl = sum(_distill_positions(e, settings.distill_tokens) for e in rows) if alpha else 1
    rank, processes = _world()
    mine = rows[rank::processes]  # data parallel: every n-th row; the normalizers above count the whole batch
    total = 0.0
    bad = None
    for i in range(0, len(mine), micro):
        batch = {k: v.to(device) for k, v in collate(mine[i: i + micro], pad_id).items()}
        with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            if alpha > 0:
                ce_sum, kl_sum, _ = _student_losses(peft_model, teacher, batch, settings.temperature,
                                                    settings.distill_tokens, with_ce=alpha < 1)
                loss = alpha * kl_sum / n_kl + ((1 - alpha) * ce_sum / n_answer if ce_sum is not None else 0.0)
            else:
                loss_sum, _ = completion_loss(peft_model, batch, reduction="sum")
                loss = loss_sum / n_answer
        if not torch.isfinite(loss):
            bad = float(loss.detach())
            break
        loss.backward()
        total += float(loss.detach())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if processes > 1:  # sum the losses and gradients of every process's rows: the whole batch's
        status = torch.tensor([total, 0.0 if bad is None else 1.0], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(status)
        total, bad = float(status[0]), (float("nan") if status[1] > 0 else None)
        if bad is None:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            torch.distributed.all_reduce(flat)
            for p, g in zip(params, torch.split(flat, [g.numel() for g in grads])):
                p.grad = g.view_as(p).to(p.dtype)
    if bad is not None:
        optimizer.zero_grad(set_to_none=True)
        return bad
    if settings.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict  # peft is imported lazily: 5 s, and only training needs it

    set_peft_model_state_dict(peft_model, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))


def _clean_leftovers(out_dir: Path) -> None:
    """Remove what a killed run left in ``out_dir``, with a warning naming it.

    A kill during a save leaves its temporary folder or file (``.checkpoint-7.tmp-<pid>``,
    ``.adapter_model.safetensors.tmp-<pid>``, ``.best.old-<pid>``): removed once the process that wrote it is
    gone. A kill after a run finished but before it cleaned up leaves ``checkpoint-<step>`` and ``best``
    beside the installed adapter: removed when ``train_metrics.json`` (written last) says the run is done.
    """
    if not out_dir.is_dir():
        return
    gone = []
    for p in out_dir.iterdir():
        m = re.fullmatch(r"\..+\.(?:tmp|old)-(\d+)", p.name)
        if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            gone.append(p)
    if (out_dir / METRICS_FILE).exists():
        gone += [p for p in [*out_dir.glob("checkpoint-*"), out_dir / "best"] if p.is_dir()]
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if gone:
        warnings.warn(f"{out_dir}: removed what an interrupted run left behind: "
                      f"{', '.join(sorted(p.name for p in gone))}", stacklevel=3)


def _install_adapter(src: Path, out_dir: Path) -> None:
    """Copy an adapter's files into ``out_dir`` itself, each through a temporary file and a rename."""
    for name in ADAPTER_FILES:
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, out_dir / name)


# ========================================================================================= throughput
def measure_throughput(model, settings: LoraSettings | None = None, batch_size: int = 8, seq_len: int = 256,
                       steps: int = 3, warmup: int = 1) -> dict:
    """Tokens per second of one LoRA training step (forward, backward, AdamW) on random full-length tokens.

    For sizing a budget on the machine at hand: ``steps x batch_size x seq_len / tokens_per_s`` seconds.
    Answer-only loss on the last quarter of each sequence; ``settings.gradient_checkpointing`` is honoured.
    The model is returned to its state (adapters removed, train or eval mode and checkpointing as before).
    ``s_per_step`` is the median of the ``steps`` timed after ``warmup``.
    """
    settings = settings or LoraSettings()
    with preserved(model):
        times = _timed_steps(add_lora(model, settings), settings, batch_size, seq_len, steps, warmup)
    per_step = sorted(times)[len(times) // 2]
    device = next(model.parameters()).device
    return {"batch_size": batch_size, "seq_len": seq_len, "s_per_step": per_step,
            "tokens_per_s": batch_size * seq_len / per_step, "threads": torch.get_num_threads(),
            "device": str(device)}


def _timed_steps(peft_model, settings: LoraSettings, batch_size: int, seq_len: int, steps: int,
                 warmup: int) -> list[float]:
    """Seconds of each of ``steps`` LoRA training steps after ``warmup``, on random tokens; adapters removed after."""
    if settings.gradient_checkpointing:  # as train_lora does: the step measured is the step trained
        set_checkpointing(peft_model, True)
    device = next(peft_model.parameters()).device
    vocab = peft_model.get_base_model().get_output_embeddings().weight.shape[0]
    params = [p for _, p in _trainable(peft_model)]
    opt = torch.optim.AdamW(params, lr=settings.lr)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    labels = ids.clone()
    labels[:, : seq_len * 3 // 4] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    autocast = settings.autocast_dtype(device)
    peft_model.train()
    times = []
    try:
        for i in range(warmup + steps):
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss, n = completion_loss(peft_model, batch, reduction="mean")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t)
    finally:
        peft_model.unload()
    return times
