"""Artifacts handed between notebooks: JSON written atomically, per-step metrics, content hashes.

Every writer goes through a temporary file and a rename, so an interrupted step never leaves a
half-written artifact where the next step (or a rerun) would pick it up.

**Sealed artifacts.** What a step hands on is checked by content before it is used again, not by its size
and modification time (a copy tool or bit rot keeps those). The writer *seals* it: the sha256 of its bytes
goes beside it in ``sha256sum`` format, so ``sha256sum -c`` checks it by hand too::

    importance.safetensors          a file ...
    importance.safetensors.sha256   ... and its seal: "<hex>  importance.safetensors"
    pruned/block_20/SHA256SUMS      a folder's seal: one line per file inside it

``write_safetensors`` and ``write_sealed`` seal as they write (the digest of the bytes written, no second read);
``seal(folder)`` seals a folder written file by file, before it is renamed into place. ``check_seal`` says
what is wrong (naming the file) and ``verify`` raises ``ArtifactError`` with the step that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import resource
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tailored.paths import atomic_write_text, atomic_writer


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
    """The sha256 of a file's bytes, hex (about 1 GB/s on one core of this machine's CPU)."""
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


def content_hashes(path: str | Path) -> dict[str, str]:
    """``{file: sha256}`` of a file (``{name: sha}``) or of every file under a folder (relative POSIX names), sorted:
    what the runner records after a step, so a later change to any byte is found and the file named."""
    path = Path(path)
    if path.is_file():
        return {path.name: file_sha256(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {f.relative_to(path).as_posix(): file_sha256(f) for f in files}


# ============================================================================================== seals
SUMS = "SHA256SUMS"  # a sealed folder's record, inside it
SEAL_SUFFIX = ".sha256"  # a sealed file's record, beside it


def seal_path(path: str | Path) -> Path:
    """Where the seal of ``path`` lives: ``<folder>/SHA256SUMS`` for a folder, ``<file>.sha256`` for a file."""
    path = Path(path)
    return path / SUMS if path.is_dir() else path.with_name(path.name + SEAL_SUFFIX)


def _sums_text(digests: Mapping[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))


def _read_sums(record: Path) -> dict[str, str]:
    """The ``{name: sha256}`` of a seal (``sha256sum`` format); ``ArtifactError`` when it cannot be parsed."""
    out = {}
    for line in record.read_text(encoding="utf-8", errors="replace").splitlines():
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if not m:
            raise ArtifactError(f"{record} is damaged (not sha256sum lines: {line[:60]!r})")
        out[m.group(2)] = m.group(1)
    return out


def seal_file(path: str | Path, digest: str | None = None) -> Path:
    """Write ``<file>.sha256`` for a file just written (``digest``: its sha256 when the writer has it already)."""
    path = Path(path)
    record = path.with_name(path.name + SEAL_SUFFIX)
    atomic_write_text(record, _sums_text({path.name: digest or file_sha256(path)}))
    return record


def seal(path: str | Path, files: list[str] | None = None) -> Path:
    """Seal a file or a folder: record the sha256 of its bytes (``files``: only these, relative to the folder;
    default every file under it). Seal a folder while it still has its temporary name, before the rename that
    installs it, so the seal and the files arrive together. Returns the seal's path."""
    path = Path(path)
    if path.is_file():
        return seal_file(path)
    names = files if files is not None else sorted(
        p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != SUMS)
    record = path / SUMS
    atomic_write_text(record, _sums_text({name: file_sha256(path / name) for name in names}))
    return record


def is_sealed(path: str | Path) -> bool:
    return seal_path(path).is_file()


def check_seal(path: str | Path) -> str | None:
    """What is wrong with a sealed artifact, naming the file (``None``: every byte is as written).

    A missing artifact, a missing seal, a listed file that is gone, or a file whose sha256 differs from the one
    recorded when it was written."""
    path = Path(path)
    if not path.exists():
        return f"{path} is missing"
    record = seal_path(path)
    if not record.is_file():
        return f"{path} has no content hash ({record.name} is missing: written before seals, or interrupted)"
    try:
        recorded = _read_sums(record)
    except ArtifactError as err:
        return str(err)
    folder = path if path.is_dir() else path.parent
    for name, digest in recorded.items():
        f = folder / name
        if not f.is_file():
            return f"{f} is missing (listed in {record})"
        if file_sha256(f) != digest:
            return f"{f} is damaged: its content differs from the sha256 recorded when it was written"
    return None


