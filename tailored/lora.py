"""Recover a pruned model with LoRA: the training run (settings, schedule, losses, divergence, the loop).

Tailored-LLaMA's point is *what* a pruned model is tuned on: the task's training split written with the
task-specific prompt the model is later evaluated with ("tailored"), against generic instruction data
(LLM-Pruner's Alpaca recipe, "generic"); ``tailored.recovery_data`` makes both. The adapters themselves
(PEFT: add, load, merge) are ``tailored.adapters``; the resumable saved state of a run is
``tailored.snapshots``.

The recipe follows Tailored-LLaMA's ``*_fine_tune.py`` scripts (rank 8, alpha 16, dropout 0.1, the seven
q/k/v/o/gate/up/down projections, AdamW at 1e-4, cosine schedule with warm-up, loss on the answer only).
Two things differ on purpose:

- **No adapter is chosen on evaluation data.** The paper (and LLM-Pruner) kept the saved model with the
  lowest loss on the evaluation split (``load_best_model_at_end``). Here the last one is kept, or, with
  ``select="validation"``, the best one on a *validation* part of the train split that is disjoint from
  both the training subset and the evaluated examples (``recovery_data.train_and_validation``).
- **A fixed budget** of optimizer steps (or trained tokens) instead of 30 epochs, so that runs with 50 and
  500 training examples cost the same and a class run fits in minutes on a laptop.

The training loop is plain PyTorch (no HF ``Trainer``): a few short functions to read. It saves a snapshot
(the adapter in PEFT format with its optimizer, schedule and random state; safetensors + JSON, never pickles)
every ``save_every`` steps, and a rerun with the same ``out_dir`` continues from the last one instead of
restarting::

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
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tailored.adapters import (
    ADAPTER_FILES,
    PROJECTIONS,
    add_lora,
    install_adapter,
    load_adapter_weights,
    trainable,
    write_adapter,
)
from tailored.anatomy import preserved, set_recompute_activations, weights_fingerprint
from tailored.artifacts import check_seal, read_json, seal, write_json
from tailored.records import from_dict
from tailored.recovery_data import IGNORE, Encoded, TrainExample, collate, encode, loss_mask
from tailored.rundir import retire, run_dir_of
from tailored.snapshots import (
    BEST,
    STATE,
    clean_leftovers,
    discard,
    latest_snapshot,
    load_snapshot,
    save_snapshot,
    snapshot_problem,
)

PRECISIONS = ("auto", "bf16", "fp32")
SELECTIONS = ("last", "validation")
DISTILL_TOKENS = ("answer", "all")
METRICS_FILE = "train_metrics.json"  # written last (then the folder's seal): a run with it is finished
# The divergence rule (see ``divergence``): the smoothing window of the blow-up test, how many steps pinned
# at ln(vocab) make a collapse, and how close (nats) counts as "at" it.
SMOOTHING_STEPS = 5
COLLAPSE_STEPS = 3
UNIFORM_TOLERANCE = 1e-3


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
    ``recompute_activations`` recomputes each decoder layer in the backward pass instead of keeping its
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
    save_every: int = 50  # steps between saved (resumable) snapshots; also when validation loss is measured
    select: str = "last"  # which adapter out_dir ends with: the last one, or the best on validation loss
    require_learning: bool = True  # refuse an adapter whose validation loss is not below the base model's
    recompute_activations: bool = False  # recompute layer activations in the backward pass: less memory
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
        if not isinstance(self.recompute_activations, bool):
            bad(f"recompute_activations {self.recompute_activations!r} must be True or False")
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
        return from_dict(cls, d)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 on a CUDA device that supports it (``"auto"``, ``"bf16"``); ``None`` means plain fp32."""
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        if self.precision == "bf16" and not cuda_bf16:
            raise ValueError(f"precision 'bf16' needs a CUDA device with bf16 support, the model is on {device}; "
                             "use precision='auto' (fp32 there)")
        return torch.bfloat16 if self.precision != "fp32" and cuda_bf16 else None


# ============================================================================================== losses
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


# ============================================================================================ schedule
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


# ============================================================================================= results
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


# ============================================================================== the same run, or another
def _fingerprint(encoded: Sequence[Encoded]) -> str:
    h = hashlib.sha256()
    for e in encoded:
        h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()[:16]


