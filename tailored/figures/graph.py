"""Figures of the tracing stage: what a coupled group looks like inside one decoder block.

- ``draw_block``: the weight matrices of one decoder layer, drawn so that every matrix has the hidden
  dimension along its columns (``o_proj`` and ``down_proj`` are drawn transposed). Then a unit of every
  group is a set of rows (attention, MLP) or a column (hidden) you can follow with your eye:
  rows of one colour across q_proj and o_projᵀ are one key-value group; the ribbons show which k_proj and
  v_proj rows (one key-value head) serve them; shades inside a colour are the query heads.
- ``groups_per_layer``: a per-layer table of unit counts and parameter shares.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.patches import Polygon, Rectangle

from tailored.figures import plt
from tailored.graph import Graph, GroupSet, Member

KV_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
HIDDEN_COLOR = "#6b6b6b"
MLP_COLOR = "#9ecae1"
MLP_HIGHLIGHT = "#08306b"
HIDDEN_HIGHLIGHT = "#e41a1c"


def _short(param: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``."""
    return param.split(".")[-2]


def _runs(index: tuple[int, ...]) -> list[tuple[int, int]]:
    """Contiguous runs ``(start, length)`` of sorted indices: ``(0, 1, 2, 7)`` -> ``[(0, 3), (7, 1)]``."""
    runs: list[tuple[int, int]] = []
    for i in sorted(index):
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _shade(color: str, k: int, n: int) -> tuple[float, float, float]:
    """The k-th of n tints of ``color`` (query heads of one key-value group): dark to light."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    t = 0.0 if n <= 1 else 0.55 * k / (n - 1)
    return (r + (1 - r) * t, g + (1 - g) * t, b + (1 - b) * t)


def _layer_groups(graph: Graph, layer: int) -> tuple[GroupSet, GroupSet | None, GroupSet]:
    have = {g.kind: g for g in graph.groups if g.layer == layer}
    if "attention" not in have or "mlp" not in have:
        raise ValueError(f"layer {layer} is not in the graph: it has layers 0..{graph.num_layers - 1}")
    return have["attention"], have.get("qheads"), have["mlp"]


def draw_block(graph: Graph, layer: int, hidden_unit: int | None = None, mlp_unit: int | None = None):
    """Draw the coupled groups of decoder layer ``layer``; returns the matplotlib Figure.

    Every matrix is drawn with the hidden dimension across (``o_proj`` and ``down_proj`` transposed), so
    its rows are the layer's own units. ``hidden_unit`` and ``mlp_unit`` (defaults: a third of the way in,
    half-way) pick the hidden column and the MLP channel that are highlighted as examples.
    """
    att, qheads, mlp = _layer_groups(graph, layer)
    hidden = graph.of_kind("hidden")[0]
    H = graph.hidden_size
    hidden_unit = H // 6 if hidden_unit is None else hidden_unit
    mlp_unit = mlp.units // 2 if mlp_unit is None else mlp_unit
    n_att = sum(len(ix) for ix in att.members[att.root].index)
    fig, ax = plt.subplots(figsize=(13.5, 6.2))
    block = _Block(ax, H, top=max(n_att, mlp.units))
    xs = _draw_attention(block, att, qheads)
    mlp_x = _draw_mlp(block, mlp, mlp_unit)
    first_x = xs["q_proj"] if xs["left"] is None else xs["left"]
    _draw_hidden(block, graph, hidden, hidden_unit, att.members[att.root].param, mlp.members[0].param,
                 (first_x, mlp_x[0]))

    top = block.top
    ax.set_ylim(top * 1.1, -0.27 * top)
    ax.set_xlim(-0.35 * H, block.x + 0.25 * H)
    ax.axis("off")
    kv_per_group = (qheads.units // att.units) if qheads is not None else 1
    ax.set_title(
        f"Coupled groups of decoder layer {layer} ({graph.model_type}): {att.units} key-value groups of "
        f"{kv_per_group} query head{'s' if kv_per_group != 1 else ''}, {mlp.units} MLP channels, hidden {H}",
        fontsize=11, loc="left")
    ax.text(first_x, n_att + 0.16 * top, _reading_guide(graph, att, mlp, hidden, hidden_unit, mlp_unit), fontsize=8.5,
            va="top", ha="left", linespacing=1.45,
            bbox={"boxstyle": "round,pad=0.6", "facecolor": "#f7f7f7", "edgecolor": "#cccccc"})
    ax.text(first_x, -0.2 * top, f"attention: {att.units} units", fontsize=10, fontweight="bold", va="bottom")
    ax.text(mlp_x[0], -0.2 * top, f"MLP: {mlp.units} units", fontsize=10, fontweight="bold", va="bottom")
    fig.tight_layout()
    return fig


class _Block:
    """The drawing area of one decoder block: matrices laid out left to right, ``x`` where the next one goes."""

    def __init__(self, ax, hidden: int, top: int):
        self.ax, self.H, self.top = ax, hidden, top
        self.w = 0.55 * hidden  # drawn width of a matrix (the hidden dimension), squeezed to keep the figure readable
        self.gap = 0.22 * hidden
        self.x = 0.0
        self.boxes: dict[str, tuple[float, int]] = {}  # member param -> (x of its left edge, rows)

    def matrix(self, member: Member | None, rows: int, label: str, y0: float = 0.0) -> float:
        """An empty matrix of ``rows`` rows at ``x``, labelled; returns its left edge and moves ``x`` on."""
        self.ax.add_patch(Rectangle((self.x, y0), self.w, rows, facecolor="white", edgecolor="black", lw=0.8,
                                    zorder=1))
        self.ax.text(self.x + self.w / 2, y0 + rows + 0.02 * self.top, label, ha="center", va="top", fontsize=9)
        if member is not None:
            self.boxes[member.param] = (self.x, rows)
        x0, self.x = self.x, self.x + self.w + self.gap
        return x0

    def band(self, x0: float, start: int, length: int, color, y0: float = 0.0, alpha: float = 1.0) -> None:
        """Colour rows ``start .. start + length`` of the matrix whose left edge is ``x0``."""
        self.ax.add_patch(Rectangle((x0, y0 + start), self.w, length, facecolor=color, edgecolor="none", alpha=alpha,
                                    zorder=2))


def _draw_attention(block: _Block, att: GroupSet, qheads: GroupSet | None) -> dict:
    """k | q | oᵀ | v, rows coloured by key-value group and shaded by query head, with ribbons from each kv
    head to its query heads. Returns the left edges: ``{"left", "q_proj", "o_proj", "right"}`` (None if absent)."""
    H, w = block.H, block.w
    producers = [m for m in att.members if m.dim == 0 and m.param.endswith("weight")]
    consumer = next(m for m in att.members if m.dim == 1)
    root = att.members[att.root]
    side = [m for m in producers if m is not root]  # k_proj (left) and v_proj (right)
    left, right = (side + [None, None])[:2]
    n_att = sum(len(ix) for ix in root.index)
    heads_of: dict[int, list[int]] = {}
    if qheads is not None:
        for h, a in enumerate(qheads.parent or ()):
            heads_of.setdefault(a, []).append(h)
    xk = block.matrix(left, sum(len(ix) for ix in left.index), f"{_short(left.param)}\n{_dims(left, H)}") if left else None
    xq = block.matrix(root, n_att, f"{_short(root.param)}\n{_dims(root, H)}")
    block.x -= block.gap * 0.75  # q and oᵀ share their rows: draw them close together
    xo = block.matrix(consumer, n_att, f"{_short(consumer.param)}ᵀ\n{_dims(consumer, H)}")
    xv = block.matrix(right, sum(len(ix) for ix in right.index), f"{_short(right.param)}\n{_dims(right, H)}") if right else None
    for u in range(att.units):
        color = KV_COLORS[u % len(KV_COLORS)]
        for member, x0 in ((left, xk), (right, xv)):
            if member is not None:
                for s, n in _runs(member.index[u]):
                    block.band(x0, s, n, color)
        _shade_query_heads(block, u, color, heads_of.get(u, []), qheads, ((root, xq), (consumer, xo)))
        # ribbons: the kv head's rows fan out to the query heads that read them
        q_lo, q_hi = min(root.index[u]), max(root.index[u]) + 1
        for member, x0, toward in ((left, xk, xq), (right, xv, xo)):
            if member is None:
                continue
            lo, hi = min(member.index[u]), max(member.index[u]) + 1
            if toward < x0:  # the ribbon leaves from the left edge
                pts = [(x0, lo), (x0, hi), (toward + w, q_hi), (toward + w, q_lo)]
            else:
                pts = [(x0 + w, lo), (x0 + w, hi), (toward, q_hi), (toward, q_lo)]
            block.ax.add_patch(Polygon(pts, closed=True, facecolor=color, alpha=0.18, edgecolor="none", zorder=0))
    _label_heads(block, att, qheads, root, ((left, xk), (right, xv)), xo)
    return {"left": xk, "q_proj": xq, "o_proj": xo, "right": xv}


def _shade_query_heads(block: _Block, u: int, color, heads: list[int], qheads: GroupSet | None,
                       drawn: tuple[tuple[Member, float], ...]) -> None:
    """The rows of kv group ``u`` in q_proj and o_projᵀ: one shade of its colour per query head (or one colour)."""
    for member, x0 in drawn:
        if qheads is not None and heads:
            qm = qheads.member(_short(member.param) + ".weight")
            for k, h in enumerate(heads):
                for s, n in _runs(qm.index[h]):
                    block.band(x0, s, n, _shade(color, k, len(heads)))
                    block.ax.plot([x0, x0 + block.w], [s, s], color="white", lw=0.6, zorder=3)
        else:
            for s, n in _runs(member.index[u]):
                block.band(x0, s, n, color)


def _label_heads(block: _Block, att: GroupSet, qheads: GroupSet | None, root: Member,
                 kv_drawn: tuple[tuple[Member | None, float | None], ...], xo: float) -> None:
    """Name the query heads (in o_projᵀ) and the kv heads (in k_proj, v_proj) where there are few enough."""
    w = block.w
    if qheads is not None and qheads.units <= 16:
        qm = qheads.member(_short(root.param) + ".weight")
        for h in range(qheads.units):
            mid = (min(qm.index[h]) + max(qm.index[h]) + 1) / 2
            block.ax.text(xo + 0.62 * w, mid, f"q head {h}", ha="center", va="center", fontsize=7, color="white",
                          zorder=6)
    if att.units <= 16:
        for u in range(att.units):
            for member, x0 in kv_drawn:
                if member is not None:
                    mid = (min(member.index[u]) + max(member.index[u]) + 1) / 2
                    block.ax.text(x0 + 0.62 * w, mid, f"kv head {u}", ha="center", va="center", fontsize=7,
                                  color="white", zorder=6)


def _draw_mlp(block: _Block, mlp: GroupSet, mlp_unit: int) -> list[float]:
    """gate | up | downᵀ, one unit = one row of each, ``mlp_unit`` highlighted; returns their left edges."""
    H, w, top = block.H, block.w, block.top
    block.x += 0.6 * block.gap
    mlp_x = []
    for m in mlp.members:
        suffix = "ᵀ" if m.dim == 1 else ""
        x0 = block.matrix(m, mlp.units, f"{_short(m.param)}{suffix}\n{_dims(m, H)}")
        block.band(x0, 0, mlp.units, MLP_COLOR)
        mlp_x.append(x0)
    for x0 in mlp_x:
        block.ax.plot([x0, x0 + w], [mlp_unit + 0.5] * 2, color=MLP_HIGHLIGHT, lw=2.2, zorder=4)
    block.ax.annotate(f"MLP unit {mlp_unit}",
                      xy=(mlp_x[-1] + w, mlp_unit), xytext=(mlp_x[-1] + w + 0.12 * H, mlp_unit + 0.12 * top),
                      fontsize=8, color=MLP_HIGHLIGHT, arrowprops={"arrowstyle": "->", "color": MLP_HIGHLIGHT})
    return mlp_x


def _draw_hidden(block: _Block, graph: Graph, hidden: GroupSet, hidden_unit: int, q_param: str, gate_param: str,
                 norm_x: tuple[float, float]) -> None:
    """The hidden unit: its column of every matrix drawn, and of the norms before attention and MLP."""
    H, w, top, ax = block.H, block.w, block.top, block.ax
    col = hidden_unit / H * w
    for x0, rows in block.boxes.values():
        ax.plot([x0 + col] * 2, [0, rows], color=HIDDEN_HIGHLIGHT, lw=1.0, zorder=5)
    norms = [_norm_before(graph, hidden, q_param), _norm_before(graph, hidden, gate_param)]
    for m, x0 in zip(norms, norm_x):
        if m is None:
            continue
        y = -0.09 * top
        ax.add_patch(Rectangle((x0, y), w, 0.035 * top, facecolor=HIDDEN_COLOR, edgecolor="black", lw=0.6))
        ax.plot([x0 + col] * 2, [y, y + 0.035 * top], color=HIDDEN_HIGHLIGHT, lw=1.6, zorder=5)
        ax.text(x0 - 0.02 * H, y + 0.0175 * top, f"{_short(m.param)} ({H})", ha="right", va="center", fontsize=8)
    ax.text(norm_x[0] + col, -0.1 * top, f"hidden unit {hidden_unit}", color=HIDDEN_HIGHLIGHT, fontsize=8,
            ha="center", va="bottom")


def _reading_guide(graph: Graph, att: GroupSet, mlp: GroupSet, hidden: GroupSet, hidden_unit: int,
                   mlp_unit: int) -> str:
    """The box under the figure that says how to read it, with this model's numbers."""
    return (
        "How to read it\n"
        "• Every matrix has the hidden dimension across (o_proj, down_proj drawn transposed),\n"
        "  so its rows are the units of this layer's groups.\n"
        f"• One colour = one attention unit: a key-value head (its k_proj and v_proj rows), the\n"
        f"  query heads that share it (shades in q_proj) and their o_proj columns: {att.params_per_unit[0]:,} params.\n"
        f"• Dark line = one MLP unit: a row of gate_proj and up_proj, a column of down_proj: "
        f"{mlp.params_per_unit[mlp_unit]:,} params.\n"
        f"• Red line = hidden unit {hidden_unit}: that column of every matrix and norm in all\n"
        f"  {graph.num_layers} layers, plus the embedding and LM head: {hidden.params_per_unit[hidden_unit]:,} params.\n"
        "Pruning a row or column means pruning its whole unit, or the shapes stop matching."
    )


