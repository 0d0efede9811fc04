"""How much does each prunable unit matter? Gradient (Taylor) importance, as in LLM-Pruner §3.2.

Removing a unit sets its weights ``W_k`` to zero, which changes the loss on calibration text by

    ΔL = L(W with W_k = 0) − L(W) ≈ −gᵀ W_k + ½ W_kᵀ H W_k,       g = ∂L/∂W,  H = ∂²L/∂W²

(a Taylor expansion around the trained weights). LLM-Pruner turns this into *estimators*, named here
exactly as in its code (``--taylor``):

- ``param_first``   element-wise, first order:   I(w) = |w g|
- ``param_second``  element-wise, second order:  I(w) = ½ w² F,  F = (1/N) Σ_j g_j²  (empirical Fisher
  diagonal ≈ diag(H), g_j the gradient of calibration sample j alone)
- ``param_mix``     element-wise, both orders:   I(w) = |w g − ½ w² F|
- ``vectorize``     vector-wise, first order:    I(W_k) = |Σ_{w ∈ W_k} w g|  (the whole slice at once)

and the baselines LLM-Pruner compares against, plus one from Wanda:

- ``random``        a uniform random number per unit
- ``l1``, ``l2``    magnitude: I(w) = |w|, I(w) = w²
- ``activation``    Wanda-style: I(w_ij) = |w_ij| · ‖X_j‖₂, the input activation norm of column j over all
  calibration tokens

and two that look at what a unit *feeds* rather than at its weights' gradients (they pair with bias
compensation, ``tailored.prune.apply(..., compensation="bias")``, which adds back a removed unit's mean
contribution, so what is lost is only how the unit's contribution *fluctuates* around that mean):

- ``fluctuation``         FLAP (An et al., 2024), its WIFV metric: I(S) = Σ_{j ∈ S} Var(x_j) · ‖W_:,j‖², over
  the input columns j of the unit's *readers* (the Linear layers that read its channels: ``o_proj`` for a
  head, ``down_proj`` for an MLP channel), Var over all calibration tokens
- ``flap``                FLAP's own allocation score (its "AL-AM" structure): the fluctuation metric of each
  reader column (squared for attention, as FLAP's code does), standardized over the reader's columns
  (z-scores within one layer and kind), averaged over the unit's columns. Already comparable across layers
  and kinds: plan with ``allocation="global", normalize="none"``
- ``fisher_fluctuation``  the loss change that removing the unit and adding back its mean leaves, to second
  order: I(S) = ½ Σ_h F_h · Var(W_h,S x_S) = ½ Σ_h F_h (W_h,S C_SS W_h,Sᵀ), with C the covariance of the
  reader's inputs (the whole block of a head, not only its diagonal) and F_h = E_t[(∂ℓ/∂y_th)²] the
  Fisher information of the reader's output h (ℓ the summed next-token loss). It is in nats per token for
  every kind and layer, so units can compete across layers and kinds directly (per parameter:
  ``plan_pruning(..., allocation="global", normalize="cost")``).

A *member* of a unit (one parameter's rows or columns, see ``tailored.graph``) scores the sum of its
element scores (for ``vectorize``, the absolute value of the slice's sum). A unit's members are then
combined by a *group reduction*: ``sum``, ``mean``, ``max``, ``prod`` or ``root`` (the root member only).

The loss is the language-modelling loss averaged over every token of the calibration batch; ``g`` is its
gradient. Gradients are never held for the whole model: a hook on each parameter folds its gradient into
per-unit sums the moment autograd writes it, then drops it (see ``compute_importance``).

Same bytes: the passes run one micro-batch after another, each hook adds only to its own parameter's sums,
per-unit sums are float64 (float32 on MPS), ``random`` draws from its own seeded generator, and PyTorch's
deterministic kernels are on during the passes (``deterministic_algorithms``). The same weights, batch and
seed therefore give the same scores, and ``Importance.save`` the same file, from run to run and process to
process on one machine; on this project's CPU (AMD EPYC, torch 2.13 with MKL 2024.2) also at 1 to 4 threads
(measured on SmolLM2-135M). What is *not* promised: the same bits on another CPU type (MKL and PyTorch choose
their SIMD kernels by CPU, and AVX2 and AVX-512 kernels add in different orders), with other library
versions, on CUDA against the CPU, or on CUDA without ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before the
process starts. The last bits matter where units nearly tie: they can swap two units of a plan, which moves
a perplexity in its last digits. Across CPU types, measured (README, "The same numbers on another CPU"):
an Intel Xeon with AVX-512 and AMX gives the class profile's ``param_first`` curve 93.58 / 733.3 where the
AMD EPYC (AVX2) gives 93.60 / 731.8; with both libraries held to their AVX2 kernels
(``ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2``) the Xeon gives the EPYC's tables byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from tailored.anatomy import decoder_layers, preserved, set_recompute_activations, weights_fingerprint
from tailored.artifacts import ArtifactError, open_safetensors, write_sealed
from tailored.choices import ESTIMATORS, FISHER_ESTIMATORS, GRADIENT_ESTIMATORS, READER_ESTIMATORS, REDUCTIONS
from tailored.graph import KINDS, Graph, GroupSet

FORMAT = "tailored.importance/1"


# ------------------------------------------------------------------------------------------ calibration
def calibration_batch(tokenizer, texts: Sequence[str], n_samples: int = 10, seq_len: int = 128,
                      seed: int = 0, per_text: int = 1) -> torch.Tensor:
    """``n_samples`` windows of exactly ``seq_len`` tokens, one per document, as LLM-Pruner draws them.

    Documents are visited in an order shuffled by ``seed``; each one with at least ``seq_len`` tokens gives
    one window at a random offset (LLM-Pruner: 10 bookcorpus samples of 64 tokens, later 128). Tokens are
    taken without special tokens (a window from the middle of a document has no BOS). The result is the
    same for the same texts, tokenizer and seed.

    ``per_text`` > 1 lets a document give up to that many windows, so that few long documents make a big
    calibration set (the 48 calibration articles hold 249k tokens: 128 × 512 needs about 3 per article).
    A document is then cut into consecutive ``seq_len`` pieces after a random offset, and up to
    ``per_text`` of them, chosen by ``seed``, are taken; the windows of one document never overlap.
    ``per_text=1`` is exactly the one-window-per-document draw above.

    Returns a LongTensor of shape ``(n_samples, seq_len)``. Raises ``ValueError`` if fewer than
    ``n_samples`` documents are long enough.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples}: ask for at least one calibration sample (LLM-Pruner used 10)")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: a language-modelling loss needs at least 2 tokens per sample")
    if not isinstance(per_text, int) or per_text < 1:
        raise ValueError(f"per_text={per_text!r}: give the most windows one document may give, at least 1")
    if isinstance(texts, str):
        raise ValueError("texts is one string; pass a list of documents (e.g. tailored.data.text_corpus())")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: pass a list of documents (e.g. tailored.data.text_corpus())")
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    windows: list[list[int]] = []
    longest = 0
    for i in order:
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        longest = max(longest, len(ids))
        if len(ids) < seq_len:
            continue
        start = rng.randint(0, len(ids) - seq_len)
        if per_text == 1:
            starts = [start]
        else:  # consecutive pieces after a random offset within the first piece; a seeded choice of them
            offset = start % seq_len
            pieces = list(range(offset, len(ids) - seq_len + 1, seq_len))
            starts = sorted(rng.sample(pieces, min(per_text, len(pieces))))
        for start in starts:
            windows.append(list(ids[start:start + seq_len]))
            if len(windows) == n_samples:
                return torch.tensor(windows, dtype=torch.long)
    if per_text > 1:
        raise ValueError(f"{len(texts)} texts give only {len(windows)} windows of seq_len={seq_len} tokens with up "
                         f"to per_text={per_text} each, but n_samples={n_samples} were asked for: raise per_text, "
                         "give more texts, or lower n_samples or seq_len")
    raise ValueError(
        f"only {len(windows)} of {len(texts)} texts have at least seq_len={seq_len} tokens (the longest has "
        f"{longest}), but n_samples={n_samples} were asked for: give more or longer texts, or lower "
        "n_samples or seq_len (or let a text give several windows: per_text)"
    )


