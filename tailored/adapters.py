"""LoRA adapters on a model: PEFT's configuration, adding fresh ones, loading saved ones, merging them in.

LoRA (Hu et al., 2021) freezes every weight ``W`` of the model and learns a low-rank update beside it::

    h = W x + (alpha / r) * B A x        A: (r, d_in), B: (d_out, r), B = 0 at the start

The matrices follow the model's (pruned) shapes layer by layer. An adapter is saved in PEFT's format,
``adapter_config.json`` + ``adapter_model.safetensors`` (never a pickle), always through a temporary folder
and a rename, so a reader never sees half of one. A finished run's folder is sealed (``SHA256SUMS``: the sha256
of each file, ``tailored.artifacts.seal``), and a sealed adapter is checked by content before it is loaded, so a
damaged one is never used. Training them is ``tailored.lora``'s job.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError

from tailored.artifacts import is_sealed, open_safetensors, seal, verify
from tailored.paths import write_failed

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
WEIGHTS = "adapter_model.safetensors"
RETRAIN = "train it again (notebook 04: `tailored run --steps 04 --force`)"  # what rebuilds a damaged adapter


class AdapterSettings(Protocol):
    """What an adapter's shape is made of (``tailored.lora.LoraSettings`` has these and more)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    seed: int


def lora_config(settings: AdapterSettings):
    """PEFT's ``LoraConfig`` for ``settings``: rank, alpha, dropout and target modules, no bias, causal LM."""
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")


def add_lora(model, settings: AdapterSettings):
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
    per-layer widths. ``adapter_dir`` is a finished run's ``out_dir`` or one of its ``snapshot-<step>``.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        hint = " (the run has not finished; its snapshot-<step> folders hold adapters)" if adapter_dir.is_dir() else ""
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json: not a saved LoRA adapter{hint}")
    if not (adapter_dir / "adapter_model.safetensors").exists():  # PEFT would fall back to a pickle
        pickled = [p.name for p in adapter_dir.glob("adapter_model.*")]
        if pickled:
            raise ValueError(f"{adapter_dir} holds {', '.join(pickled)}, a pickle, which can run code when loaded: "
                             "tailored loads adapters from adapter_model.safetensors only. Train the adapter again, "
                             "or convert it once where you trust it (load it with PEFT, save_pretrained it)")
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_model.safetensors: the adapter's weights are missing")
    check_adapter(adapter_dir)
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


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every parameter that trains (the LoRA matrices of a ``PeftModel``)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def check_adapter(adapter_dir: str | Path) -> None:
    """Raise ``ArtifactError`` (one line, naming the file) unless the adapter's bytes are as written: a sealed folder
    is checked against its ``SHA256SUMS``; an unsealed one (a snapshot's, or saved elsewhere) only by reading
    its safetensors header, which a truncated file fails."""
    adapter_dir = Path(adapter_dir)
    if is_sealed(adapter_dir):
        verify(adapter_dir, RETRAIN)
    else:
        with open_safetensors(adapter_dir / WEIGHTS, RETRAIN):
            pass


def load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    """Load the adapter weights saved in ``adapter_dir`` into ``peft_model``'s LoRA layers, in place (checked
    first: ``check_adapter``)."""
    from peft import set_peft_model_state_dict  # peft is imported lazily: 5 s, and only training needs it

    check_adapter(adapter_dir)
    with open_safetensors(Path(adapter_dir) / WEIGHTS, RETRAIN) as fh:
        weights = {k: fh.get_tensor(k) for k in fh.keys()}
    set_peft_model_state_dict(peft_model, weights)


def write_adapter(peft_model, dest: Path) -> None:
    """``save_pretrained`` into a temporary folder, then rename: a reader never sees half an adapter."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_peft(peft_model, tmp, dest)
    seal(tmp)
    swap_dir(tmp, dest)


def save_peft(peft_model, tmp: Path, dest: Path) -> None:
    """PEFT's ``save_pretrained`` into the temporary folder ``tmp`` of ``dest``; a failed write (a full disk, a
    file-size limit) removes ``tmp`` and raises ``tailored.paths.WriteFailed`` naming ``dest``'s weights file, where
    safetensors' own error says only "I/O error: File too large"."""
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        stable_config(tmp / ADAPTER_FILES[0])
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, OSError):  # safetensors' Rust writer: the cause is only in its text
            text = str(err).lower()
            code = errno.EFBIG if "too large" in text else errno.ENOSPC if "no space" in text else None
            err = OSError(code, str(err))
        raise write_failed(dest / WEIGHTS, err) from None


def stable_config(path: Path) -> None:
    """Rewrite PEFT's ``adapter_config.json`` with ``target_modules`` sorted: PEFT writes them from a set, in an
    order that changes with Python's string hashing from one process to the next, so the same adapter (the very
    same weights, retrained on another machine) got other config bytes and another seal."""
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def install_adapter(src: Path, out_dir: Path) -> None:
    """Copy an adapter's files into ``out_dir`` itself, each through a temporary file and a rename (``src`` checked
    first: ``check_adapter``). The caller seals ``out_dir`` once the run's metrics are beside them."""
    check_adapter(src)
    for name in ADAPTER_FILES:
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        shutil.copyfile(src / name, tmp)
        os.replace(tmp, out_dir / name)


def swap_dir(tmp: Path, dest: Path) -> None:
    """Put the finished folder ``tmp`` at ``dest``, replacing what was there, by renames only."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