def _norm_before(graph: Graph, hidden: GroupSet, param: str) -> Member | None:
    """The hidden member that runs just before ``param`` and is not a projection: the norm feeding it.

    ``hidden.members`` are in execution order (embedding, norm, q, k, v, o, norm, gate, up, down, …).
    """
    projections = {m.param for g in graph.groups if g.kind in ("attention", "mlp") for m in g.members}
    names = [m.param for m in hidden.members]
    for m in reversed(hidden.members[:names.index(param)] if param in names else []):
        if m.param not in projections:
            return m
    return None


def _dims(member: Member, hidden: int) -> str:
    """``576×192`` as drawn: rows (the group's units) × columns (hidden)."""
    rows = sum(len(ix) for ix in member.index)
    return f"{rows}×{hidden}"


def groups_per_layer(graph: Graph) -> pd.DataFrame:
    """One row per decoder layer: units of each kind and the layer's share of the decoder parameters.

    Columns: ``layer``, ``kv_groups``, ``query_heads``, ``mlp_channels``, ``params_per_kv_group``,
    ``params_per_mlp_channel``, ``attention_params``, ``mlp_params``, ``attention_share`` and ``mlp_share``
    (fractions of all decoder-layer parameters), and a final ``total`` row.
    """
    rows = []
    for layer in range(graph.num_layers):
        att, qheads, mlp = _layer_groups(graph, layer)
        rows.append({
            "layer": str(layer), "kv_groups": att.units, "query_heads": qheads.units if qheads else att.units,
            "mlp_channels": mlp.units,
            "params_per_kv_group": att.params_per_unit[0] if att.units else 0,
            "params_per_mlp_channel": mlp.params_per_unit[0] if mlp.units else 0,
            "attention_params": sum(att.params_per_unit), "mlp_params": sum(mlp.params_per_unit),
        })
    df = pd.DataFrame(rows)
    total = {c: int(df[c].sum()) for c in ("kv_groups", "query_heads", "mlp_channels", "attention_params",
                                           "mlp_params")}
    df = pd.concat([df, pd.DataFrame([{"layer": "total", **total, "params_per_kv_group": "",
                                       "params_per_mlp_channel": ""}])], ignore_index=True)
    df["attention_share"] = df["attention_params"] / graph.decoder_params
    df["mlp_share"] = df["mlp_params"] / graph.decoder_params
    return df