CALIBRATION_FORMAT = "tailored.calibration/1"
REBUILD = "rerun notebook 02: `tailored run --steps 02 --force`"  # what writes the calibration, scores, statistics


def save_calibration(batch: torch.Tensor, path: str | Path, settings: Mapping | None = None) -> Path:
    """Write the calibration token ids (n_samples, seq_len) and how they were drawn, atomically and byte-stably:
    notebook 03 prunes on exactly the windows notebook 02 scored."""
    meta = {"format": CALIBRATION_FORMAT, "settings": json.dumps(dict(settings or {}), sort_keys=True, default=str)}
    path = Path(path)
    ids = {"input_ids": batch.detach().to("cpu", torch.long).contiguous()}
    write_sealed(path, _sorted_metadata(save(ids, metadata=meta)))  # the header's keys in one order; sealed
    return path


def load_calibration(path: str | Path) -> torch.Tensor:
    """The token ids ``save_calibration`` wrote: (n_samples, seq_len) long."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run notebook 02 (`tailored run --steps 02`) first")
    try:
        with open_safetensors(path, REBUILD) as fh:  # its seal checked first, a damaged file named
            if (fh.metadata() or {}).get("format") != CALIBRATION_FORMAT:
                raise ArtifactError(f"{path} is not a calibration batch (format {CALIBRATION_FORMAT!r} expected)")
            return fh.get_tensor("input_ids")
    except (OSError, ValueError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"{path} is damaged ({err}); rerun notebook 02 (`tailored run --steps 02 --force`)") from None


# ------------------------------------------------------------------------------------- element scores
# Each takes a weight tensor and statistics of the same shape and returns per-element contributions;
# a member's score is their sum over the member's slice.

def param_first(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """I(w) = |w g|: the first-order Taylor term of zeroing each element, element by element."""
    return (w * g).abs_()


def param_second(w: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """I(w) = ½ w² F: the second-order term, with the Fisher diagonal F = (1/N) Σ_j g_j² for the Hessian.

    (LLM-Pruner's code drops the ½ here and keeps it in ``param_mix``; a constant factor, same ranking.)
    """
    return w.square().mul_(fisher).mul_(0.5)


def param_mix(w: torch.Tensor, g: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """I(w) = |w g − ½ w² F| = |−g w + ½ w² F|: both Taylor terms of zeroing each element."""
    return (w * g).sub_(w.square().mul_(fisher).mul_(0.5)).abs_()


def vectorize_terms(w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Signed terms w g of ``vectorize``: I(W_k) = |Σ_{w ∈ W_k} w g|, the absolute value taken *after*
    summing over the slice, i.e. the first-order estimate of zeroing the whole slice at once (LLM-Pruner
    eq. 3). (LLM-Pruner's code sums within one row or column, then adds the rows of a head; for one-row
    units such as MLP channels the two agree.)"""
    return w * g


# ----------------------------------------------------------------------------------------- the result
@dataclass(frozen=True, eq=False)
class Importance(Mapping):
    """Scores per unit: ``imp[(estimator, reduction, groupset)]`` is a float32 vector of length ``units``.

    ``settings`` records how they were computed (calibration size, loss, model, definitions).
    ``imp.select("param_first", "sum")`` gives the ``{group set: scores}`` mapping ``plan_pruning`` takes.
    """

    scores: dict[tuple[str, str, str], torch.Tensor]
    settings: dict = field(default_factory=dict)

    def __getitem__(self, key: tuple[str, str, str]) -> torch.Tensor:
        try:
            return self.scores[tuple(key)]
        except KeyError:
            raise KeyError(f"no scores for {key!r}: have estimators {self.estimators}, reductions "
                           f"{self.reductions} and {len(self.groupsets)} group sets") from None

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Importance):
            return NotImplemented
        return (self.scores.keys() == other.scores.keys() and self.settings == other.settings
                and all(torch.equal(v, other.scores[k]) for k, v in self.scores.items()))

    __hash__ = None

    def score(self, estimator: str, groupset: str, reduction: str = "sum") -> torch.Tensor:
        """``imp.score("param_first", "layers.3.mlp")``: the same as ``imp[(estimator, reduction, groupset)]``."""
        return self[(estimator, reduction, groupset)]

    def select(self, estimator: str, reduction: str = "sum") -> dict[str, torch.Tensor]:
        """``{group set name: scores}`` of one estimator and reduction (the input of ``prune.plan_pruning``)."""
        out = {gs: v for (e, r, gs), v in self.scores.items() if e == estimator and r == reduction}
        if not out:
            raise KeyError(f"no scores for estimator {estimator!r} with reduction {reduction!r}: have "
                           f"estimators {self.estimators} and reductions {self.reductions}")
        return out

    @property
    def estimators(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k[0] for k in self.scores))

    @property
    def reductions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k[1] for k in self.scores))

    @property
    def groupsets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k[2] for k in self.scores))

    def save(self, path: str | Path) -> Path:
        """Write ``importance.safetensors`` atomically: keys ``"{estimator}/{reduction}/{groupset}"``,
        the settings as JSON in the metadata. The same scores give the same bytes (``_sorted_metadata``)."""
        tensors = {"/".join(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in self.scores.items()}
        meta = {"format": FORMAT, "settings": json.dumps(self.settings, sort_keys=True, default=str),
                "keys": json.dumps(list(tensors))}  # safetensors sorts its keys; this keeps our order
        path = Path(path)
        write_sealed(path, _sorted_metadata(save(tensors, metadata=meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run notebook 02 (`tailored run --steps 02`) first")
        try:
            with open_safetensors(path, REBUILD) as fh:  # its seal checked first
                meta = fh.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path} is not an importance file (format {meta.get('format')!r}, "
                                     f"expected {FORMAT!r})")
                scores = {}
                for key in json.loads(meta.get("keys", "null")) or fh.keys():
                    est, red, gs = key.split("/", 2)
                    scores[(est, red, gs)] = fh.get_tensor(key)
            return cls(scores=scores, settings=json.loads(meta.get("settings", "{}")))
        except ArtifactError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError for a truncated or garbled file
            raise ArtifactError(f"{path} is damaged ({type(e).__name__}: {e}); rebuild it with notebook 02: "
                                "`tailored run --steps 02 --force`") from None


def _sorted_metadata(blob: bytes) -> bytes:
    """The safetensors file ``blob`` with its metadata keys in sorted order: byte-stable from run to run.

    safetensors writes the metadata from a Rust hash map, in an order that changes from process to process.
    The header is ``<8-byte length><JSON, space-padded>``; rewriting the JSON with the keys sorted keeps its
    length, so the tensor data after it stays where it is.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8: 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # cannot happen (same content), but never write a broken file
        return blob
    return blob[:8] + text.ljust(n) + blob[8 + n:]


# ------------------------------------------------------------------------------------------- slicing
@dataclass(frozen=True)
class _Use:
    """Where one member reads its parameter, along ``dim``: either the equal consecutive blocks
    ``offset + u·width … offset + (u+1)·width − 1`` of units u (how traced graphs come), or any positions
    ``index``: unit u owns ``index[slots[u]]`` (``slots`` padded with k, which points at an appended zero)."""

    key: tuple[int, int]  # (group set number, member number)
    dim: int
    units: int
    block: tuple[int, int] | None = None  # (offset, width)
    index: torch.Tensor | None = None  # (k,) long
    slots: torch.Tensor | None = None  # (units, widest unit) long, into index; k for "none"


def _along(e: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum an element-score tensor over every dimension except ``dim``: (size along dim,)."""
    if e.dim() == 1:
        return e
    return e.sum(dim=[d for d in range(e.dim()) if d != dim])


def _fold(e: torch.Tensor, uses: Sequence[_Use], acc: dict, dtype: torch.dtype) -> None:
    """Add the slice sums of element scores ``e`` to each use's per-unit accumulator."""
    per_dim: dict[int, torch.Tensor] = {}
    for use in uses:
        if use.dim not in per_dim:
            per_dim[use.dim] = _along(e, use.dim)
        r = per_dim[use.dim]  # (size along dim,)
        if use.block is not None:
            off, width = use.block
            part = r.narrow(0, off, use.units * width).view(use.units, width).sum(1).to(dtype)  # (units,)
        else:  # a gather and a row sum, not index_add_ (whose CUDA kernel adds in whatever order atomics land)
            picked = torch.cat([r[use.index].to(dtype), r.new_zeros(1, dtype=dtype)])  # (k + 1,): the last is 0
            part = picked[use.slots].sum(1)  # (units,)
        if use.key in acc:
            acc[use.key] += part
        else:
            acc[use.key] = part


def _params_by_name(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def _uses_by_param(model: torch.nn.Module, groups: Sequence[GroupSet], device: torch.device
          ) -> dict[str, list[_Use]]:
    """For each parameter (by its first name), the members that read it. Checks shapes and indices."""
    named = _params_by_name(model)
    canonical = {id(p): n for n, p in model.named_parameters()}
    uses_by_param: dict[str, list[_Use]] = {}
    for gi, g in enumerate(groups):
        if len(g.members) == 0:
            raise ValueError(f"group set {g.name!r} has no members")
        if not 0 <= g.root < len(g.members):
            raise ValueError(f"group set {g.name!r}: root {g.root} is not a member index")
        for mi, m in enumerate(g.members):
            p = named.get(m.param)
            if p is None:
                raise ValueError(f"group set {g.name!r}: the model has no parameter {m.param!r}; was the graph "
                                 "traced from this model?")
            if len(m.index) != g.units:
                raise ValueError(f"group set {g.name!r}: member {m.param} lists {len(m.index)} units, not {g.units}")
            if m.dim >= p.dim():
                raise ValueError(f"group set {g.name!r}: {m.param} has {p.dim()} dims, member dim is {m.dim}")
            flat = torch.tensor([i for ix in m.index for i in ix], dtype=torch.long)
            if len(flat) and not 0 <= int(flat.min()) <= int(flat.max()) < p.shape[m.dim]:
                raise ValueError(f"group set {g.name!r}: {m.param} indices run outside its size "
                                 f"{p.shape[m.dim]} along dim {m.dim}")
            widths = {len(ix) for ix in m.index}
            width = widths.pop() if len(widths) == 1 else 0
            off = int(flat[0]) if len(flat) else 0
            if width and torch.equal(flat, torch.arange(off, off + len(flat))):
                use = _Use(key=(gi, mi), dim=m.dim, units=g.units, block=(off, width))
            else:
                slots, start = torch.full((g.units, max(len(ix) for ix in m.index)), len(flat), dtype=torch.long), 0
                for u, ix in enumerate(m.index):
                    slots[u, :len(ix)] = torch.arange(start, start + len(ix))
                    start += len(ix)
                use = _Use(key=(gi, mi), dim=m.dim, units=g.units, index=flat.to(device), slots=slots.to(device))
            uses_by_param.setdefault(canonical[id(p)], []).append(use)
    return uses_by_param


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """Within the block, PyTorch picks its deterministic kernel wherever it has one (a warning names any op that
    has none); afterwards the switch is as it was. On the CPU the passes here measured the same bits either way;
    on CUDA it replaces kernels that add with atomics (``index_add_``, ``scatter_add_``, ``index_put_`` with
    ``accumulate=True``), whose order of addition changes from run to run. (cuBLAS also needs
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment before the process starts; not tried on a GPU here.)

    A switch the caller turned on stays on, strict or not. Filling uninitialized memory with NaN, which the
    switch also turns on as a debugging aid, is left off inside the block: it costs time and changes no result.
    """
    if torch.are_deterministic_algorithms_enabled():
        yield
        return
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill


# ----------------------------------------------------------------------------------- gradient passes
class _GradientFold:
    """Post-accumulate-grad hooks: fold each parameter's gradient into per-unit sums, then drop it.

    The calibration batch goes through in C micro-batches c (of one sample each by default); the hook of
    parameter p sees g_c = ∂L_c/∂p, L_c the mean loss of micro-batch c, whose share of the batch is
    a_c = size_c / N, so that ḡ = Σ_c a_c g_c. What each estimator needs:

    - ``vectorize``: Σ_slice w ḡ = Σ_c a_c Σ_slice w g_c is linear in g_c: per-unit sums grow directly.
    - ``param_second``: Σ_slice ½ w² F = Σ_j Σ_slice ½ w² g_j² / N (one sample per pass): also direct.
    - ``param_first``, ``param_mix``: |·| acts on each element of ḡ (and F), so the running sums Σ a_c g_c
      (and Σ g_j² / N for ``param_mix``) are kept per element, for the scored parameters only, and folded
      into per-unit scores when the last micro-batch's gradient arrives, which also frees them.

    With a single pass (``micro_batch`` ≥ N) no per-element buffer is kept at all. Either way, at any
    moment at most one parameter holds a ``.grad`` (plus autograd's own in-flight buffers).
    """

    def __init__(self, uses_by_param: dict[str, list[_Use]], estimators: Sequence[str], n_samples: int,
                 dtype: torch.dtype):
        self.uses_by_param, self.estimators, self.n, self.dtype = uses_by_param, set(estimators), n_samples, dtype
        self.acc: dict[str, dict[tuple[int, int], torch.Tensor]] = {e: {} for e in GRADIENT_ESTIMATORS}
        self.sum_g: dict[str, torch.Tensor] = {}  # Σ_c a_c g_c so far, per element
        self.sum_g2: dict[str, torch.Tensor] = {}  # Σ_j g_j² / N so far, per element (param_mix only)
        self.share, self.last = 1.0, True  # a_c of the current pass; is it the last one?

    def hook(self, name: str):
        uses, est, acc = self.uses_by_param[name], self.estimators, self.acc

        def fold(p: torch.Tensor) -> None:
            with torch.no_grad():
                w, g = p.detach().float(), p.grad.float()  # (param shape), upcast if bf16/fp16
                a = self.share
                if "vectorize" in est:
                    _fold(vectorize_terms(w, g).mul_(a), uses, acc["vectorize"], self.dtype)
                if "param_second" in est:
                    _fold(param_second(w, g.square().div_(self.n)), uses, acc["param_second"], self.dtype)
                if "param_first" in est or "param_mix" in est:
                    fisher = None
                    if "param_mix" in est:
                        g2 = g.square().div_(self.n)
                        fisher = g2 if name not in self.sum_g2 else self.sum_g2.pop(name).add_(g2)
                    if name in self.sum_g:
                        gbar = self.sum_g.pop(name).add_(g, alpha=a)
                    else:  # the first pass: the gradient tensor itself becomes the running sum
                        gbar = g.mul_(a) if a != 1.0 else g
                    if self.last:
                        if "param_first" in est:
                            _fold(param_first(w, gbar), uses, acc["param_first"], self.dtype)
                        if "param_mix" in est:
                            _fold(param_mix(w, gbar, fisher), uses, acc["param_mix"], self.dtype)
                    else:
                        self.sum_g[name] = gbar
                        if fisher is not None:
                            self.sum_g2[name] = fisher
            p.grad = None

        return fold


def _lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every predicted token of ``ids`` (batch, seq)."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


# ------------------------------------------------------------------------------------ activation norms
class _ActivationNorms:
    """Forward hooks that sum squared activations over all calibration tokens, for ``activation``.

    - ``nn.Linear``: Σ x_j² of each input feature j (the Wanda norm ‖X_j‖²);
    - ``nn.Embedding``: the count of each token id (its one-hot input's squared norm);
    - any other module owning a 1-D weight (RMSNorm): Σ y_j² of its output, since |γ_j|·‖x̂_j‖ = ‖y_j‖.
    """

    def __init__(self, model: torch.nn.Module, wanted: set[int]):
        self.sq: dict[int, torch.Tensor] = {}  # id(module) -> sums
        self.tokens: dict[int, int] = {}  # id(module) -> tokens seen
        self.roles: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # id(param) -> (module, attr)
        self.handles = []
        self.active = True  # off during backward: a layer recomputed there must not count twice
        for module in model.modules():
            mine = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) in wanted]
            if not mine:
                continue
            for n, p in mine:
                self.roles.setdefault(id(p), []).append((module, n))
            self.handles.append(module.register_forward_hook(self._hook))

    def _hook(self, module, args, output) -> None:
        if not self.active:
            return
        with torch.no_grad():
            if isinstance(module, torch.nn.Embedding):
                s = torch.bincount(args[0].reshape(-1), minlength=module.num_embeddings).double()  # (vocab,)
            else:
                t = args[0] if isinstance(module, torch.nn.Linear) else output
                t = t[0] if isinstance(t, tuple) else t
                if not isinstance(t, torch.Tensor):
                    return
                t = t.detach().reshape(-1, t.shape[-1])  # (tokens, features)
                s = t.double().square().sum(0)  # (features,)
            key = id(module)
            self.sq[key] = self.sq[key] + s if key in self.sq else s
            x = args[0]
            rows = x.numel() if isinstance(module, torch.nn.Embedding) else x.numel() // x.shape[-1]
            self.tokens[key] = self.tokens.get(key, 0) + rows

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def element_scores(self, p: torch.Tensor) -> torch.Tensor:
        """|w|·‖X‖ for parameter ``p``, summed over the modules that use it (a tied embedding is both the
        input embedding and the LM head). A parameter of any other kind of module falls back to |w|."""
        w = p.detach().float().abs()
        total = None
        for module, attr in self.roles.get(id(p), []):
            s = self.sq.get(id(module))
            if s is None:  # the module never ran
                continue
            norm = s.sqrt().to(w.device, torch.float32)
            if isinstance(module, torch.nn.Linear) and attr == "weight":
                e = w * norm[None, :]  # (out, in) · (1, in)
            elif isinstance(module, torch.nn.Linear) and attr == "bias":
                e = w * math.sqrt(self.tokens[id(module)])  # a bias's input is the constant 1
            elif isinstance(module, torch.nn.Embedding) and attr == "weight":
                e = w * norm[:, None]  # (vocab, d) · (vocab, 1): √(count of each token)
            elif p.dim() == 1 and p.shape[0] == norm.shape[0]:
                e = norm.clone()  # a norm's scale γ: |γ_j|·‖x̂_j‖ = ‖y_j‖
            else:
                e = w.clone()
            total = e if total is None else total + e
        return w if total is None else total


# ------------------------------------------------------------------------------- readers' statistics
ACTIVATIONS_FORMAT = "tailored.activations/1"


def readers(model: torch.nn.Module, group: GroupSet) -> list[tuple[int, str]]:
    """The members of ``group`` that *read* its units: input columns (dim 1) of a ``Linear`` weight.

    Returns ``(member number, module name)`` pairs: ``o_proj`` for attention units and query heads,
    ``down_proj`` for MLP channels, every projection that reads the residual stream (and the LM head) for
    the hidden dimension. These are the layers whose input loses the unit's channels, and whose bias can
    take back the unit's mean contribution.
    """
    out = []
    for mi, m in enumerate(group.members):
        mod_name, _, attr = m.param.rpartition(".")
        if m.dim != 1 or attr != "weight":
            continue
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            raise ValueError(f"group set {group.name!r}: the model has no module {mod_name!r}; was the graph "
                             "traced from this model?") from None
        if isinstance(mod, torch.nn.Linear):
            out.append((mi, mod_name))
    return out


@dataclass(frozen=True, eq=False)
class Activations:
    """What the readers of the units (see ``readers``) saw on the calibration batch, per module name.

    - ``mean[name]``: (in,) μ_j = E_t[x_tj], the mean of each input channel over all calibration tokens;
    - ``second[name]``: (in,) E_t[x_tj²], or (in, in) E_t[x_t x_tᵀ] where the full matrix was collected
      (readers whose units span several columns, such as a head's 64 or 192 columns of ``o_proj``, or all
      readers with ``full=True``, which the least-squares ``refit`` compensation needs);
    - ``fisher[name]``: (out,) F_h = E_t[(∂ℓ/∂y_th)²], the Fisher information of each output of the reader,
      with ℓ the *summed* next-token loss of the batch (so it does not depend on how the batch is split);
      empty unless collected with ``gradients=True``.

    ``tokens`` is the number of token positions the expectations run over. Made by ``activation_statistics``.
    """

    tokens: int
    mean: dict[str, torch.Tensor]
    second: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def covariance(self, name: str) -> torch.Tensor:
        """C = E[x xᵀ] − μ μᵀ of ``name``'s input (float64): (in, in), or its diagonal (in,) when only that was kept."""
        if name not in self.mean:
            raise KeyError(f"no statistics for {name!r}: compute them on this model with "
                           "activation_statistics(model, graph, batch)")
        mu, sec = self.mean[name].double(), self.second[name].double()
        return sec - torch.outer(mu, mu) if sec.dim() == 2 else (sec - mu.square()).clamp_min(0)

    def save(self, path: str | Path) -> Path:
        """Write ``activations.safetensors`` atomically: ``mean/<name>``, ``second/<name>``, ``fisher/<name>``."""
        tensors = {f"{kind}/{name}": t.detach().to("cpu", torch.float32).contiguous()
                   for kind, d in (("mean", self.mean), ("second", self.second), ("fisher", self.fisher))
                   for name, t in d.items()}
        meta = {"format": ACTIVATIONS_FORMAT, "tokens": str(self.tokens),
                "settings": json.dumps(self.settings, sort_keys=True, default=str)}
        path = Path(path)
        write_sealed(path, _sorted_metadata(save(tensors, metadata=meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Activations:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run notebook 02 (`tailored run --steps 02`) first")
        parts: dict[str, dict[str, torch.Tensor]] = {"mean": {}, "second": {}, "fisher": {}}
        with open_safetensors(path, REBUILD) as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != ACTIVATIONS_FORMAT:
                raise ValueError(f"{path} is not an activations file (format {meta.get('format')!r}, expected "
                                 f"{ACTIVATIONS_FORMAT!r})")
            for key in fh.keys():
                kind, name = key.split("/", 1)
                parts[kind][name] = fh.get_tensor(key)
        return cls(tokens=int(meta["tokens"]), settings=json.loads(meta.get("settings", "{}")), **parts)


class _ReaderHooks:
    """Forward hooks on the reader Linear layers: Σ x, Σ x² (or Σ x xᵀ) of their inputs, and, with
    gradients, a hook on each output that adds up (∂ℓ/∂y)² per output feature."""

    def __init__(self, model: torch.nn.Module, names: Mapping[str, bool], gradients: bool, dtype: torch.dtype):
        self.sum: dict[str, torch.Tensor] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.fisher: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.scale = 1.0  # ∂ℓ/∂(mean loss) of the current pass: the gradients are of the summed loss
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n, full, gradients, dtype))
                        for n, full in names.items()]

    def _hook(self, name: str, full: bool, gradients: bool, dtype: torch.dtype):
        def hook(_module, args, output) -> None:
            with torch.no_grad():
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(dtype)  # (tokens, in)
                s, q = x.sum(0), (x.T @ x if full else x.square().sum(0))
                self.sum[name] = self.sum[name] + s if name in self.sum else s
                self.sq[name] = self.sq[name] + q if name in self.sq else q
            if gradients and output.requires_grad:
                def grad_hook(g: torch.Tensor) -> None:
                    with torch.no_grad():
                        f = (g.detach().reshape(-1, g.shape[-1]).to(dtype) * self.scale).square().sum(0)  # (out,)
                        self.fisher[name] = self.fisher[name] + f if name in self.fisher else f
                output.register_hook(grad_hook)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def activation_statistics(model: torch.nn.Module, graph: Graph, batch: torch.Tensor,
                          kinds: Sequence[str] = ("attention", "qheads", "mlp"), full: bool | None = None,
                          gradients: bool = False, micro_batch: int = 1, progress: bool = True) -> Activations:
    """Mean, second moment (and with ``gradients`` the output Fisher) of every reader's input on ``batch``.

    The readers are those of the graph's group sets of ``kinds`` (see ``readers``). ``full``: ``None``
    keeps the whole second-moment matrix only for readers whose units span several columns (a head's block
    of ``o_proj``: ``fisher_fluctuation`` needs it), ``True`` for every reader (the ``refit`` compensation
    needs it: SmolLM2's 30 ``down_proj`` take 283 MB), ``False`` for none.

    Without ``gradients`` the passes are forward only (no gradient anywhere); with them, each pass also
    runs backward from the summed next-token loss, with the weights frozen: only activations get
    gradients, and the hooks keep nothing but per-feature sums. ``micro_batch`` samples go through per
    pass. Weights, ``requires_grad`` flags and train/eval mode are left as they were.
    """
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.dtype != torch.long:
        raise ValueError(f"batch must be a LongTensor (n_samples, seq_len) of token ids, got "
                         f"{getattr(batch, 'dtype', type(batch).__name__)} {tuple(getattr(batch, 'shape', ()))}")
    if not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch!r}: give a number of samples per pass, at least 1")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown kind(s) {bad}; kinds are {list(KINDS)}")
    names: dict[str, bool] = {}
    for g in graph.groups:
        if g.kind in kinds:
            for mi, name in readers(model, g):
                wide = max(len(ix) for ix in g.members[mi].index) > 1
                names[name] = names.get(name, False) or (wide if full is None else bool(full))
    if not names:
        raise ValueError(f"the graph's group sets of kinds {list(kinds)} have no Linear readers to watch")
    device = next(model.parameters()).device
    dtype = _acc_dtype(device)
    batch = batch.to(device)
    hooks = _ReaderHooks(model, names, gradients, dtype)
    passes = [batch[i:i + micro_batch] for i in range(0, batch.shape[0], micro_batch)]
    bar = tqdm(passes, desc="activation statistics", unit="pass", disable=not progress)
    try:
        with preserved(model), deterministic_algorithms():
            model.eval()
            model.requires_grad_(False)
            embed = model.get_input_embeddings()
            for ids in bar:
                if gradients:
                    with torch.enable_grad():
                        x = embed(ids).detach().requires_grad_(True)  # the graph starts at the embeddings
                        loss = model(inputs_embeds=x, labels=ids, use_cache=False).loss
                        hooks.scale = float(ids.shape[0] * (ids.shape[1] - 1))  # mean loss -> summed loss
                        loss.backward()
                else:
                    with torch.no_grad():
                        model(input_ids=ids, use_cache=False)
    finally:
        bar.close()
        hooks.remove()
    n = batch.numel()
    return Activations(
        tokens=n, mean={k: (v / n).float().cpu() for k, v in hooks.sum.items()},
        second={k: (v / n).float().cpu() for k, v in hooks.sq.items()},
        fisher={k: (v / n).float().cpu() for k, v in hooks.fisher.items()},
        settings={"n_samples": int(batch.shape[0]), "seq_len": int(batch.shape[1]), "kinds": list(kinds),
                  "full": full, "gradients": gradients, "batch_sha256": _batch_hash(batch),
                  "full_readers": sorted(k for k, v in names.items() if v)})


