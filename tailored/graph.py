"""Coupled parameter groups of a LLaMA-family model (LLM-Pruner's "dependency graph").

Removing one output channel of a weight is only legal if every weight that *consumes* that channel loses
the matching input channel too. The set of (parameter, dimension, indices) that must go together is a
*coupled group*. ``trace(model)`` discovers the groups from the model's own computation.

Data model (what ``graph.json`` stores):

- ``Member``: one parameter, the dimension that is pruned, and for each prunable unit the indices along
  that dimension that belong to it (e.g. unit 3 of an MLP owns row 3 of ``gate_proj`` and of ``up_proj``
  and column 3 of ``down_proj``).
- ``GroupSet``: all the units of one kind in one place, e.g. the 3 key-value groups of layer 7's attention
  (a unit = one key-value head, the query heads that share it, their q/k/v rows and biases, and their
  ``o_proj`` columns), the 1536 MLP channels of layer 7, or the hidden dimension of the whole model.
  Units of a GroupSet are pruned independently; all members of one unit are pruned together.
- ``Graph``: every GroupSet of the model, plus the facts about the model the later stages need.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tailored.anatomy import count_parameters, decoder_layers, decoder_parameters, preserved
from tailored.artifacts import ArtifactError, is_sealed, json_safe, verify, write_sealed

KINDS = ("attention", "qheads", "mlp", "hidden")


@dataclass(frozen=True)
class Member:
    """One parameter's share of a GroupSet: ``index[u]`` are the indices along ``dim`` owned by unit ``u``."""

    param: str  # parameter name as in model.named_parameters() (the first name of a tied parameter)
    dim: int  # 0 = output rows of a Linear weight (or a bias / norm weight), 1 = input columns
    index: tuple[tuple[int, ...], ...]  # per unit
    aliases: tuple[str, ...] = ()  # other names of the same tensor (tied embeddings: lm_head.weight)

    def unit_width(self, u: int) -> int:
        return len(self.index[u])


@dataclass(frozen=True)
class GroupSet:
    """The prunable units of one kind at one place of the model."""

    name: str  # e.g. "layers.7.attention", "layers.7.mlp", "hidden"
    kind: str  # one of KINDS
    layer: int | None  # decoder layer index, None for the hidden dimension
    units: int
    members: tuple[Member, ...]
    root: int = 0  # index into members of the producer whose output defines the unit (root-only reduction)
    parent: tuple[int, ...] | None = None  # for "qheads": the attention unit (kv group) each query head belongs to
    params_per_unit: tuple[int, ...] = field(default=())  # parameters removed with each unit

    def member(self, suffix: str) -> Member:
        """The member whose parameter name ends with ``suffix`` (e.g. ``"q_proj.weight"``)."""
        hits = [m for m in self.members if m.param.endswith(suffix)]
        if len(hits) != 1:
            raise KeyError(f"{self.name}: {len(hits)} members end with {suffix!r}")
        return hits[0]

    def coupling(self, producer: str, consumer: str) -> torch.Tensor:
        """Which of ``consumer``'s entries go with which of ``producer``'s: ``(consumer width, producer width)``
        bool, True where both lie in one unit (e.g. ``coupling("q_proj.weight", "o_proj.weight")``: an
        ``o_proj`` input column and a ``q_proj`` output row of the same head). What ``reference_dependency``
        measures by hand, read off the traced units."""
        p, c = self.member(producer), self.member(consumer)
        out = torch.zeros(sum(map(len, c.index)), sum(map(len, p.index)), dtype=torch.bool)
        for u in range(self.units):
            out[torch.tensor(c.index[u])[:, None], torch.tensor(p.index[u])[None, :]] = True
        return out