def verify(path: str | Path, rebuild: str = "") -> Path:
    """Raise ``ArtifactError`` (one line: the file, what is wrong, ``rebuild``) unless ``path`` is as it was sealed.

    ``rebuild`` says what makes it again, e.g. ``"rerun notebook 02: `tailored run --steps 02 --force`"``
    (``tailored.rundir.rebuild_hint`` gives it for an artifact of a run directory)."""
    problem = check_seal(path)
    if problem:
        raise ArtifactError(problem + (f"; {rebuild}" if rebuild else ""))
    return Path(path)


def write_sealed(path: str | Path, data: bytes) -> Path:
    """Write ``data`` atomically and seal it (``<file>.sha256``); returns ``path``."""
    path = Path(path)
    with atomic_writer(path) as fh:
        fh.write(data)
    seal_file(path, hashlib.sha256(data).hexdigest())
    return path


# ======================================================================================= safetensors
_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
           "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
           "float8_e5m2": "F8_E5M2", "uint16": "U16", "uint32": "U32", "uint64": "U64", "complex64": "C64"}


def safetensors_header(tensors: Mapping[str, Any],
                       metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[str]]:
    """The header of a safetensors file of ``tensors`` (name -> contiguous CPU tensor), and the order of the data.

    The same tensors and metadata give the same bytes: metadata keys sorted (``safetensors.torch.save`` writes
    them from a hash map seeded anew in every process), tensors laid out as safetensors lays them out (larger
    elements first, then by name), the JSON padded with spaces to a multiple of 8 bytes.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be strings; {bad} are not (json.dumps them)")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in order:
        t = tensors[name]
        kind = str(t.dtype).removeprefix("torch.")
        if kind not in _DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[kind], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def write_safetensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                      sealed: bool = True) -> str:
    """Write ``tensors`` (name -> torch tensor) as a safetensors file, byte-stable, atomic and streamed; returns
    its sha256 (and writes ``<file>.sha256`` unless ``sealed=False``, e.g. inside a folder sealed as a whole).

    Streamed: each tensor's bytes go to the file in turn, hashed as they go, so a 13 GB checkpoint needs no
    second copy in memory and no second read. A full disk or a file-size limit raises
    ``tailored.paths.WriteFailed`` naming ``path`` (safetensors' own writer says "I/O error: File too large" only).
    """
    import torch  # artifacts itself stays importable without torch (the CLI's --help)

    path = Path(path)
    cpu = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    head, order = safetensors_header(cpu, metadata)
    h = hashlib.sha256(head)
    with atomic_writer(path) as fh:
        fh.write(head)
        for name in order:
            flat = cpu[name].reshape(-1)
            if flat.numel() == 0:
                continue
            data = memoryview(flat.view(torch.uint8).numpy())
            for start in range(0, len(data), 1 << 26):  # 64 MiB at a time
                block = data[start: start + (1 << 26)]
                h.update(block)
                fh.write(block)
    digest = h.hexdigest()
    if sealed:
        seal_file(path, digest)
    return digest


@contextmanager
def open_safetensors(path: str | Path, rebuild: str = "", device: str = "cpu") -> Iterator[Any]:
    """``with open_safetensors(path, rebuild) as f: f.get_tensor(...)``: ``safetensors.safe_open``, with a
    damaged file named in one line (``ArtifactError``: a truncated file's "incomplete metadata", a garbled
    header) and, for a sealed file, its content checked against the seal first."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" + (f"; {rebuild}" if rebuild else ""))
    if is_sealed(path):
        verify(path, rebuild)
    try:  # safe_open reads and checks the header and the file's length: a damaged file fails here
        handle = safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{path} is damaged ({type(err).__name__}: {err})"
                            + (f"; {rebuild}" if rebuild else "")) from None
    with handle as fh:
        yield fh


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