def _reader_scores(est: str, w: torch.Tensor, acts: Activations, name: str, member, units: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Per-unit scores (units,) of one reader member (columns ``member.index[u]`` of ``w`` (out, in))."""
    if name not in acts.mean:
        raise ValueError(f"the activations hold no statistics for {name}: compute them on this model and graph "
                         "(activation_statistics(model, graph, batch))")
    if acts.mean[name].numel() != w.shape[1]:
        raise ValueError(f"the activations of {name} have {acts.mean[name].numel()} input channels but its weight "
                         f"has {w.shape[1]}: they were computed on another (differently pruned) model")
    w = w.detach().to("cpu", torch.float64)
    cov = acts.covariance(name)  # (in, in) or (in,)
    if est in ("fluctuation", "flap"):
        col = (cov.diagonal() if cov.dim() == 2 else cov) * w.square().sum(0)  # (in,): Var(x_j) ‖W_:,j‖²
        if est == "flap":  # FLAP: square the metric of multi-column units (heads), standardize over the layer
            col = col.square() if max(len(ix) for ix in member.index) > 1 else col
            col = (col - col.mean()) / col.std().clamp_min(1e-30)
        return _per_unit(col, member, mean=est == "flap").to(dtype)
    if name not in acts.fisher:
        raise ValueError(f"fisher_fluctuation needs the Fisher information of {name}'s output: collect the "
                         "activations with gradients=True")
    wf = w * acts.fisher[name].double()[:, None]  # (out, in): F_h W_hj
    if cov.dim() == 1:
        col = 0.5 * cov * (wf * w).sum(0)  # a unit of one column, or only the diagonal kept
        return _per_unit(col, member, mean=False).to(dtype)
    out = torch.zeros(units, dtype=torch.float64)
    for u in range(units):
        ix = torch.tensor(member.index[u], dtype=torch.long)
        ws, wfs = w[:, ix], wf[:, ix]  # (out, |S|)
        out[u] = 0.5 * ((wfs @ cov[ix][:, ix]) * ws).sum()  # ½ Σ_h F_h W_h,S C_SS W_h,Sᵀ
    return out.to(dtype)


def _per_unit(col: torch.Tensor, member, mean: bool) -> torch.Tensor:
    """The sum (or mean) of per-column scores ``col`` (in,) over each unit's columns: (units,) float64. A unit
    of one column takes that column's value as it is (gathered at once: SmolLM2's 30 × 1536 MLP channels)."""
    if all(len(ix) == 1 for ix in member.index):
        return col[torch.tensor([ix[0] for ix in member.index], dtype=torch.long)]
    out = torch.zeros(len(member.index), dtype=torch.float64)
    for u, ix in enumerate(member.index):
        cols = col[list(ix)]
        out[u] = cols.mean() if mean else cols.sum()
    return out


# ------------------------------------------------------------------------------------ whole layers
@torch.no_grad()
def block_influence(model: torch.nn.Module, batch: torch.Tensor, micro_batch: int = 1,
                    progress: bool = True) -> torch.Tensor:
    """ShortGPT's block influence of each decoder layer (Men et al., 2024): (layers,) float32,

        BI_l = 1 − E_t[ cos(h_l,t , h_l+1,t) ],

    h_l,t the residual stream entering layer l at token t, averaged over every token of ``batch``. A layer
    whose output points where its input pointed changes little: depth pruning removes the layers of lowest
    influence (``prune.plan_pruning(graph, {}, target, mode="layer", layer_scores=bi)``). One forward pass,
    no gradient; ``micro_batch`` samples per pass.
    """
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.dtype != torch.long:
        raise ValueError(f"batch must be a LongTensor (n_samples, seq_len) of token ids, got "
                         f"{getattr(batch, 'dtype', type(batch).__name__)} {tuple(getattr(batch, 'shape', ()))}")
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    total = torch.zeros(len(layers), dtype=torch.float64)

    def hook_for(i: int):
        def hook(_module, args, kwargs, output):
            h_in = kwargs.get("hidden_states", args[0] if args else None)
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)  # (batch, seq)
            total[i] += float(cos.sum())
        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with preserved(model):
            model.eval()
            for i in tqdm(range(0, batch.shape[0], micro_batch), desc="block influence", disable=not progress):
                model(input_ids=batch[i:i + micro_batch].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return (1 - total / batch.numel()).float()


# ------------------------------------------------------------------------------------------ reductions
def reduce_members(member_scores: torch.Tensor, reduction: str, root: int = 0) -> torch.Tensor:
    """Combine per-member scores (members, units) into per-unit scores (units,).

    ``prod`` is computed in log space and returned as the geometric mean exp(mean log s) = (Π s)^(1/M):
    every unit of a group set has the same M members, so it ranks units exactly as the product does, but
    it neither underflows (a hidden channel has hundreds of members with small scores) nor leaves the
    scale of the member scores, so scores of different kinds can still be normalized and compared.
    """
    if reduction == "sum":
        return member_scores.sum(0)
    if reduction == "mean":
        return member_scores.mean(0)
    if reduction == "max":
        return member_scores.max(0).values
    if reduction == "prod":
        tiny = torch.finfo(member_scores.dtype).tiny
        return member_scores.clamp_min(tiny).log().mean(0).exp()
    if reduction == "root":
        return member_scores[root]
    raise ValueError(f"unknown reduction {reduction!r}; choose from {list(REDUCTIONS)}")


# ------------------------------------------------------------------------------------------ the stage
def _check_names(estimators: Sequence[str], reductions: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if isinstance(estimators, str):
        estimators = (estimators,)
    if isinstance(reductions, str):
        reductions = (reductions,)
    bad = [e for e in estimators if e not in ESTIMATORS]
    if bad or not estimators:
        raise ValueError(f"unknown estimator(s) {bad}; valid estimators are {list(ESTIMATORS)}")
    bad = [r for r in reductions if r not in REDUCTIONS]
    if bad or not reductions:
        raise ValueError(f"unknown reduction(s) {bad}; valid reductions are {list(REDUCTIONS)}")
    return tuple(dict.fromkeys(estimators)), tuple(dict.fromkeys(reductions))


def compute_importance(model: torch.nn.Module, graph: Graph, batch: torch.Tensor,
                       estimators: Sequence[str] = ("param_first",), reductions: Sequence[str] = ("sum",),
                       kinds: Sequence[str] | None = None, micro_batch: int = 1, seed: int = 0,
                       progress: bool = True, recompute_activations: bool = False,
                       activations: Activations | None = None) -> Importance:
    """Score every unit of the graph's group sets with each estimator and group reduction.

    ``batch``: calibration token ids (n_samples, seq_len), e.g. from ``calibration_batch``. ``kinds``
    limits the group sets scored (e.g. ``("attention", "mlp")``); default all. ``seed`` drives ``random``.

    The batch goes through the model in forward + backward passes of ``micro_batch`` samples (default 1,
    as LLM-Pruner does for the Fisher estimators, which need each sample's own gradient). The loss is the
    mean over the whole batch however it is split: each pass's gradient is weighted by its share of the
    samples. Activation norms for ``activation`` are collected by forward hooks in the same passes.

    Memory: a post-accumulate-grad hook on each scored parameter folds its gradient into running sums
    and drops it at once, so the model's gradients never exist all together; parameters no group set
    reads are frozen, so autograd does not even compute theirs. What is kept between passes: per-unit
    sums, plus, for ``param_first`` and ``param_mix`` with more than one pass, the running gradient sum of
    the scored parameters (and the Fisher sum for ``param_mix``). Smaller micro-batches hold fewer
    activations and one such buffer; ``micro_batch=len(batch)`` is one pass and no buffer, better when
    the parameters outweigh the activations of the whole batch. Any ``.grad`` the model held before is
    discarded; its weights, ``requires_grad`` flags and train/eval mode are left as they were (the passes
    run in eval mode: no dropout).

    Cost (benchmarks/bench_importance.py, SmolLM2-135M shapes, 10 × 128 tokens, all group kinds): the
    default first-order step peaks at 0.46 (CPU) / 0.32 (H100) of the memory of one plain whole-batch
    forward + backward, and takes 1.11 (CPU, 16 threads) / 1.33 (H100) times as long as the same
    per-sample passes without hooks.

    ``recompute_activations=True`` recomputes each decoder layer's activations in the backward pass (about
    one more forward of time) instead of keeping them: with ``micro_batch=len(batch)`` (one pass, no
    per-element buffer) that is what keeps LLaMA-7B's first-order scores for 10 × 128 tokens near the size of
    its weights. transformers recomputes only layers in training mode, so the decoder layers alone are
    flagged as training during the passes; their attention and MLP stay in eval mode (no dropout).

    ``fluctuation`` and ``fisher_fluctuation`` read statistics of the units' readers: ``activations``
    (from ``activation_statistics`` on this model and batch), or, when not given, statistics collected
    here in passes of their own (forward only for ``fluctuation``; forward + backward for
    ``fisher_fluctuation``). Their member scores exist only for the reader members, so a unit's reduction
    runs over those (``root``: the first reader).

    Returns an ``Importance``: float32 (units,) per (estimator, reduction, group set).
    """
    estimators, reductions = _check_names(estimators, reductions)
    _check_batch(batch, kinds, micro_batch)
    n, seq_len = batch.shape
    fisher_est = [e for e in estimators if e in FISHER_ESTIMATORS]
    if fisher_est and micro_batch != 1 and n > 1:
        raise ValueError(f"{fisher_est} need each sample's own gradient (F = mean of per-sample g²): "
                         f"use micro_batch=1, not {micro_batch}")
    groups = [g for g in graph.groups if kinds is None or g.kind in kinds]
    if not groups:
        raise ValueError(f"the graph has no group sets of kinds {list(kinds or KINDS)}")

    device = next(model.parameters()).device
    batch = batch.to(device)
    uses_by_param = _uses_by_param(model, groups, device)  # validates the graph against the model, before any compute
    dtype = _acc_dtype(device)
    grad_est = [e for e in estimators if e in GRADIENT_ESTIMATORS]
    recompute = recompute_activations and bool(grad_est)  # without a backward pass there is nothing to recompute
    passes = _Passes(batch, micro_batch, needed=bool(grad_est) or "activation" in estimators)  # weights alone: none
    fold, norms = _score_passes(model, passes, uses_by_param, grad_est, "activation" in estimators, dtype,
                                recompute, progress)

    reader_est = [e for e in estimators if e in READER_ESTIMATORS]
    if reader_est and activations is None:
        activations = activation_statistics(model, graph, batch, kinds=sorted({g.kind for g in groups}),
                                            gradients="fisher_fluctuation" in reader_est, micro_batch=micro_batch,
                                            progress=progress)
    member_scores = _weight_member_scores(model, estimators, fold, norms, uses_by_param, dtype)
    reader_members = {gi: readers(model, g) for gi, g in enumerate(groups)} if reader_est else {}
    for est in reader_est:
        member_scores[est] = {(gi, mi): _reader_scores(est, model.get_submodule(name).weight, activations, name,
                                                       groups[gi].members[mi], groups[gi].units, dtype)
                              for gi, found in reader_members.items() for mi, name in found}
    scores = _unit_scores(estimators, reductions, groups, member_scores, reader_members, seed, dtype, device)

    settings = {
        "estimators": list(estimators), "reductions": list(reductions),
        "definitions": {e: ESTIMATORS[e] for e in estimators}, "reduction_definitions": {r: REDUCTIONS[r] for r in reductions},
        "n_samples": n, "seq_len": seq_len, "micro_batch": min(micro_batch, n), "seed": seed,
        "recompute_activations": recompute, **passes.losses(),
        "kinds": sorted({g.kind for g in groups}),
        "groupsets": {g.name: {"kind": g.kind, "layer": g.layer, "units": g.units} for g in groups},
        "model": _model_name(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "batch_sha256": _batch_hash(batch),
        "weights": weights_fingerprint(model),  # which weights were scored (anatomy.weights_fingerprint)
    }
    if reader_est:
        settings["activations"] = {"tokens": activations.tokens, **activations.settings}
    return Importance(scores=scores, settings=settings)


def _model_name(model: torch.nn.Module) -> str:
    """The model as the settings name it: a hub id as it is, a local directory by its own name only (the folder
    it sits in differs from machine to machine, and the file must not)."""
    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    return Path(name).name if Path(name).is_absolute() or Path(name).is_dir() else name


def _check_batch(batch: torch.Tensor, kinds: Sequence[str] | None, micro_batch: int) -> None:
    """Refuse a calibration batch, a kind or a pass size that ``compute_importance`` cannot use."""
    if kinds is not None:
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown kind(s) {bad}; kinds are {list(KINDS)}")
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.dtype != torch.long:
        raise ValueError(f"batch must be a LongTensor (n_samples, seq_len) of token ids, got "
                         f"{getattr(batch, 'dtype', type(batch).__name__)} {tuple(getattr(batch, 'shape', ()))}")
    if batch.shape[0] < 1 or batch.shape[1] < 2:
        raise ValueError(f"batch has shape {tuple(batch.shape)}: need at least one sample of at least 2 tokens")
    if not isinstance(micro_batch, int) or micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch!r}: give a number of samples per pass, at least 1")


class _Passes:
    """The calibration batch cut into passes of ``micro_batch`` samples, and the loss each pass measured."""

    def __init__(self, batch: torch.Tensor, micro_batch: int, needed: bool = True):
        self.n = batch.shape[0]
        self.chunks = [batch[i:i + micro_batch] for i in range(0, self.n, micro_batch)] if needed else []
        self.measured: list[torch.Tensor] = []  # tensors: float() in the loop would wait for the GPU each pass

    def losses(self) -> dict:
        """``loss`` (the whole batch's mean, passes weighted by their samples) and ``pass_losses``."""
        values = [float(x) for x in self.measured]
        mean = sum(x * len(ids) / self.n for x, ids in zip(values, self.chunks)) if values else None
        return {"loss": mean, "pass_losses": values}


def _score_passes(model: torch.nn.Module, passes: _Passes, uses_by_param: dict[str, list[_Use]],
                  grad_est: Sequence[str], norms_wanted: bool, dtype: torch.dtype, recompute: bool,
                  progress: bool) -> tuple[_GradientFold, _ActivationNorms | None]:
    """Forward (+ backward) passes that fold gradients and activation norms into per-unit sums as they arrive.

    Only the scored parameters get gradients; the model's mode, flags and recomputation switch are restored
    (``preserved``), and any ``.grad`` it held is dropped.
    """
    params = dict(model.named_parameters())
    fold = _GradientFold(uses_by_param, grad_est, passes.n, dtype)
    norms, handles = None, []
    bar = tqdm(passes.chunks, desc="importance (forward + backward)" if grad_est else "importance (forward)",
               unit="pass", disable=not progress or not passes.chunks)
    try:
        with preserved(model), deterministic_algorithms():
            model.eval()  # no dropout: the scores are a function of the weights and the batch
            if recompute:
                set_recompute_activations(model, True)
                for layer in decoder_layers(model):
                    layer.training = True  # the layer alone (not its children): transformers recomputes only then
            model.zero_grad(set_to_none=True)
            for name, p in params.items():  # only scored parameters get gradients
                p.requires_grad_(name in uses_by_param and bool(grad_est))
            if grad_est:
                handles = [params[name].register_post_accumulate_grad_hook(fold.hook(name)) for name in uses_by_param]
            if norms_wanted:
                norms = _ActivationNorms(model, {id(params[name]) for name in uses_by_param})
            for c, ids in enumerate(bar):
                fold.share, fold.last = ids.shape[0] / passes.n, c == len(passes.chunks) - 1
                with torch.set_grad_enabled(bool(grad_est)):
                    loss = _lm_loss(model, ids)
                    if grad_est:
                        if norms is not None:
                            norms.active = False  # a recomputed layer must not count twice
                        loss.backward()
                        if norms is not None:
                            norms.active = True
                passes.measured.append(loss.detach())
    finally:
        bar.close()
        for h in handles:
            h.remove()
        if norms is not None:
            norms.remove()
        model.zero_grad(set_to_none=True)
        fold.sum_g.clear()
        fold.sum_g2.clear()
    return fold, norms


def _weight_member_scores(model: torch.nn.Module, estimators: Sequence[str], fold: _GradientFold,
                          norms: _ActivationNorms | None, uses_by_param: dict[str, list[_Use]],
                          dtype: torch.dtype) -> dict[str, dict[tuple[int, int], torch.Tensor]]:
    """Per-member scores ``{estimator: {(group set, member): (units,)}}`` of the estimators that read weights,
    gradients or activation norms (the gradient ones were folded during the passes)."""
    params = dict(model.named_parameters())
    member_scores: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for est in estimators:
        if est in GRADIENT_ESTIMATORS:
            acc = fold.acc[est]
            member_scores[est] = {k: v.abs() if est == "vectorize" else v for k, v in acc.items()}
        elif est in ("l1", "l2", "activation"):
            acc = {}
            with torch.no_grad():
                for name, uses in uses_by_param.items():
                    w = params[name].detach().float()
                    e = w.abs() if est == "l1" else w.square() if est == "l2" else norms.element_scores(params[name])
                    _fold(e, uses, acc, dtype)
            member_scores[est] = acc
    return member_scores


def _unit_scores(estimators: Sequence[str], reductions: Sequence[str], groups: Sequence[GroupSet],
                 member_scores: Mapping[str, Mapping[tuple[int, int], torch.Tensor]],
                 reader_members: Mapping[int, list[tuple[int, str]]], seed: int, dtype: torch.dtype,
                 device: torch.device) -> dict[tuple[str, str, str], torch.Tensor]:
    """Each unit's score per (estimator, reduction, group set): its members' scores reduced (float32, CPU)."""
    drawn = random_scores(groups, seed) if "random" in estimators else {}
    scores: dict[tuple[str, str, str], torch.Tensor] = {}
    for est in estimators:
        for gi, g in enumerate(groups):
            if est == "random":
                r = drawn[g.name]
                for red in reductions:
                    scores[(est, red, g.name)] = r.clone()
                continue
            if est in READER_ESTIMATORS:  # only the readers have scores: reduce over them
                found = [mi for mi, _ in reader_members[gi]]
                if not found:
                    raise ValueError(f"{est}: group set {g.name!r} has no Linear reader to score it by")
                stacked = torch.stack([member_scores[est][(gi, mi)] for mi in found]).cpu()  # (readers, units)
                for red in reductions:
                    scores[(est, red, g.name)] = reduce_members(stacked, red, 0).float()
                continue
            stacked = torch.stack([member_scores[est].get((gi, mi), torch.zeros(g.units, dtype=dtype, device=device))
                                   for mi in range(len(g.members))]).cpu()  # (members, units)
            for red in reductions:
                scores[(est, red, g.name)] = reduce_members(stacked, red, g.root).float()
    return scores


BLOCK_KINDS = ("attention", "mlp")  # what block-wise pruning reads (with attention="kv")


def random_scores(groups: Sequence[GroupSet], seed: int) -> dict[str, torch.Tensor]:
    """``random``: U(0, 1) per unit, ``{group set name: (units,) float32}``, from one generator seeded by ``seed``.

    The draws run over the attention and MLP group sets first (in layer order), then the others (query heads,
    the hidden dimension): a unit's draw depends on the seed and on the block-wise group sets before it, never
    on whether the other kinds are scored too. So notebook 02, which scores every kind, saves the very draws
    that block-wise pruning with ``random`` made from the same seed on its own kinds.
    """
    gen = torch.Generator().manual_seed(seed)
    ordered = [g for g in groups if g.kind in BLOCK_KINDS] + [g for g in groups if g.kind not in BLOCK_KINDS]
    return {g.name: torch.rand(g.units, generator=gen) for g in ordered}


def batch_sha256(batch: torch.Tensor) -> str:
    """The SHA-256 of a calibration batch's token ids: which windows scores and statistics were computed on."""
    return _batch_hash(batch)


def _batch_hash(batch: torch.Tensor) -> str:
    return hashlib.sha256(batch.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------------ calibration size
def ranking_stability(model: torch.nn.Module, graph: Graph, batches: Mapping[str, torch.Tensor],
                      estimator: str = "param_first", kinds: Sequence[str] = ("attention", "mlp"),
                      progress: bool = False) -> list[dict]:
    """Does a bigger calibration set still change the ranking of units? Spearman correlation of every unit's
    score (over the ``kinds``' units of all layers, and per kind) between successive ``batches`` (in order:
    ``{"10x128": ids, "32x128": ids, ...}``). A correlation near 1 means the smaller set already ranked the
    units as the larger one does. One row per step from one batch to the next."""
    rows, previous = [], None
    for label, batch in batches.items():
        imp = compute_importance(model, graph, batch, estimators=(estimator,), kinds=kinds, progress=progress)
        per_kind = {k: torch.cat([imp.score(estimator, g.name) for g in graph.groups if g.kind == k]) for k in kinds}
        flat = torch.cat(list(per_kind.values()))
        if previous is not None:
            prev_label, prev_flat, prev_kind = previous
            rows.append({"from": prev_label, "to": label, "tokens": int(batch.numel()),
                         "spearman_all_units": spearman(prev_flat, flat),
                         **{f"spearman_{k}": spearman(prev_kind[k], per_kind[k]) for k in kinds}})
        previous = (label, flat, per_kind)
    return rows


# ------------------------------------------------------------------------------------ the readable version
def reference_taylor(model: torch.nn.Module, groupset: GroupSet, batch: torch.Tensor) -> torch.Tensor:
    """``param_first`` importance of one group set, the readable way: (units,) float32.

        I(unit) = Σ_members Σ_{w in the member's slice} |w · g|,      g = ∂L/∂w over the whole batch

    One forward and one backward with plain autograd, every gradient held at once: what
    ``compute_importance`` computes while folding each gradient away as it arrives (notebook 02 asserts the
    two agree).
    """
    params = _params_by_name(model)
    weights = [params[m.param] for m in groupset.members]
    with preserved(model):
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        loss = _lm_loss(model, batch.to(weights[0].device))
        grads = torch.autograd.grad(loss, weights)
    scores = torch.zeros(groupset.units, dtype=torch.float64)
    for member, w, g in zip(groupset.members, weights, grads):
        per_weight = (w.detach() * g).abs().double()  # |w · g|, element by element
        for u, idx in enumerate(member.index):
            scores[u] += per_weight.index_select(member.dim, torch.tensor(idx, device=w.device)).sum().cpu()
    return scores.float()


# ------------------------------------------------------------------------------------------ checking
@torch.no_grad()
def zeroing_loss_change(model: torch.nn.Module, groupset: GroupSet, batch: torch.Tensor,
                        units: Sequence[int] | None = None, progress: bool = False) -> torch.Tensor:
    """The true ΔL of removing each unit alone: zero all its members' slices, measure the loss, restore.

    This is what the estimators approximate (for the batch they were computed on). One forward pass per
    unit: use ``units`` to check a sample of a big group set. Returns float32 (len(units),).
    """
    params = _params_by_name(model)
    batch = batch.to(next(model.parameters()).device)
    base = float(_lm_loss(model, batch))
    units = list(range(groupset.units)) if units is None else list(units)
    out = torch.empty(len(units))
    for i, u in enumerate(tqdm(units, desc=f"zeroing {groupset.name}", disable=not progress)):
        saved = []
        for m in groupset.members:
            p, ix = params[m.param], torch.tensor(m.index[u], dtype=torch.long, device=params[m.param].device)
            saved.append((p, m.dim, ix, p.index_select(m.dim, ix).clone()))
            p.index_fill_(m.dim, ix, 0.0)
        out[i] = float(_lm_loss(model, batch)) - base
        for p, dim, ix, old in saved:
            p.index_copy_(dim, ix, old)
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n−1 with ties given their average rank."""
    x = x.detach().flatten().double().cpu()
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    return (start + (counts - 1) / 2.0).double()[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score vectors (Pearson correlation of their ranks, ties averaged)."""
    if a.numel() != b.numel():
        raise ValueError(f"cannot correlate {a.numel()} scores with {b.numel()}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


__all__ = ["ESTIMATORS", "REDUCTIONS", "GRADIENT_ESTIMATORS", "READER_ESTIMATORS", "Activations", "Importance",
           "activation_statistics", "batch_sha256", "block_influence", "calibration_batch", "compute_importance",
           "param_first", "param_second", "param_mix", "random_scores", "readers", "vectorize_terms", "reduce_members",
           "reference_taylor", "spearman", "zeroing_loss_change"]
