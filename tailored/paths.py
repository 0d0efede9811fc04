"""Where things live: the local cache of converted models and normalized data, and run directories."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    """The cache root: ``$TAILORED_HOME`` or ``~/.cache/tailored``."""
    return Path(os.environ.get("TAILORED_HOME", Path.home() / ".cache" / "tailored")).expanduser()


def models_dir() -> Path:
    return home() / "models"


def data_dir() -> Path:
    return home() / "data"


def run_dir(profile: str, root: Path | None = None) -> Path:
    """``runs/<profile>/`` under the repository (or ``root``): everything one profile's run produced."""
    return (root or REPO_ROOT / "runs") / profile


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader never sees a half-written file (write, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
