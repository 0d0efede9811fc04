"""Where things live: the local cache of converted models and normalized data, and run directories."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

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


class WriteFailed(OSError):
    """Writing a file failed (a full disk, a file-size limit, no permission): the message names the file and says
    what to do, where the operating system's own (``[Errno 27] File too large``) names neither."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def write_failed(path: Path, err: OSError) -> WriteFailed:
    """A ``WriteFailed`` for ``err`` raised while writing ``path``: one line, the file, the cause, the remedy."""
    path = Path(path)
    why = {errno.ENOSPC: "the disk is full", getattr(errno, "EDQUOT", -1): "the disk quota is used up",
           errno.EFBIG: "the file is larger than this process may write (a file-size limit: `ulimit -f`, or the "
                        "file system's largest file)",
           errno.EACCES: "no permission to write there", errno.EROFS: "the file system is read-only"}
    cause = why.get(err.errno, err.strerror or str(err))
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 2**30:.1f} GiB free there"
    except OSError:
        free = ""
    return WriteFailed(err.errno, f"cannot write {path}: {cause} ({err.strerror or err}){free}; free space, lift "
                                  "the limit or choose another folder (`--run-root`), then run again")


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: ``.<name>.tmp-<pid>`` beside it (the pid lets a
    later run prove its writer is gone: ``tailored.rundir.remove_leftovers``)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """``with atomic_writer(path) as fh: fh.write(...)``: written to a temporary file, flushed to disk and renamed
    onto ``path`` only when the block succeeds, so a reader never sees a half-written file. A failing write
    removes the temporary file and raises ``WriteFailed`` naming ``path``."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, WriteFailed):
            raise
        raise write_failed(path, err) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader never sees a half-written file (write, fsync, rename)."""
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
