"""Artifacts handed between notebooks: JSON written atomically, per-step metrics, content hashes.

Every writer goes through a temporary file and a rename, so an interrupted step never leaves a
half-written artifact where the next step (or a rerun) would pick it up.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import resource
import sys
from pathlib import Path
from typing import Any

from tailored.paths import atomic_write_text


class ArtifactError(ValueError):
    """An artifact of the run directory is damaged: the message names the file and the step that rebuilds it."""


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (JSON has no NaN), tuples become lists, paths strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically; ``indent=None`` for large machine-read artifacts (one line)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(json_safe(obj), indent=indent, sort_keys=False) + "\n")
    return path


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the step that writes it first (`tailored run`)")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is damaged (not valid JSON: {e}); delete it and rerun the step that writes it "
                            "(`tailored run`)") from None


def metrics_path(run_dir: str | Path, step: str) -> Path:
    """``<run_dir>/metrics/<step>.json``, e.g. ``runs/class/metrics/02_importance.json``."""
    return Path(run_dir) / "metrics" / f"{step}.json"


def write_metrics(run_dir: str | Path, step: str, metrics: dict) -> Path:
    """Write one step's metrics (the numbers tests and later notebooks read), atomically.

    A ``resources`` block is added: what the process writing them (the notebook's kernel) used so far.
    """
    return write_json(metrics_path(run_dir, step), {**metrics, "resources": resources()})


def resources() -> dict:
    """Peak memory of this process so far: host (peak resident set) and, where CUDA was used, GPU.

    ``peak_gpu_GiB`` is ``torch.cuda.max_memory_allocated`` (tensors, not the allocator's cache; the
    figure the memory targets are stated in), ``gpu_reserved_GiB`` what the caching allocator holds at its
    peak. Measured in the process itself: a parent's ``RUSAGE_CHILDREN`` is a maximum over all its children.
    """
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    out = {"peak_host_GiB": kib / (2**30 if sys.platform == "darwin" else 2**20),
           "peak_gpu_GiB": None, "gpu_reserved_GiB": None, "gpu": None}
    torch = sys.modules.get("torch")  # never import torch just to ask
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpus = range(torch.cuda.device_count())  # a model dispatched over several GPUs: their sum
        out.update(peak_gpu_GiB=sum(torch.cuda.max_memory_allocated(d) for d in gpus) / 2**30,
                   gpu_reserved_GiB=sum(torch.cuda.max_memory_reserved(d) for d in gpus) / 2**30,
                   gpu=torch.cuda.get_device_name())
    return out


def read_metrics(run_dir: str | Path, step: str) -> dict:
    return read_json(metrics_path(run_dir, step))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: str | Path) -> str:
    """Hash of a file, or of every file under a folder (names and contents), order-independent."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def stat_fingerprint(path: str | Path) -> str:
    """A cheap identity of a file or folder: names, sizes and modification times of its files, hashed.

    Rewriting a file changes it even when the bytes are equal (conservative); reading gigabytes of weights to
    identify a 7B checkpoint would take minutes, this takes microseconds.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def embed_tables(markdown_path: str | Path, figures_dir: str | Path) -> list[str]:
    """Refresh the generated tables of a Markdown file (the README) from ``figures_dir``.

    A block ``<!-- table: NAME -->`` … ``<!-- /table -->`` is replaced by the content of
    ``<figures_dir>/NAME.md``, so numbers in the README always come from the last run, never typed by hand.
    Blocks whose table does not exist are left as they are. Returns the names whose content changed.
    """
    markdown_path, figures_dir = Path(markdown_path), Path(figures_dir)
    text = markdown_path.read_text()
    done = []

    def refresh(match: re.Match) -> str:
        name = match.group(1)
        table = figures_dir / f"{name}.md"
        if not table.exists():
            return match.group(0)
        block = f"<!-- table: {name} -->\n{table.read_text().strip()}\n<!-- /table -->"
        if block != match.group(0):
            done.append(name)
        return block

    new = re.sub(r"<!-- table: ([\w./-]+) -->.*?<!-- /table -->", refresh, text, flags=re.S)
    if new != text:
        atomic_write_text(markdown_path, new)
    return done