@dataclass(frozen=True)
class Graph:
    groups: tuple[GroupSet, ...]
    model_type: str
    num_layers: int
    hidden_size: int
    tied_embeddings: bool
    total_params: int
    decoder_params: int

    def by_name(self, name: str) -> GroupSet:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group set {name!r}; have {[g.name for g in self.groups][:6]}…")

    def of_kind(self, kind: str) -> list[GroupSet]:
        if kind not in KINDS:
            raise ValueError(f"unknown group kind {kind!r}; kinds are {KINDS}")
        return [g for g in self.groups if g.kind == kind]

    # -------------------------------------------------------------------------------- serialization
    def to_dict(self) -> dict:
        """Compact form: a member whose units are equal consecutive blocks is stored as (offset, width)."""
        out = {k: v for k, v in asdict(self).items() if k != "groups"}
        out["groups"] = []
        for g in self.groups:
            gd = {k: v for k, v in asdict(g).items() if k != "members"}
            gd["members"] = [_member_to_dict(m) for m in g.members]
            out["groups"].append(gd)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Graph:
        groups = []
        for gd in d["groups"]:
            members = tuple(_member_from_dict(md, gd["units"]) for md in gd["members"])
            groups.append(GroupSet(name=gd["name"], kind=gd["kind"], layer=gd["layer"], units=gd["units"],
                                   members=members, root=gd.get("root", 0),
                                   parent=tuple(gd["parent"]) if gd.get("parent") is not None else None,
                                   params_per_unit=tuple(gd.get("params_per_unit", ()))))
        fields_ = {k: v for k, v in d.items() if k != "groups"}
        return cls(groups=tuple(groups), **fields_)

    def save(self, path: str | Path) -> Path:
        """Write the graph as one line of JSON, atomically, sealed (``graph.json.sha256``)."""
        return write_sealed(path, (json.dumps(json_safe(self.to_dict())) + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run notebook 01 (`tailored run --steps 01`) first")
        if is_sealed(path):  # every byte as written, or named
            verify(path, "rebuild it with notebook 01: `tailored run --steps 01 --force`")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON or bytes, or not a graph's fields
            raise ArtifactError(f"{path} is damaged ({type(e).__name__}: {e}); rebuild it with notebook 01: "
                                "`tailored run --steps 01 --force`") from None


def _member_to_dict(m: Member) -> dict:
    d = {"param": m.param, "dim": m.dim}
    if m.aliases:
        d["aliases"] = list(m.aliases)
    widths = {len(ix) for ix in m.index}
    if len(widths) == 1:
        w = widths.pop()
        off = m.index[0][0] if w else 0
        if all(ix == tuple(range(off + u * w, off + (u + 1) * w)) for u, ix in enumerate(m.index)):
            d["block"] = {"offset": off, "width": w}
            return d
    d["index"] = [list(ix) for ix in m.index]
    return d


def _member_from_dict(d: dict, units: int) -> Member:
    if "block" in d:
        off, w = d["block"]["offset"], d["block"]["width"]
        index = tuple(tuple(range(off + u * w, off + (u + 1) * w)) for u in range(units))
    else:
        index = tuple(tuple(ix) for ix in d["index"])
    return Member(param=d["param"], dim=d["dim"], index=index, aliases=tuple(d.get("aliases", ())))



# ================================================================================================ tracing
#
# trace(model) discovers the groups above from one forward pass, in four steps:
#
#   1. record  — forward hooks on every module that owns parameters record its input and output tensors;
#   2. connect — walking the autograd graph back from each module's input to the nearest module outputs
#                gives the dataflow edges producer → consumer, each either *elementwise* (only
#                channel-preserving ops on the way: add, mul, silu, dtype casts, slicing tokens…) or
#                *mixing* (anything else: matmuls, softmax, reshapes into heads…);
#   3. spaces  — every module input and output is a "channel space" (Linear: weight dim 1 is its input,
#                dim 0 and the bias its output; Embedding: weight dim 1 its output; a norm: input = output).
#                An elementwise edge between spaces of equal width says "channel i there is channel i
#                here": union-find merges the two spaces into one class;
#   4. probe   — a mixing edge has no index-for-index correspondence, so the channel-level dependency is
#                measured: one batched backward gives d consumer_in[..., i] / d producer_out[..., j] for
#                every channel i at once. Channels that depend on each other are pruned together: the
#                connected components are the units (for GQA: one key-value head with its query heads).
#
# Nothing here reads module *names*: a model whose attention computed something else would get the groups
# its computation implies.

# Autograd nodes that never move information between channels (the last dimension).
_ELEMENTWISE_NODES = frozenset({
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "MulBackward0", "MulBackward1",
    "DivBackward0", "DivBackward1", "NegBackward0", "PowBackward0", "PowBackward1", "RsqrtBackward0",
    "SqrtBackward0", "ExpBackward0", "SiluBackward0", "GeluBackward0", "SigmoidBackward0", "TanhBackward0",
    "ReluBackward0", "LeakyReluBackward0", "EluBackward0", "ToCopyBackward0", "CloneBackward0",
    "AliasBackward0", "NativeDropoutBackward0",
})
# Nodes that preserve channels only when they act on another dimension than the last one (tokens, batch).
_DIM_NODES = frozenset({"SliceBackward0", "SelectBackward0"})


def _is_elementwise(node) -> bool:
    name = type(node).__name__
    if name in _ELEMENTWISE_NODES:
        return True
    if name in _DIM_NODES:
        ndim = len(node._saved_self_sym_sizes)
        return node._saved_dim % ndim != ndim - 1
    return False


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _components(n: int, src, dst):
    """Connected components of an undirected graph on ``n`` nodes given as edge lists: a label per node.

    Min-label propagation with pointer jumping, in torch: a few passes over the edges.
    """
    labels = torch.arange(n)
    while True:
        m = torch.minimum(labels[src], labels[dst])
        new = labels.scatter_reduce(0, src, m, "amin").scatter_reduce(0, dst, m, "amin")
        new = new[new]
        if torch.equal(new, labels):
            return labels
        labels = new


def _dep_edges(dep, row0: int, col0: int, cache: dict):
    """Edges with the same connectivity as the bipartite dependency ``dep`` (rows at ``row0``, columns at
    ``col0``), but few: rows with the same pattern are chained to one representative, which alone links
    to the columns (on SmolLM2, 1.2k edges instead of 37k for q → o). ``cache`` maps ``id(dep)`` to the
    result: identical layers share their dep tensors.
    """
    if id(dep) not in cache:
        patterns, which = torch.unique(dep, dim=0, return_inverse=True)
        n = dep.shape[0]
        rep = torch.full((patterns.shape[0],), n).scatter_reduce(0, which, torch.arange(n), "amin")
        k, j = torch.nonzero(patterns, as_tuple=True)
        cache[id(dep)] = (dep, torch.arange(n), rep[which], rep[k], j)  # dep kept alive: its id stays unique
    _, rows, reps, link_rows, link_cols = cache[id(dep)]
    return torch.cat([rows, link_rows]) + row0, torch.cat([reps + row0, link_cols + col0])


@dataclass
class _Module:
    """A module that owns parameters, as the tracer saw it run."""

    name: str
    module: object
    layer: int | None  # decoder layer it sits in, None outside the decoder stack
    kind: str = ""  # "linear" | "embedding" | "norm"
    x: object = None  # its input  (…, in)
    y: object = None  # its output (…, out)

    def spaces(self) -> list[str]:
        return {"linear": ["out", "in"], "embedding": ["out"], "norm": ["io"]}[self.kind]

    def width(self, side: str) -> int:
        return (self.x if side == "in" else self.y).shape[-1]

    def params(self, side: str) -> list[tuple[str, int]]:
        """(attribute, dim) of the parameters whose dimension ``dim`` runs along channel space ``side``."""
        if self.kind == "linear":
            if side == "in":
                return [("weight", 1)]
            return [("weight", 0)] + ([("bias", 0)] if getattr(self.module, "bias", None) is not None else [])
        if self.kind == "embedding":
            return [("weight", 1)]
        return [(n, 0) for n, _ in self.module.named_parameters(recurse=False)]

    def signature(self) -> tuple:
        own = tuple((n, tuple(p.shape)) for n, p in self.module.named_parameters(recurse=False))
        return (type(self.module).__name__, self.kind, own, self.width("in"), self.width("out"))


def _classify(mod: _Module) -> str:
    m = mod.module
    own = dict(m.named_parameters(recurse=False))
    if isinstance(m, torch.nn.Linear):
        return "linear"
    if isinstance(m, torch.nn.Embedding):
        return "embedding"
    n = mod.x.shape[-1]
    if all(p.dim() == 1 and p.numel() == n for p in own.values()) and mod.y.shape[-1] == n:
        return "norm"
    shapes = {k: tuple(p.shape) for k, p in own.items()}
    raise NotImplementedError(
        f"{mod.name} ({type(m).__name__}) owns parameters {shapes}; trace() knows Linear, Embedding and "
        "norm-like modules (1-D parameters as wide as their input and output)"
    )


@contextmanager
def eager_attention(model) -> Iterator[None]:
    """Run a block with HF's eager attention (plain matrix products), then switch back to the model's own.

    Fused kernels (SDPA, flash) have no per-op autograd graph to walk and no output channel to nudge.
    """
    attn = getattr(model.config, "_attn_implementation", None)
    switch = attn is not None and attn != "eager"
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(attn)


def trace(model, tokens: int = 6, seed: int = 0) -> Graph:
    """Trace the coupled groups of a decoder-only LM from one forward pass on ``tokens`` random tokens.

    Returns a ``Graph`` with, per decoder layer, an ``attention`` GroupSet (one unit per key-value head:
    its k and v rows, the q rows of its query heads, their o_proj columns), a finer ``qheads`` GroupSet
    (one unit per query head, ``parent`` = its key-value unit) and an ``mlp`` GroupSet (one unit per
    intermediate channel), plus one ``hidden`` GroupSet for the residual stream (embedding, every norm,
    every projection's hidden side, the LM head). The model is left as it was: attention implementation,
    ``requires_grad`` flags and train/eval mode are restored.

    Speed: the channel probe (step 4) is one batched backward per *distinct* layer. Decoder layers with
    the same signature (module types, parameter shapes, widths and dataflow edges) compute the same
    function of their inputs, so the probe of the first such layer is reused for the others; on
    SmolLM2-135M that is 1 probe instead of 30, and the same graph (the whole trace: under 1 s instead
    of about 6 s on a 2-core CPU; ``benchmarks/bench_trace.py``).
    """
    layers = decoder_layers(model)
    layer_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    owners = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    mods = [_Module(n, m, layer_of.get(id(m))) for n, m in owners]
    executed: list[_Module] = []

    def hook_for(mod: _Module):
        def hook(_module, args, kwargs, output):
            if mod.y is not None:
                raise NotImplementedError(f"{mod.name} ran twice in one forward: shared modules are not supported")
            xs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if not isinstance(output, torch.Tensor) or not xs:
                raise NotImplementedError(f"{mod.name}: trace() expects a tensor input and a tensor output")
            mod.x, mod.y = xs[0], output
            executed.append(mod)
        return hook

    threads = torch.get_num_threads()
    handles = [m.module.register_forward_hook(hook_for(m), with_kwargs=True) for m in mods]
    try:
        torch.set_num_threads(1)  # 6 tokens: threads only add synchronization (10x slower on a busy CPU)
        with preserved(model), eager_attention(model):
            model.eval()
            model.requires_grad_(True)
            vocab = model.get_input_embeddings().num_embeddings
            ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
            with torch.enable_grad():
                model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)  # step 1
            missing = [m.name for m in mods if m.y is None]
            if missing:
                raise NotImplementedError(f"modules with parameters that the forward never ran: {missing[:5]}")
            graph = _build(model, executed)
            check(graph, model)
    finally:
        for h in handles:
            h.remove()
        torch.set_num_threads(threads)
    return replace(graph, num_layers=len(layers), total_params=count_parameters(model),
                   decoder_params=decoder_parameters(model))


# ----------------------------------------------------------------------------------------- step 2: edges
def _edges(executed: list[_Module]) -> dict[tuple[int, int], bool]:
    """Dataflow edges ``(producer, consumer) -> elementwise`` between modules (indices into ``executed``).

    From each module's input, walk ``grad_fn.next_functions`` back until a node that is some module's
    output. An edge is elementwise when every path behind it is (a residual add is; attention is not).
    """
    out_node = {m.y.grad_fn: i for i, m in enumerate(executed) if m.y.grad_fn is not None}
    edges: dict[tuple[int, int], bool] = {}
    for c, mod in enumerate(executed):
        stack, seen = [(mod.x.grad_fn, True)], set()
        while stack:
            node, ew = stack.pop()
            if node is None or (node, ew) in seen:
                continue
            seen.add((node, ew))
            if node in out_node:  # a module's output: stop, that module is a producer of this one
                p = out_node[node]
                edges[p, c] = edges.get((p, c), True) and ew
                continue
            ew_next = ew and _is_elementwise(node)
            stack.extend((nxt, ew_next) for nxt, _ in node.next_functions)
    return edges


# ----------------------------------------------------------------------------------------- step 4: probe
def _probe(consumer: _Module, producers: list[_Module]) -> list:
    """``dep[k][i, j]``: does channel i of the consumer's input depend on channel j of producer k's output?

    One batched backward: the vector-Jacobian product with a one-hot vector per input channel (the same
    on every token), all channels at once. Boolean ``(consumer width, producer width)`` per producer.
    """
    x = consumer.x
    n = x.shape[-1]
    # (n, *x.shape): probe i is e_i on every token; contiguous, which keeps the batched matmuls on BLAS
    eye = torch.eye(n, dtype=x.dtype, device=x.device).reshape(n, *([1] * (x.dim() - 1)), n)
    eye = eye.expand(n, *x.shape).contiguous()
    grads = torch.autograd.grad(x, [p.y for p in producers], grad_outputs=eye, is_grads_batched=True,
                                retain_graph=True, allow_unused=True)
    deps = []
    for p, gr in zip(producers, grads):
        if gr is None:
            deps.append(torch.zeros(n, p.y.shape[-1], dtype=torch.bool))
        else:  # (n, *tokens, width) -> any token
            deps.append((gr != 0).flatten(1, -2).any(dim=1).cpu())
    return deps


def _probe_all(executed: list[_Module], mixing: dict[int, list[int]], edges) -> dict[tuple[int, int], object]:
    """Probe every mixing edge, once per distinct layer signature (see ``trace``)."""
    by_layer: dict[int, list[int]] = {}
    for i, m in enumerate(executed):
        if m.layer is not None:
            by_layer.setdefault(m.layer, []).append(i)
    rel = {i: k for idx in by_layer.values() for k, i in enumerate(idx)}
    sig = {}
    for layer, idx in by_layer.items():
        inside = set(idx)
        sig[layer] = (tuple(executed[i].signature() for i in idx),
                      tuple(sorted((rel[p], rel[c], ew) for (p, c), ew in edges.items() if p in inside and c in inside)))
    cache: dict = {}
    dep = {}
    for c, ps in mixing.items():
        layer = executed[c].layer
        same = layer is not None and all(executed[p].layer == layer for p in ps)
        key = (sig[layer], rel[c], tuple(rel[p] for p in ps)) if same else None
        if key is None or key not in cache:
            result = _probe(executed[c], [executed[p] for p in ps])
            if key is not None:
                cache[key] = result
        else:
            result = cache[key]
        for p, d in zip(ps, result):
            dep[p, c] = d
    return dep


# ----------------------------------------------------------------------------------- steps 3 and 4: units
def _build(model, executed: list[_Module]) -> Graph:
    """Steps 2-5 of ``trace`` on the modules the forward pass ran, in order."""
    for m in executed:
        m.kind = _classify(m)
    edges = _edges(executed)
    spaces = _Spaces(executed)
    uf, classes, mixing = _join_elementwise(edges, spaces)  # step 3
    dep = _probe_all(executed, mixing, edges)  # step 4
    linked = _UnionFind()  # classes the probed mixing edges link form one channel-level problem
    for p, c in dep:
        linked.union(uf.find(spaces.of(p, "out")), uf.find(spaces.of(c, "in")))
    problems: dict = {}
    for cls in classes:
        if cls in linked.parent:
            problems.setdefault(linked.find(cls), []).append(cls)

    names: dict[int, list[str]] = {}  # id(parameter) -> all its names; the first is canonical
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    build = _GroupBuilder(executed, names)
    groups, hidden = _channel_groups(build, classes, linked, spaces)
    groups += _mixing_groups(build, problems, classes, dep, uf, spaces)

    if len(hidden) != 1:
        raise NotImplementedError(f"expected one residual (hidden) channel space, found {len(hidden)}")
    names_seen = [g.name for g in groups]
    if len(set(names_seen)) != len(names_seen):  # e.g. a mixture of experts: several MLPs in one layer
        twice = sorted({n for n in names_seen if names_seen.count(n) > 1})
        raise NotImplementedError(f"more than one group of a kind in a layer ({twice[:3]}); not supported")
    order = {"attention": 0, "qheads": 1, "mlp": 2}
    groups.sort(key=lambda g: (g.layer, order[g.kind]))
    return Graph(groups=tuple(groups) + tuple(hidden),
                 model_type=getattr(model.config, "model_type", type(model).__name__), num_layers=0,
                 hidden_size=hidden[0].units, tied_embeddings=any(m.aliases for m in hidden[0].members),
                 total_params=0, decoder_params=0)


class _Spaces:
    """The channel spaces of the executed modules, ``(module number, side)``: a norm's input and output are
    one space (``"io"``); a Linear has an ``"in"`` and an ``"out"``."""

    def __init__(self, executed: list[_Module]):
        self.executed = executed

    def of(self, i: int, side: str) -> tuple[int, str]:
        return (i, "io") if self.executed[i].kind == "norm" else (i, side)

    def width(self, space: tuple[int, str]) -> int:
        i, side = space
        return self.executed[i].width("out" if side == "io" else side)

    def layer_of(self, ss) -> int | None:
        """The decoder layer all of ``ss`` belong to, or None (the residual stream spans them all)."""
        ls = {self.executed[i].layer for i, _ in ss}
        return ls.pop() if len(ls) == 1 else None


def _join_elementwise(edges: dict, spaces: _Spaces) -> tuple[_UnionFind, dict, dict[int, list[int]]]:
    """Step 3: classes of spaces joined index-for-index by elementwise edges of equal width; the other edges
    mix channels (``mixing``: consumer -> its producers) and are probed next."""
    executed = spaces.executed
    all_spaces = [(i, s) for i, m in enumerate(executed) for s in m.spaces()]
    uf = _UnionFind()
    for s in all_spaces:
        uf.find(s)
    mixing: dict[int, list[int]] = {}
    for (p, c), ew in sorted(edges.items()):
        src, dst = spaces.of(p, "out"), spaces.of(c, "in")
        if ew and spaces.width(src) == spaces.width(dst):
            uf.union(src, dst)
        else:
            mixing.setdefault(c, []).append(p)
    classes: dict = {}
    for s in all_spaces:
        classes.setdefault(uf.find(s), []).append(s)
    return uf, classes, mixing


def _channel_groups(build: _GroupBuilder, classes: dict, linked: _UnionFind,
                    spaces: _Spaces) -> tuple[list[GroupSet], list[GroupSet]]:
    """Classes coupled index-for-index only: one unit per channel (an MLP layer's, or the hidden dimension).
    Returns (per-layer group sets, the hidden one(s))."""
    groups: list[GroupSet] = []
    hidden: list[GroupSet] = []
    for cls, ss in classes.items():
        prunable = any(s != "in" for _, s in ss) and any(s != "out" for _, s in ss)  # produced and consumed
        if cls in linked.parent or not prunable:
            continue  # e.g. the LM head's vocabulary output: produced, never consumed
        n = spaces.width(ss[0])
        per_unit = tuple((u,) for u in range(n))
        layer = spaces.layer_of(ss)
        kind = "hidden" if layer is None else "mlp"
        gs = build(f"layers.{layer}.mlp" if layer is not None else "hidden", kind, layer, n,
                   [(per_unit, s) for s in sorted(ss)])
        (hidden if layer is None else groups).append(gs)
    return groups, hidden


def _mixing_groups(build: _GroupBuilder, problems: dict, classes: dict, dep: dict, uf: _UnionFind,
                   spaces: _Spaces) -> list[GroupSet]:
    """Classes tied by mixing edges (attention): connected components over their channels, then the query
    heads within them."""
    groups: list[GroupSet] = []
    edge_cache: dict = {}
    for cls_list in problems.values():
        ss = sorted(s for cl in cls_list for s in classes[cl])
        layer = spaces.layer_of(ss)
        if layer is None:
            raise NotImplementedError("a channel-mixing coupling spans several decoder layers; not supported")
        offset, n = {}, 0
        for cl in sorted(cls_list):
            offset[cl], n = n, n + spaces.width(classes[cl][0])
        src, dst = [], []
        for (p, c), d in dep.items():
            pc, cc = uf.find(spaces.of(p, "out")), uf.find(spaces.of(c, "in"))
            if pc in offset:
                e_src, e_dst = _dep_edges(d, offset[cc], offset[pc], edge_cache)
                src.append(e_src)
                dst.append(e_dst)
        labels = _components(n, torch.cat(src), torch.cat(dst))
        root = min(s for s in ss if s[1] != "in")  # the first producer to run (q_proj): it orders the units
        r0 = offset[uf.find(root)]
        units = list(dict.fromkeys(labels[r0:r0 + spaces.width(root)].tolist() + labels.tolist()))
        index = [(_unit_index(labels[offset[uf.find(s)]:offset[uf.find(s)] + spaces.width(s)], units), s)
                 for s in ss]
        groups.append(build(f"layers.{layer}.attention", "attention", layer, len(units), index))
        if any(pp == root[0] for pp, _ in dep):
            groups.append(_qheads(build, layer, root, dep, index, spaces.of, edge_cache))
    return groups


def _unit_index(labels, units: list[int]) -> tuple[tuple[int, ...], ...]:
    """Per unit label, the positions holding it: ``((2, 3), (0, 1))`` for labels ``[7, 7, 4, 4]``, units [4, 7]."""
    pos: dict[int, list[int]] = {u: [] for u in units}
    for k, lab in enumerate(labels.tolist()):
        pos[lab].append(k)
    return tuple(tuple(pos[u]) for u in units)


class _GroupBuilder:
    """Turns per-space unit indices into a GroupSet: one Member per (parameter, dim), tied tensors once."""

    def __init__(self, executed: list[_Module], names: dict[int, list[str]]) -> None:
        self.executed, self.names = executed, names

    def __call__(self, name: str, kind: str, layer: int | None, units: int, index, parent=None) -> GroupSet:
        members: list[Member] = []
        removed = [0] * units
        seen: set[tuple[str, int]] = set()
        for idx, (i, side) in index:
            mod = self.executed[i]
            for attr, dim in mod.params("out" if side == "io" else side):
                p = getattr(mod.module, attr)
                pname, *aliases = self.names[id(p)]
                if (pname, dim) in seen:  # a tied tensor met twice (embedding and LM head)
                    continue
                seen.add((pname, dim))
                members.append(Member(param=pname, dim=dim, index=idx, aliases=tuple(aliases)))
                per_index = p.numel() // p.shape[dim]  # parameters per removed row / column
                for u in range(units):
                    removed[u] += len(idx[u]) * per_index
        return GroupSet(name=name, kind=kind, layer=layer, units=units, members=tuple(members), root=0,
                        parent=parent, params_per_unit=tuple(removed))


def _qheads(build: _GroupBuilder, layer: int, root, dep, index, space_of, edge_cache: dict) -> GroupSet:
    """Query heads: components of the root producer's dependencies alone (q rows + the o columns they reach).

    Without k and v in the picture, each query head is its own island; ``parent`` names the attention unit
    (key-value head) that holds it.
    """
    p = root[0]
    consumers = sorted(c for (pp, c) in dep if pp == p)
    rw = build.executed[p].width("out")
    src, dst, spans, o = [], [], [], rw
    for c in consumers:
        e_src, e_dst = _dep_edges(dep[p, c], o, 0, edge_cache)
        src.append(e_src)
        dst.append(e_dst)
        spans.append((o, build.executed[c].width("in"), space_of(c, "in")))
        o += spans[-1][1]
    labels = _components(o, torch.cat(src), torch.cat(dst))
    units = list(dict.fromkeys(labels[:rw].tolist()))
    q_index = [(_unit_index(labels[:rw], units), root)]
    q_index += [(_unit_index(labels[off:off + w], units), s) for off, w, s in spans]
    kv_rows = next(ix for ix, s in index if s == root)
    parent = tuple(next(a for a, rows in enumerate(kv_rows) if set(q) <= set(rows)) for q in q_index[0][0])
    return build(f"layers.{layer}.qheads", "qheads", layer, len(units), q_index, parent=parent)


# ================================================================================ the probe, by hand
NUDGE = 100.0  # large: a nudge of 1 moved one SmolLM2 o_proj input by less than float32 resolves


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the module of interest has run."""


def reference_dependency(model, producer: str, consumer: str, tokens: int = 6, seed: int = 0,
                         channels: int | None = None) -> torch.Tensor:
    """Step 4 of ``trace`` done the slow, obvious way: nudge one output channel of ``producer`` at a time and
    see which input channels of ``consumer`` change.

    ``producer`` and ``consumer`` are module names (``"model.layers.3.self_attn.q_proj"``). Returns the
    ``(consumer input width, producer output width)`` bool matrix ``dep[i, j]``: input channel i of the
    consumer depends on output channel j of the producer. One forward pass per producer channel on the same
    ``tokens`` random tokens as ``trace`` (each stopped as soon as the consumer has read its input), where the
    tracer needs one batched backward; for a class, the two are asserted equal (notebook 01). ``channels``
    nudges only the first that many producer channels (the matrix then has that many columns): at 7B scale,
    a few heads make the point in seconds.
    """
    prod, cons = model.get_submodule(producer), model.get_submodule(consumer)
    # The innermost module holding both that runs a forward of its own (``…self_attn``; a ModuleList of layers
    # does not) runs in float32 during the probe: in bfloat16 a nudge can move an attention output by less than
    # its rounding step, and the probe would miss a real dependency (notebook 01 failed at LLaMA-7B shape; at
    # llama-1b shape 201 of 32,768 k_proj -> o_proj pairs were missed). Its input is the same in every pass, so
    # the upcast is exact where it matters; bf16 -> fp32 -> bf16 restores the weights bit for bit.
    common = [p for p, _ in itertools.takewhile(lambda pq: pq[0] == pq[1], zip(producer.split("."), consumer.split(".")))]
    while common and isinstance(model.get_submodule(".".join(common)), (torch.nn.ModuleList, torch.nn.ModuleDict)):
        common.pop()
    owner = model.get_submodule(".".join(common))
    dtypes = {name: t.dtype for name, t in [*owner.named_parameters(), *owner.named_buffers()]}
    upcast = any(dt != torch.float32 and dt.is_floating_point for dt in dtypes.values())

    def to_fp32(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.float()
        if isinstance(x, (tuple, list)):
            return type(x)(to_fp32(v) for v in x)
        return x

    def owner_inputs(_module, args, kwargs):
        return to_fp32(args), {k: to_fp32(v) for k, v in kwargs.items()}

    nudge: list[int | None] = [None]
    seen: list[torch.Tensor] = []

    def add_one(_module, _args, output):
        if nudge[0] is None:
            return output
        output = output.clone()
        output[..., nudge[0]] += NUDGE
        return output

    def record(_module, args):
        seen.append(args[0].detach().clone())
        raise _Stop

    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)
    handles = [prod.register_forward_hook(add_one), cons.register_forward_pre_hook(record)]
    if upcast:
        handles.append(owner.register_forward_pre_hook(owner_inputs, with_kwargs=True))
    try:
        with preserved(model), eager_attention(model), torch.no_grad():
            model.eval()
            if upcast:
                owner.float()
            for j in [None, *range(min(channels or prod.weight.shape[0], prod.weight.shape[0]))]:
                nudge[0] = j
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        if upcast:
            for name, t in [*owner.named_parameters(), *owner.named_buffers()]:
                t.data = t.data.to(dtypes[name])
    base = seen[0]
    return torch.stack([(x != base).reshape(-1, base.shape[-1]).any(0) for x in seen[1:]], dim=1).cpu()


# ============================================================================================ summary
def summarize(graph: Graph) -> dict[str, dict[str, int]]:
    """Per kind: ``group_sets``, ``units`` (all of them), ``params`` (all their ``params_per_unit``).

    The kinds overlap: a q_proj weight is counted under ``attention`` for its rows and under ``hidden``
    for its columns (and ``qheads`` refines ``attention``), so the ``params`` do not add up to the model.
    """
    out = {}
    for kind in KINDS:
        gs = graph.of_kind(kind)
        out[kind] = {"group_sets": len(gs), "units": sum(g.units for g in gs),
                     "params": sum(sum(g.params_per_unit) for g in gs)}
    return out


# ============================================================================================ checking
def coverage(graph: Graph) -> dict[tuple[str, int], list[str]]:
    """``(parameter, dim) -> names of the GroupSets that prune it`` (``qheads`` left out: it refines
    ``attention``, so the same rows appear in both)."""
    out: dict[tuple[str, int], list[str]] = {}
    for g in graph.groups:
        if g.kind == "qheads":
            continue
        for m in g.members:
            out.setdefault((m.param, m.dim), []).append(g.name)
    return out


def check(graph: Graph, model) -> None:
    """Raise ``ValueError`` unless every parameter is covered as a pruner needs it.

    - every dimension of every parameter inside the decoder layers belongs to exactly one GroupSet
      (q/k/v/o and gate/up/down: their layer's group for one dimension, ``hidden`` for the other);
    - outside the decoder, every dimension is covered at most once and the vocabulary (the input
      embedding's rows) never is;
    - within a GroupSet the units of every member partition that dimension (disjoint, complete);
    - every ``qheads`` unit lies inside its ``parent`` attention unit.
    """
    params = dict(model.named_parameters())
    in_layers = {id(p) for p in decoder_layers(model).parameters()}
    cov = coverage(graph)
    problems = []
    for (name, dim), groups in cov.items():
        if len(groups) > 1:
            problems.append(f"{name} dim {dim} is in {len(groups)} group sets {groups}")
    for name, p in params.items():
        dims = [d for d in range(p.dim()) if (name, d) in cov]
        if id(p) in in_layers and len(dims) != p.dim():
            problems.append(f"{name} {tuple(p.shape)}: only dims {dims} are in a group")
        if id(p) not in in_layers and not dims:
            problems.append(f"{name} {tuple(p.shape)} is in no group")
    emb = model.get_input_embeddings().weight
    emb_name = next(n for n, p in params.items() if p is emb)
    if (emb_name, 0) in cov:
        problems.append(f"the vocabulary dimension of {emb_name} is in {cov[emb_name, 0]}")
    for g in graph.groups:
        for m in g.members:
            if m.param not in params:
                problems.append(f"{g.name}: {m.param} is not a parameter of the model")
                continue
            flat = sorted(i for ix in m.index for i in ix)
            if flat != list(range(params[m.param].shape[m.dim])):
                problems.append(f"{g.name}: the units of {m.param} dim {m.dim} do not partition it")
        if g.kind == "qheads":
            att = next((a for a in graph.of_kind("attention") if a.layer == g.layer), None)
            for m in g.members:
                parent = next((pm for pm in (att.members if att else ()) if (pm.param, pm.dim) == (m.param, m.dim)),
                              None)
                if parent is None or g.parent is None:
                    problems.append(f"{g.name}: {m.param} dim {m.dim} has no parent attention unit")
                    continue
                for u, a in enumerate(g.parent):
                    if not set(m.index[u]) <= set(parent.index[a]):
                        problems.append(f"{g.name}: query head {u} of {m.param} is not inside kv unit {a}")
    if problems:
        raise ValueError("the traced graph does not cover the model as expected:\n  " + "\n  ".join(problems[:20]))
