"""Model anatomy: where the decoder blocks are, how many parameters they hold, which dtype and device.

A leaf module: it imports torch and nothing of ours, so every stage (graph, importance, prune, checkpoint,
models) can stand on it without import cycles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"bf16"``… (or a ``torch.dtype``) as a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; a CUDA device asked for without one is refused."""
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device: use 'cpu', 'cuda', 'cuda:1', 'mps' or "
                         "'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device; use 'cpu' or 'auto'")
    return dev


def count_parameters(model: torch.nn.Module) -> int:
    """Parameters counted once each (a tied embedding and LM head count once)."""
    return sum(p.numel() for p in model.parameters())


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder blocks: its longest ``nn.ModuleList`` (``model.model.layers`` for LLaMA)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of decoder layers")
    return max(lists, key=len)


def decoder_parameters(model: torch.nn.Module) -> int:
    """Parameters inside the decoder layers: the denominator of this study's pruning shares."""
    return sum(p.numel() for p in decoder_layers(model).parameters())


def sync_module_attributes(model: torch.nn.Module) -> None:
    """Make every module's size attributes agree with its (possibly pruned) weights.

    The forward pass reads ``head_dim`` (unchanged by pruning) and ``num_key_value_groups`` (query heads
    per kv head, used by ``repeat_kv``); the rest (``in_features``, ``intermediate_size``, ...) is kept
    true so that ``print(model)``, PEFT and anyone else reading them see the real sizes.
    """
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, torch.nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape
        if all(hasattr(mod, a) for a in ("q_proj", "k_proj", "head_dim")):
            n_q = mod.q_proj.weight.shape[0] // mod.head_dim
            n_kv = mod.k_proj.weight.shape[0] // mod.head_dim
            if n_kv == 0 or n_q % n_kv:
                raise ValueError(f"attention with {n_q} query heads and {n_kv} kv heads: query heads must be a "
                                 "multiple of kv heads")
            mod.num_key_value_groups = n_q // n_kv
            for attr, val in (("num_heads", n_q), ("num_key_value_heads", n_kv)):
                if hasattr(mod, attr):
                    setattr(mod, attr, val)
        if all(hasattr(mod, a) for a in ("gate_proj", "down_proj")):
            if hasattr(mod, "intermediate_size"):
                mod.intermediate_size = mod.gate_proj.weight.shape[0]
            if hasattr(mod, "hidden_size"):
                mod.hidden_size = mod.gate_proj.weight.shape[1]
        if hasattr(mod, "input_layernorm") and hasattr(mod, "hidden_size"):
            mod.hidden_size = mod.input_layernorm.weight.shape[0]


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    """A fingerprint of a model's weights: every tensor's name, shape, dtype, sum and sum of squares (float64),
    and an evenly strided sample of its values. Two models made differently (another pruning plan, another
    estimator) differ in it; reading it costs one pass over the weights, not a hash of every byte."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if flat.numel() and (flat.is_floating_point() or flat.dtype in (torch.int64, torch.int32)):
            sums = torch.zeros(2, dtype=torch.float64, device=flat.device)
            for start in range(0, flat.numel(), _FINGERPRINT_CHUNK):  # float64 a chunk at a time, never the tensor
                x = flat[start:start + _FINGERPRINT_CHUNK].double()
                sums += torch.stack([x.sum(), x.square().sum()])
            picked = flat[:: max(1, flat.numel() // sample)].double()
            h.update(sums.cpu().numpy().tobytes())
            h.update(picked.cpu().numpy().tobytes())
    return h.hexdigest()[:24]


# Elements per float64 chunk of weights_fingerprint: 8 MiB at a time. A float64 copy of each whole tensor (and its
# square) took the peak 3.9 GiB above the weights at random:llama-1b (benchmarks/README.md, the paper profile on a CPU).
_FINGERPRINT_CHUNK = 1 << 20


def set_recompute_activations(model: torch.nn.Module, enable: bool = True) -> None:
    """Have the decoder layers recompute their activations in the backward pass (or keep them, ``enable=False``).

    A recomputing layer keeps only its input for the backward pass and recomputes the rest there: about one
    more forward pass of time for activation memory of one layer instead of all of them. This is what
    transformers calls gradient (or activation) checkpointing; 5.x renamed its switch
    (``activation_checkpointing_enable``, formerly ``gradient_checkpointing_enable``), and either is used.
    Non-reentrant, so frozen inputs need no ``requires_grad`` trick.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if enable:
        switch = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        switch({"use_reentrant": False})
    else:
        switch = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
        switch()


def recomputes_activations(model: torch.nn.Module) -> bool:
    """Whether the decoder layers recompute their activations now (``set_recompute_activations``'s state, read
    from transformers' flag under either of its names)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = type(base)
    name = "is_activation_checkpointing" if hasattr(cls, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(base, name, False))


@contextmanager
def preserved(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a block that changes the model's mode or flags, and find them as they were afterwards::

        with preserved(model):
            model.eval()
            model.requires_grad_(False)
            ...                                   # however the block ends, even by an exception

    Restored: the train/eval mode of every module (a block may flag single layers as training, as
    ``compute_importance`` does to have them recomputed), each parameter's ``requires_grad``, and whether the
    decoder layers recompute their activations in the backward pass (``set_recompute_activations``). Weights, buffers
    and ``.grad`` are not touched.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    recomputing = recomputes_activations(model)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        if recomputes_activations(model) != recomputing:
            set_recompute_activations(model, recomputing)
        for m, mode in modes:
            m.training = mode


def dispatch(model: torch.nn.Module, device_map: str | dict, dtype: torch.dtype | None = None,
             offload_dir: str | None = None) -> torch.nn.Module:
    """Spread a materialized ``model`` over devices with accelerate's dispatch; hooks move the activations.

    ``device_map``: a dict ``{module name: device}`` (``"disk"`` entries are written to ``offload_dir``), or
    ``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"``: accelerate places whole decoder blocks
    by the free memory of each GPU, then the CPU, as ``from_pretrained(device_map=...)`` does. For models whose
    layers have different shapes (a pruned checkpoint), which ``from_pretrained`` cannot build.
    """
    # accelerate is imported here, not at the top: it is only needed for models spread over devices
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        keep = [type(decoder_layers(model)[0]).__name__]  # a decoder block is never cut between devices
        max_memory = None
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, no_split_module_classes=keep, dtype=dtype,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=keep, dtype=dtype)
    model = dispatch_model(model, device_map=device_map, offload_dir=offload_dir)
    model.hf_device_map = dict(device_map)
    return model