def _changed(saved: dict, settings: LoraSettings, fingerprint: str, base: str) -> str | None:
    """Why a run saved in ``out_dir`` is not the one asked for now (``None``: it is, continue or reuse it).

    A run is the same when its settings, its training examples and its base model's weights are: a pruned
    checkpoint re-pruned with another estimator is another base, even under the same name. Settings that
    change memory and time but not the result (``save_every``, ``recompute_activations``) may differ; so may
    a setting the saved run predates, when it has its default value now. A setting this version no longer
    knows (a run saved before a rename) makes it another run: it is trained again rather than misread.
    """
    now = settings.to_dict()
    retired = sorted(set(saved["settings"]) - set(now))
    if retired:
        return f"settings this version does not know ({', '.join(retired)}: an older version of tailored)"
    free = {"save_every", "recompute_activations"}
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
    """Move a stale or damaged run to ``retired/<its path>`` of its run directory (``rundir.retire``, where replaced
    checkpoints go too; replacing an older one there), saying so in a warning: it is kept for a look, never read
    again, and ``out_dir`` trains afresh. ``reason``: "made from <what differs>", or what is damaged
    (``check_seal``'s sentence, naming the file)."""
    return retire(run_dir_of(out_dir), out_dir, f"it held a LoRA run {reason}; the run is trained afresh")


# ========================================================================================== divergence
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


class NothingLearned(TrainingDiverged):
    """The chosen adapter's validation loss is not below the base model's, or is a uniform guess (see
    ``not_learned``): it was not installed."""


