"""The resumable saved state of a LoRA run: ``snapshot-<step>/`` folders inside the run's ``out_dir``.

Every ``save_every`` steps ``tailored.lora.train_lora`` saves a *snapshot*: the adapter (PEFT format), the
optimizer's state (safetensors + JSON), the random state and the trainer's state (step, losses, validation,
settings, fingerprints). A rerun continues from the latest complete snapshot instead of restarting; a finished
run keeps only its adapter. (A *checkpoint* in this project is a pruned model, ``tailored.checkpoint``.) Every
write goes through a temporary folder and a rename, so a crash at any point leaves the last complete
snapshot in place; ``clean_leftovers`` removes what a killed run left behind. A snapshot is sealed
(``SHA256SUMS``) before its rename and checked by content before a run resumes from it.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from tailored.adapters import load_adapter_weights, save_peft, swap_dir, trainable
from tailored.artifacts import check_seal, read_json, seal, write_json, write_safetensors
from tailored.lock import pid_alive

PREFIX = "snapshot-"  # snapshot-<step>
BEST = "best"  # the adapter of the lowest validation loss so far (select="validation")
STATE = "trainer_state.json"


def save_snapshot(out_dir: Path, step: int, peft_model, optimizer, state: dict) -> Path:
    """``out_dir/snapshot-<step>/``: adapter (PEFT), optimizer (safetensors + JSON), RNG, trainer state.

    Written into a temporary folder and renamed, then older snapshots are removed: a crash at any point
    leaves the last complete snapshot in place.
    """
    dest = out_dir / f"{PREFIX}{step}"
    tmp = out_dir / f".{PREFIX}{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_peft(peft_model, tmp, dest)
    # Optimizer: its tensors (per parameter: step, exp_avg, exp_avg_sq) in safetensors, the rest in JSON.
    sd = optimizer.state_dict()
    tensors = {f"{idx}.{key}": value.detach().contiguous().cpu()
               for idx, per_param in sd["state"].items() for key, value in per_param.items()}
    write_safetensors(tmp / "optimizer.safetensors", tensors, sealed=False)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": list(g["params"])} for g in sd["param_groups"]]
    write_json(tmp / "optimizer.json", {"param_groups": groups,
                                        "param_names": [n for n, _ in trainable(peft_model)]})
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    write_safetensors(tmp / "rng.safetensors", rng, sealed=False)
    write_json(tmp / STATE, state)
    seal(tmp)  # the seal arrives with the files, in the one rename
    swap_dir(tmp, dest)
    for old in out_dir.glob(f"{PREFIX}*"):
        if old != dest and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return dest


def latest_snapshot(out_dir: str | Path) -> Path | None:
    """The ``snapshot-<step>`` folder with the highest step that is complete, or None."""
    found = [p for p in Path(out_dir).glob(f"{PREFIX}*")
             if p.is_dir() and (p / STATE).exists() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def snapshot_problem(snapshot: Path) -> str | None:
    """What is wrong with a snapshot's bytes, naming the file (``None``: each is as written)."""
    return check_seal(snapshot)


def load_snapshot(snapshot: Path, peft_model, optimizer) -> dict:
    """Put a snapshot's adapter weights, optimizer state and random state back; return its trainer state.
    (Check it first with ``snapshot_problem``: a damaged one is not resumed from.)"""
    load_adapter_weights(peft_model, snapshot)
    meta = read_json(snapshot / "optimizer.json")
    names = [n for n, _ in trainable(peft_model)]
    if meta["param_names"] != names:
        raise ValueError(f"{snapshot} was saved for other trainable parameters than this model's LoRA layers: "
                         "was it trained on another (pruned) model? Use a fresh out_dir.")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(snapshot / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    rng = load_file(str(snapshot / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return read_json(snapshot / STATE)


def discard(out_dir: Path) -> None:
    """Remove a run's snapshots and its best-so-far adapter: there is nothing left to resume from."""
    for old in [*out_dir.glob(f"{PREFIX}*"), out_dir / BEST]:
        shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(out_dir: Path, finished: bool) -> None:
    """Remove what a killed run left in ``out_dir``, with a warning naming it.

    A kill during a save leaves its temporary folder or file (``.snapshot-7.tmp-<pid>``,
    ``.adapter_model.safetensors.tmp-<pid>``, ``.best.old-<pid>``): removed once the process that wrote it is
    gone. A kill after a run finished but before it cleaned up leaves ``snapshot-<step>`` and ``best``
    beside the installed adapter: removed when the run is ``finished`` (its metrics, written last, exist).
    """
    if not out_dir.is_dir():
        return
    gone = []
    for p in out_dir.iterdir():
        m = re.fullmatch(r"\..+\.(?:tmp|old)-(\d+)", p.name)
        if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            gone.append(p)
    if finished:
        gone += [p for p in [*out_dir.glob(f"{PREFIX}*"), out_dir / BEST] if p.is_dir()]
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if gone:
        warnings.warn(f"{out_dir}: removed what an interrupted run left behind: "
                      f"{', '.join(sorted(p.name for p in gone))}", stacklevel=3)
