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

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
        from tailored.artifacts import write_json

        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run notebook 01 (`tailored run --steps 01`) first")
        return cls.from_dict(json.loads(path.read_text()))


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
