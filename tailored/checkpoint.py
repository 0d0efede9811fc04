"""Save and reload pruned models: safetensors weights + the per-layer shapes a stock config cannot hold.

A pruned LLaMA has, say, 2 key-value heads in layer 5 and 3 in layer 6, and a different MLP width in
every layer; ``LlamaConfig`` has one number for each. So a pruned checkpoint is a folder::

    config.json            the dense architecture (what from_config builds before reshaping; after
                           layer-wise pruning its num_hidden_layers counts the layers kept)
    generation_config.json
    model.safetensors      the weights (no pickle: LLM-Pruner's torch.save files run code when loaded)
    pruning.json           every tensor's shape, a per-layer summary, and the pruning record
    tokenizer files
    SHA256SUMS             the sha256 of every file above: load_pruned checks the bytes against it first

Bias compensation (FLAP) gives ``o_proj`` / ``down_proj`` a bias that HF Llama builds without; such
tensors are listed under ``added_biases`` in ``pruning.json`` and ``load_pruned`` creates them.

``load_pruned`` builds the dense architecture on the meta device (no memory, no random init), gives each
module the recorded shapes, checks the file against them, and loads the weights into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tailored.anatomy import decoder_layers, dispatch, resolve_device, resolve_dtype, sync_module_attributes
from tailored.artifacts import is_sealed, json_safe, seal, verify, write_safetensors

FORMAT = "tailored.pruned/1"
WEIGHTS = "model.safetensors"
RECORD = "pruning.json"
RESAVE = "save the checkpoint again (in a run: notebook 03, `tailored run --from 03`)"
CONFIG = "config.json"
_LAYER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# =============================================================================================== save
def save_pruned(model: torch.nn.Module, tokenizer, dir: str | Path, record: Mapping | None = None) -> Path:
    """Write ``model`` (pruned or not) and ``tokenizer`` to ``dir`` as a pruned checkpoint; return ``dir``.

    ``record`` says how the model was made (method, estimator, target, achieved share, kept indices, e.g.
    ``{"plan": plan.to_dict(), "estimator": "param_first"}``); it is stored as is in ``pruning.json``.
    The folder is written next to ``dir`` under a temporary name and renamed into place, so an interrupted
    save never leaves a half-written checkpoint where a good one was.
    """
    dir = Path(dir)
    tensors, names = {}, {}
    for name, p in model.named_parameters():  # each tensor once: a tied LM head is the embedding
        tensors[name] = p.detach().to("cpu").contiguous()
        names[id(p)] = name
    tied = {alias: names[id(p)] for alias, p in model.named_parameters(remove_duplicate=False)
            if names.get(id(p)) not in (None, alias)}
    persistent = {n for n, _ in model.named_buffers()} - _non_persistent_buffers(model)
    for name, b in model.named_buffers():
        if name in persistent:
            tensors[name] = b.detach().to("cpu").contiguous()

    layers = decoder_layers(model)
    added = _added_biases(model)
    meta = {
        "format": FORMAT,
        "model_type": getattr(model.config, "model_type", type(model).__name__),
        "num_layers": len(layers),
        "hidden_size": model.get_input_embeddings().weight.shape[1],
        "config": _architecture(model.config),  # as saved in config.json, to notice a later edit of it
        "tied": tied,  # alias -> the tensor it shares (stored once)
        "parameters": sum(t.numel() for n, t in tensors.items() if n not in persistent),
        "layers": [_layer_summary(i, layer) for i, layer in enumerate(layers)],
        "shapes": {n: list(t.shape) for n, t in tensors.items()},
        "added_biases": added,  # Linear biases the stock architecture lacks (bias compensation)
        "record": dict(record or {}),
    }

    dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = dir.with_name(f".{dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_safetensors(tmp / WEIGHTS, tensors, metadata={"format": "pt"}, sealed=False)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(_readable_json(meta))
        seal(tmp)  # SHA256SUMS arrives with the files, in the one rename
        old = dir.with_name(f".{dir.name}.old-{os.getpid()}")
        if dir.exists():
            os.replace(dir, old)  # a directory cannot be replaced in one step: move the old one aside first
        os.replace(tmp, dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dir


def _readable_json(obj) -> str:
    """JSON with short lists of numbers (shapes, kept indices) on one line, so people can read it."""
    text = json.dumps(json_safe(obj), indent=2)
    return re.sub(r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(m.group(1).replace(",", " ").split()) + "]", text) + "\n"


def _layer_summary(index: int, layer: torch.nn.Module) -> dict:
    """Shapes of one decoder layer, for people reading pruning.json (the loader uses ``shapes``)."""
    out: dict = {"layer": index}
    mods = dict(layer.named_modules())
    for proj in _LAYER_PROJECTIONS:
        m = next((mod for name, mod in mods.items() if name.endswith(proj)), None)
        if m is not None:
            out[proj] = list(m.weight.shape)
    attn = next((m for m in layer.modules() if hasattr(m, "q_proj") and hasattr(m, "head_dim")), None)
    if attn is not None:
        out["head_dim"] = attn.head_dim
        out["num_heads"] = attn.q_proj.weight.shape[0] // attn.head_dim
        out["num_kv_heads"] = attn.k_proj.weight.shape[0] // attn.head_dim
    norm = getattr(layer, "input_layernorm", None)
    if norm is not None:
        out["hidden_size"] = norm.weight.shape[0]
    return out


def _added_biases(model: torch.nn.Module) -> list[str]:
    """Names of Linear biases that the model's stock architecture (built from its config) does not have."""
    from transformers import AutoModelForCausalLM

    biases = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    if not biases:
        return []
    with torch.device("meta"):
        stock = AutoModelForCausalLM.from_config(model.config)
    have = {n for n, m in stock.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    return [f"{n}.bias" for n in biases if n not in have]


def _non_persistent_buffers(model: torch.nn.Module) -> set[str]:
    out = set()
    for prefix, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            out.add(f"{prefix}.{b}" if prefix else b)
    return out


# =============================================================================================== load
def is_checkpoint(dir: str | Path) -> bool:
    """Does ``dir`` hold a pruned checkpoint (its ``pruning.json``)?"""
    return (Path(dir) / RECORD).is_file()


def read_record(dir: str | Path) -> dict:
    """The contents of a checkpoint's ``pruning.json`` (shapes, per-layer summary, ``record``), checked."""
    path = Path(dir) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"{dir} is not a pruned checkpoint: it has no {RECORD}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the checkpoint is damaged, save it again "
                         "(notebook 03: `tailored run --from 03`)") from None
    if meta.get("format") != FORMAT or "shapes" not in meta:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r} or has no 'shapes'")
    return meta


