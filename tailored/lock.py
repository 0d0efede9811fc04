"""One run per run directory: ``with run_lock(run_dir):`` holds ``<run_dir>/.lock`` while a run writes there.

Two runs on one directory step on each other: one deletes the LoRA checkpoint the other is reading, and the
manifest says "ok" for a run that failed. So the runner takes the lock before it touches the manifest:

- the lock file is created with ``O_CREAT | O_EXCL``, which exactly one process can win, and holds JSON
  naming its holder: pid, host, start time and command;
- a second run is refused with ``RunLocked``, whose message names the holder;
- a lock whose process is gone (killed, or the machine restarted) is *stale*: on the same host that is
  checked (no process with that pid), and the lock is taken over with a message. A lock from another host
  cannot be checked, so it is refused, and the message says which file to delete if that run is gone;
- the holder removes the file when it leaves, whether the run succeeded or failed.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another run holds the run directory; the message names it (pid, host, start time, command)."""


def pid_alive(pid: int) -> bool:
    """Is there a process with this pid on this machine? (Signal 0 checks without sending anything.)"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:
        return False
    return True


def read_lock(path: str | Path) -> dict | None:
    """The holder recorded in a lock file, or None when the file is missing or unreadable."""
    try:
        holder = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
            f"`{holder.get('command')}`")


@contextmanager
def run_lock(run_dir: str | Path, command: str | None = None,
             log: Callable[[str], object] = print) -> Iterator[Path]:
    """Hold ``<run_dir>/.lock`` for the body of the ``with``; ``RunLocked`` if another live run holds it.

    ``command`` is recorded for whoever is refused (default: this process's command line). A stale lock
    (its process gone, on this host) is taken over, and ``log`` says so.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command or shlex.join(sys.argv)}
    for _ in range(3):  # a takeover can lose a race to a third run; then that run is the holder
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            if holder is None:  # being written this instant, or left empty by a kill: look once more
                time.sleep(0.2)
                holder = read_lock(path)
            if holder is None:
                if not path.exists():
                    continue
                raise RunLocked(f"{run_dir} is locked by {path}, which cannot be read (a run killed while taking "
                                f"it?); if no run is active in {run_dir}, delete {path}") from None
            if holder.get("host") == mine["host"] and not pid_alive(holder.get("pid")):
                log(f"taking over the stale lock of {run_dir}: its run ({_describe(holder)}) is gone")
                if read_lock(path) == holder:
                    path.unlink(missing_ok=True)
                continue
            where = ("" if holder.get("host") == mine["host"] else
                     "; it runs on another machine, so tailored cannot check that it still does")
            raise RunLocked(f"{run_dir} is in use by another run ({_describe(holder)}){where}. Wait for it to "
                            f"finish, or run another profile or --run-root; if that run is gone, delete {path}"
                            ) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(mine) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        break
    else:
        raise RunLocked(f"{run_dir}: could not take {path} (other runs keep taking it)")
    try:
        yield path
    finally:
        if read_lock(path) == mine:
            path.unlink(missing_ok=True)