def not_learned(validation: float, base: float, vocab_size: int) -> str | None:
    """Why an adapter whose validation loss is ``validation`` learned nothing, or None: the rule applied before
    an adapter is installed (``base``: the same loss of the model without the adapter; nats per answer token).

    Refused when

    1. ``validation`` is not below ``base``: the adapter made the held-out answers no likelier (or less likely);
    2. ``validation`` lies within 0.001 of U = ln(vocab_size): every token equally likely.

    Rule 2 matters where the base itself is near U, as a random model is (the smoke profile's: base U − 0.025,
    so an adapter collapsed to U, 0.025 *above* it, is caught by rule 1 too; two steps of lr 0.01 reach U − 0.29).
    A collapse pins the loss at U to 1e-5; a model that learned a little moves it by hundredths at least.
    """
    uniform = math.log(vocab_size)
    if not validation < base:
        return f"its validation loss {validation:.4f} is not below the base model's {base:.4f}"
    if abs(validation - uniform) < UNIFORM_TOLERANCE:
        return (f"its validation loss {validation:.4f} is ln({vocab_size}) = {uniform:.4f}, a uniform guess "
                f"(the base model's: {base:.4f})")
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
    Every ``save_every`` steps a resumable snapshot is written (and the validation loss measured, if
    ``validation`` is given); at the end ``out_dir`` holds the adapter (PEFT format: ``load_adapter``) and
    ``train_metrics.json``. A rerun with an unfinished ``out_dir`` continues from its last snapshot; with a
    finished one it loads the adapter and returns at once. Either only if the saved run was made with the same
    settings, the same examples and the same base weights (``weights_fingerprint``); otherwise the old run is
    moved to ``retired/`` (``rundir.retire``), with a warning, and the run trains afresh.

    ``stop_after`` leaves after that many steps, as an interruption would, keeping the schedule of the full
    run (for tests and for splitting a long run over sessions). A diverged run (a NaN loss, a blow-up or a
    collapse to a uniform guess: ``divergence``) raises ``TrainingDiverged`` naming the step, the loss and
    the learning rate; its adapter is never installed and its snapshots are removed. So is an adapter that
    learned nothing (``NothingLearned``, a ``TrainingDiverged``: its validation loss not below the base
    model's, or a uniform guess; see ``not_learned``; checked where validation examples are given). The
    installed folder is sealed (``SHA256SUMS``), and a finished run is reused only while every byte is as
    written (a damaged one is set aside and trained again). Leftovers of a killed
    run in ``out_dir`` are removed first (``snapshots.clean_leftovers``). ``model`` is wrapped in place
    (``get_peft_model``); the trained ``PeftModel`` is ``result.model``.

    ``teacher``: the model to distill from when ``settings.distill`` > 0 (the dense model; frozen, eval
    mode, on the same device and tokenizer). The validation loss stays the answer-token cross-entropy, so
    plain and distilled runs are measured alike.

    Data parallel: started by ``accelerate launch`` (``tailored.lora_launch``), every process runs this same
    function on the same examples. Each takes every n-th row of each step's batch, the gradients are summed
    over the processes, and every process makes the same update, so a step is the one-process step up to the
    order of floating-point sums. Process 0 alone writes to ``out_dir``.
    """
    settings = settings or LoraSettings()
    _check_run(model, tokenizer, examples, settings, validation, teacher)
    run = _Run(model, tokenizer, examples, settings, Path(out_dir), validation)
    done = run.finished_before()
    if done is not None:
        return done
    run.resume_or_start()
    run.train(run.total if stop_after is None else min(run.total, stop_after),
              teacher if settings.distill > 0 else None, progress)
    return run.finish(len(examples))


def _check_run(model, tokenizer, examples: Sequence[TrainExample], settings: LoraSettings,
               validation: Sequence[TrainExample] | None, teacher) -> None:
    """Refuse a run that cannot be trained as asked, before anything is touched; freeze the teacher."""
    if not examples:
        raise ValueError("no training examples: build them with tailored_examples(...) or generic_examples(...)")
    if settings.select == "validation" and not validation:
        raise ValueError("select='validation' needs validation examples (a part of the train split, "
                         "see train_and_validation); the evaluation set must not choose the adapter")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; the answer is trained to end with one")
    if settings.distill > 0 and teacher is None:
        raise ValueError(f"settings.distill={settings.distill} needs a teacher: train_lora(..., teacher=dense_model)")
    if teacher is not None:
        if teacher is model:
            raise ValueError("the teacher is the model being trained; pass the dense model it was pruned from")
        teacher.eval()
        teacher.requires_grad_(False)


class _Run:
    """One call of ``train_lora``: its encoded data, the model with fresh adapters and its optimizer, and the
    ``state`` a snapshot keeps (step, tokens, times, losses, validation, best, fingerprints)."""

    def __init__(self, model, tokenizer, examples: Sequence[TrainExample], settings: LoraSettings, out_dir: Path,
                 validation: Sequence[TrainExample] | None):
        self.t_start = time.perf_counter()
        self.settings, self.out_dir = settings, out_dir
        self.rank = _world()[0]
        self.main = self.rank == 0  # the one process that writes out_dir
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.encoded = [encode(tokenizer, ex, settings.max_seq_len) for ex in examples]
        self.val_encoded = [encode(tokenizer, ex, settings.max_seq_len) for ex in validation or ()]
        self.fingerprint = _fingerprint(self.encoded)
        self.total = plan_steps(self.encoded, settings)
        self.warmup = round(settings.warmup_ratio * self.total)
        self.autocast = settings.autocast_dtype(next(model.parameters()).device)
        self.base = weights_fingerprint(model)  # what the adapter is made for: reused only on these very weights
        self.peft_model = add_lora(model, settings)
        if settings.recompute_activations:
            set_recompute_activations(self.peft_model, True)
        self.params = [p for _, p in trainable(self.peft_model)]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.vocab = self.peft_model.get_base_model().get_output_embeddings().weight.shape[0]
        self.state = {"step": 0, "tokens": 0, "train_s": 0.0, "wall_s": 0.0, "losses": [], "validation": [],
                      "best": None, "settings": settings.to_dict(), "data_fingerprint": self.fingerprint,
                      "base_fingerprint": self.base, "total_steps": self.total}
        self.resumed_from = 0
        if self.main:
            clean_leftovers(out_dir, finished=(out_dir / METRICS_FILE).exists())
        _barrier()

    def changed(self, saved: dict) -> str | None:
        return _changed(saved, self.settings, self.fingerprint, self.base)

    def set_aside(self, reason: str) -> None:
        """Move a stale run aside, once every process has read it."""
        _barrier()
        if self.main:
            _set_aside(self.out_dir, reason)
        _barrier()

    def finished_before(self) -> TrainResult | None:
        """A finished run of the same settings, examples and base weights in ``out_dir``: its adapter, loaded.
        A finished run made from anything else is set aside (``None``: train)."""
        if not (self.out_dir / METRICS_FILE).exists():
            return None
        done = read_json(self.out_dir / METRICS_FILE)
        damage = check_seal(self.out_dir)  # every byte as written, or it is trained again
        reason = self.changed(done)
        if damage is not None or reason is not None:
            self.set_aside(f"that is damaged ({damage})" if damage else f"made from {reason}")
            return None
        load_adapter_weights(self.peft_model, self.out_dir)
        self.peft_model.eval()
        return dataclasses.replace(TrainResult.from_dict(done, model=self.peft_model), adapter_dir=self.out_dir)

    def resume_or_start(self) -> None:
        """Continue from the latest snapshot of the same run, or start afresh (a stale one is set aside)."""
        snapshot = latest_snapshot(self.out_dir)
        damage = snapshot_problem(snapshot) if snapshot is not None else None
        if damage is not None:  # never resume from damaged bytes: start afresh (the run is a function of its seed)
            _barrier()
            if self.main:
                warnings.warn(f"{snapshot} is not resumed from: {damage}; the run starts afresh", stacklevel=3)
                discard(self.out_dir)
            _barrier()
            snapshot = None
        if snapshot is not None:
            reason = self.changed(read_json(snapshot / STATE))
            if reason is not None:
                self.set_aside(f"made from {reason}")
                snapshot = None
        if snapshot is not None:
            self.state = load_snapshot(snapshot, self.peft_model, self.optimizer)
            if self.rank:  # the saved RNG is process 0's: the others draw their own dropout masks from here on
                torch.manual_seed(self.settings.seed + self.rank + 7919 * self.state["step"])
        else:
            _same_start(self.params)
            # dropout masks from here on are a function of the seed (and, data-parallel, of the process)
            torch.manual_seed(self.settings.seed + self.rank)
        self.resumed_from = self.state["step"]
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def diverged(self, step: int, problem: str) -> TrainingDiverged:
        """The error to raise, once the snapshots are gone (there is nothing to resume from)."""
        if self.main:
            discard(self.out_dir)
        lr = lr_at(step, self.total, self.warmup, self.settings.lr)
        return TrainingDiverged(
            f"LoRA training diverged at step {step} of {self.total} (lr {lr:.3g}): {problem}. No adapter was "
            f"installed in {self.out_dir}, and its snapshots were removed. Lower the learning rate "
            f"(settings.lr={self.settings.lr:g}; the paper: 1e-4) or train in fp32 (precision='fp32'), then rerun")

    def save_and_validate(self, step: int, t0: float) -> None:
        """Measure the validation loss (keeping the best adapter so far), then save a snapshot."""
        state = self.state
        if self.val_encoded:
            v = validation_loss(self.peft_model, self.val_encoded, self.pad_id,
                                self.settings.micro_batch_size or self.settings.batch_size, self.autocast)
            problem = divergence([x for _, x in state["losses"]], self.vocab, validation=v)
            if problem:
                raise self.diverged(step, problem)
            state["validation"].append([step, v])
            if state["best"] is None or v < state["best"][1]:
                state["best"] = [step, v]
                if self.main:
                    write_adapter(self.peft_model, self.out_dir / BEST)
        state["wall_s"] += time.perf_counter() - t0
        if self.main:
            save_snapshot(self.out_dir, step, self.peft_model, self.optimizer, state)
        _barrier()

    def train(self, last: int, teacher, progress: bool) -> None:
        """Optimizer steps from the one after ``resumed_from`` to ``last``; a snapshot every ``save_every``."""
        settings, state = self.settings, self.state
        perms: dict = {}
        self.peft_model.train()
        bar = tqdm(total=self.total, initial=self.resumed_from, desc=f"LoRA {self.out_dir.name}", unit="step",
                   disable=not progress or not self.main)
        t_part = self.t_start  # wall time is booked at each snapshot, so a resumed run adds to it
        try:
            for step in range(self.resumed_from + 1, last + 1):
                t_step = time.perf_counter()
                lr = lr_at(step, self.total, self.warmup, settings.lr)
                rows = [self.encoded[i] for i in _batch_indices(step, len(self.encoded), settings.batch_size,
                                                                settings.seed, perms)]
                loss = _train_step(self.peft_model, self.optimizer, rows, lr, settings, self.pad_id, teacher=teacher)
                problem = divergence([x for _, x in state["losses"]] + [loss], self.vocab)
                if problem:
                    raise self.diverged(step, problem)
                state["step"], state["tokens"] = step, state["tokens"] + sum(len(e) for e in rows)
                state["train_s"] += time.perf_counter() - t_step
                state["losses"].append([step, loss])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{state['tokens'] / max(state['train_s'], 1e-9):.0f}")
                if step % settings.save_every == 0 or step == last:
                    self.save_and_validate(step, t_part)
                    t_part = time.perf_counter()
        finally:
            bar.close()

    def learned_nothing(self, step: int, v: float) -> NothingLearned | None:
        """Why the chosen adapter (of ``step``, validation loss ``v``) is not installed, or None (see ``not_learned``):
        its validation loss against the base model's, measured now with the adapters switched off."""
        with self.peft_model.disable_adapter():
            base = validation_loss(self.peft_model, self.val_encoded, self.pad_id,
                                   self.settings.micro_batch_size or self.settings.batch_size, self.autocast)
        problem = not_learned(v, base, self.vocab)
        if problem is None:
            return None
        if self.main:
            discard(self.out_dir)
        return NothingLearned(
            f"LoRA run {self.out_dir}: the adapter of step {step} of {self.total} is not installed: {problem}. Its "
            f"snapshots were removed. A loss that rose: lower the learning rate (settings.lr={self.settings.lr:g}; "
            "the paper: 1e-4); one that did not move: more steps or examples, or a higher one; then rerun")

    def finish(self, n_examples: int) -> TrainResult:
        """The result; a finished run also installs the chosen adapter in ``out_dir`` (unless it learned nothing:
        ``NothingLearned``), then its metrics, then the folder's seal (last)."""
        state, out_dir = self.state, self.out_dir
        finished = state["step"] == self.total
        selected = state["step"]
        if finished and state["validation"] and self.settings.require_learning:
            best = self.settings.select == "validation" and state["best"] is not None
            step, v = state["best"] if best else state["validation"][-1]
            refused = self.learned_nothing(step, v)
            if refused is not None:
                raise refused
        if finished:  # out_dir gets the chosen adapter, then the metrics (written last: the run is done)
            if self.settings.select == "validation" and state["best"] is not None:
                selected = state["best"][0]
                if self.main:
                    install_adapter(out_dir / BEST, out_dir)
                _barrier()
                load_adapter_weights(self.peft_model, out_dir)  # the returned model carries the chosen adapter too
            elif self.main:
                install_adapter(latest_snapshot(out_dir), out_dir)
        result = TrainResult(
            adapter_dir=out_dir, steps=state["step"], tokens=state["tokens"], train_s=state["train_s"],
            wall_s=state["wall_s"], tokens_per_s=state["tokens"] / max(state["train_s"], 1e-9),
            losses=tuple((s, v) for s, v in state["losses"]),
            validation=tuple((s, v) for s, v in state["validation"]), selected_step=selected,
            resumed_from=self.resumed_from, n_examples=n_examples,
            trainable_params=sum(p.numel() for p in self.params), settings=self.settings, model=self.peft_model)
        if finished and self.main:
            write_json(out_dir / METRICS_FILE, {**result.to_dict(), "data_fingerprint": self.fingerprint,
                                                "base_fingerprint": self.base})
            seal(out_dir, files=[*ADAPTER_FILES, METRICS_FILE])  # checked before the adapter is ever reused
            discard(out_dir)
        _barrier()
        self.peft_model.eval()
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


# ========================================================================================== throughput
def measure_throughput(model, settings: LoraSettings | None = None, batch_size: int = 8, seq_len: int = 256,
                       steps: int = 3, warmup: int = 1) -> dict:
    """Tokens per second of one LoRA training step (forward, backward, AdamW) on random full-length tokens.

    For sizing a budget on the machine at hand: ``steps x batch_size x seq_len / tokens_per_s`` seconds.
    Answer-only loss on the last quarter of each sequence; ``settings.recompute_activations`` is honoured.
    The model is returned to its state (adapters removed, train or eval mode and recomputation as before).
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
    if settings.recompute_activations:  # as train_lora does: the step measured is the step trained
        set_recompute_activations(peft_model, True)
    device = next(peft_model.parameters()).device
    vocab = peft_model.get_base_model().get_output_embeddings().weight.shape[0]
    params = [p for _, p in trainable(peft_model)]
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