def load_pruned(dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                attn_implementation: str | None = None, device_map: str | dict | None = None):
    """Rebuild a model saved by ``save_pruned``; return ``(model, tokenizer)`` in eval mode.

    Weights are read with safetensors only (never ``torch.load``), memory-mapped on the CPU: pages are read as a
    forward touches them, and every tensor shares the file's one mapping, so a single module kept after the model
    is dropped keeps all the pages read so far resident (3.2 GiB of a 50% LLaMA-3.2-1B; notebook 04 drops its
    last one). Raises ``FileNotFoundError`` when
    ``dir`` is not a pruned checkpoint (saying which files are missing) and ``ValueError`` naming the file
    and tensor when a file is corrupted or its shapes disagree with ``pruning.json``, and naming the key when
    ``config.json`` disagrees with the stored tensors (``_check_config``). A sealed checkpoint (``SHA256SUMS``,
    as ``save_pruned`` writes) is checked by content first: a changed byte raises ``ArtifactError`` naming the file.

    ``device_map`` (a pruned model that does not fit one device): built on ``device`` (the CPU), then spread
    with ``tailored.anatomy.dispatch`` (``"auto"`` or ``{module name: device}``; ``"disk"`` entries are kept in
    ``<dir>.offload``).
    """
    dir = Path(dir)
    if not dir.is_dir():
        raise FileNotFoundError(f"{dir} is not a directory: expected a pruned checkpoint written by save_pruned")
    missing = [f for f in (CONFIG, WEIGHTS, RECORD) if not (dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{dir} is not a pruned checkpoint: missing {', '.join(missing)} "
                                "(save_pruned writes config.json, model.safetensors and pruning.json)")
    if is_sealed(dir):
        verify(dir, RESAVE)
    meta = read_record(dir)
    shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
    weights = dir / WEIGHTS

    # 1. what the file holds, checked against pruning.json before anything is built
    try:
        with safe_open(str(weights), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights}: cannot be read as safetensors ({e}); the file is corrupted or truncated, "
                         "save the checkpoint again") from None
    for name, shape in shapes.items():
        if name not in stored:
            raise ValueError(f"{weights}: has no tensor {name}, which pruning.json lists with shape {shape}")
        if stored[name] != shape:
            raise ValueError(f"{weights}: {name} has shape {stored[name]} but pruning.json says {shape}")
    extra = sorted(set(stored) - set(shapes))
    if extra:
        raise ValueError(f"{weights}: holds tensors pruning.json does not list: {extra[:5]}")

    # 2. the dense architecture, without memory, then the recorded shapes
    config = AutoConfig.from_pretrained(dir)
    _check_config(config, stored, meta, dir)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    for name in meta.get("added_biases", []):  # bias compensation: a bias the stock Linear is built without
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name) if name in shapes and attr == "bias" else None
        if not isinstance(mod, torch.nn.Linear) or mod.bias is not None:
            raise ValueError(f"{dir / RECORD}: added bias {name} is not the missing bias of a Linear layer of the "
                             f"architecture in {dir / CONFIG}")
        mod.bias = torch.nn.Parameter(torch.empty(shapes[name], device="meta", dtype=mod.weight.dtype))
        own[name] = mod.bias
    for name, shape in shapes.items():
        if name not in own:
            raise ValueError(f"{dir / RECORD}: lists {name}, which the architecture of {dir / CONFIG} does not "
                             "have (config.json and pruning.json are from different models)")
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        empty = torch.empty(shape, device="meta", dtype=own[name].dtype)
        if attr in mod._parameters:
            setattr(mod, attr, torch.nn.Parameter(empty, requires_grad=own[name].requires_grad))
        else:
            mod._buffers[attr] = empty

    # 3. the weights, then ties and the buffers that are computed rather than stored (rotary frequencies)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: t.to(dev, dt) if t.is_floating_point() else t.to(dev) for k, t in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    for alias, target in meta.get("tied", {}).items():
        src_mod, _, src_attr = target.rpartition(".")
        dst_mod, _, dst_attr = alias.rpartition(".")
        setattr(model.get_submodule(dst_mod), dst_attr, getattr(model.get_submodule(src_mod), src_attr))
    _rebuild_computed_buffers(model, config, dev)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"{weights}: no values for {still_meta[:5]}; the checkpoint is incomplete")
    model.to(device=dev, dtype=dt)
    sync_module_attributes(model)
    if device_map is not None:
        model = dispatch(model, device_map, dt, offload_dir=f"{dir}.offload")
    model.eval()

    tokenizer = AutoTokenizer.from_pretrained(dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _check_config(config, stored: Mapping[str, tuple[int, ...]], meta: Mapping, dir: Path) -> None:
    """Does ``config.json`` describe the stored tensors? ``ValueError`` naming the file and the disagreement.

    First, the architecture numbers must be those ``save_pruned`` recorded in ``pruning.json`` (checkpoints
    saved before it recorded them skip this). Then the tensors: the config keeps the dense widths and pruning
    only removes heads and channels, so vocabulary = embedding rows; layers = the layers stored; hidden size
    >= embedding width; every layer's q/k/v rows a whole number of heads of the config's ``head_dim`` (the
    rotary embedding and the attention reshape read it), no more heads than the config has, query heads a
    multiple of kv heads; ``head_dim`` the one recorded per layer in ``pruning.json``.
    """
    where = dir / CONFIG

    def bad(msg: str):
        raise ValueError(f"{where}: {msg}: config.json does not describe this checkpoint (edited, or from "
                         "another model); restore it, or save the checkpoint again")

    saved = meta.get("config") or {}
    now = _architecture(config)
    changed = [f"{k} {now.get(k)} (saved as {v})" for k, v in saved.items() if now.get(k) != v]
    if changed:
        bad(f"says {', '.join(changed)}")
    embed = next((shape for name, shape in stored.items() if name.endswith("embed_tokens.weight")), None)
    if embed is not None:
        vocab, width = embed
        if getattr(config, "vocab_size", vocab) != vocab:
            bad(f"vocab_size is {config.vocab_size} but the embedding has {vocab} rows")
        if config.hidden_size < width:  # larger is possible: pruning hidden channels keeps the dense config
            bad(f"hidden_size is {config.hidden_size} but the embedding is {width} wide")
    layers = {int(m.group(1)) for name in stored if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", name))}
    if layers and config.num_hidden_layers != len(layers):
        bad(f"num_hidden_layers is {config.num_hidden_layers} but {len(layers)} layers are stored")
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    recorded = {s.get("head_dim") for s in meta.get("layers", ()) if s.get("head_dim") is not None}
    if recorded and recorded != {head_dim}:
        bad(f"head_dim is {head_dim} (hidden_size {config.hidden_size}, {heads} heads) but pruning.json records "
            f"{sorted(recorded)}")
    rows: dict[int, dict[str, int]] = {}  # layer -> {"q": rows of q_proj, "k": ..., "v": ...}
    for name, shape in stored.items():
        if m := re.search(r"layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$", name):
            rows.setdefault(int(m.group(1)), {})[m.group(2)] = shape[0]
    for i, r in sorted(rows.items()):
        for p, n in r.items():
            if n % head_dim:
                bad(f"head_dim is {head_dim} but layer {i}'s {p}_proj has {n} rows, not a whole number of heads")
        n_q, n_kv = r.get("q", 0) // head_dim, r.get("k", 0) // head_dim
        if n_q > heads or n_kv > kv_heads:
            bad(f"num_attention_heads / num_key_value_heads are {heads} / {kv_heads} but layer {i} stores "
                f"{n_q} query and {n_kv} key-value heads of {head_dim}")
        if n_kv == 0 or n_q % n_kv:
            bad(f"layer {i} stores {n_q} query heads and {n_kv} key-value heads: not a multiple")


def _architecture(config) -> dict:
    """The numbers of a config that shape the model's tensors and its attention (what ``_check_config`` reads)."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


def _rebuild_computed_buffers(model: torch.nn.Module, config, device: torch.device) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) are not in the file: rebuild their modules for real."""
    for prefix, mod in list(model.named_modules()):
        if not any(b is not None and b.is_meta for b in mod._buffers.values()):
            continue
        if mod._parameters or any(True for _ in mod.children()):
            raise ValueError(f"{prefix} ({type(mod).__name__}) has buffers that are neither saved nor rebuildable")
        fresh = type(mod)(config=config).to(device)  # e.g. LlamaRotaryEmbedding(config)
        parent_name, _, attr = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, fresh)
