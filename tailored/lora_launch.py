"""One LoRA run over several processes (data parallel), started by accelerate's launcher.

A job file says what to train; ``launch`` starts ``accelerate launch --multi_gpu --num_processes N -m
tailored.lora_launch job.json``, and each process loads the base model onto its own device and calls
``lora.train_lora`` on the same examples. ``train_lora`` splits every step's batch between the processes and
sums their gradients, so the N processes make the one-process step; process 0 writes the adapter. Notebook 04
does this for each run when ``processes`` > 1, then calls ``train_lora`` in its own kernel, which finds the
adapter finished (same settings, examples and base weights) and loads it::

    job = lora_launch.write_job("job.json", base="runs/paper/pruned/block_20", examples=train, settings=s,
                                out_dir="runs/paper/adapters/block_20+generic", device="cuda", dtype="bfloat16")
    lora_launch.launch(job, processes=8)

On a machine without GPUs the processes run on the CPU and talk through gloo (how the tests run it); with
GPUs, process i uses ``cuda:i`` and NCCL.

A process that fails writes its error to ``<job>.error-<rank>.json`` before it exits; ``launch`` raises it as
one line, of the worker's own type where the caller knows it (``TrainingDiverged``, ``ArtifactError``, ...),
not the launcher's traceback (which, with the whole output, stays in ``<job>.log``).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys
import traceback
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from tailored import models
from tailored.artifacts import ArtifactError, read_json, write_json
from tailored.lora import LoraSettings, NothingLearned, TrainExample, TrainingDiverged, train_lora

# A worker's error raised again in the caller as the same kind (a user error stays one; the rest: WorkerFailed)
KNOWN_ERRORS = {e.__name__: e for e in (NothingLearned, TrainingDiverged, ArtifactError, models.ModelNotAvailable,
                                        FileNotFoundError, ValueError, MemoryError)}


class WorkerFailed(RuntimeError):
    """A process of a data-parallel LoRA run failed: its own error, in one line."""


def write_job(path: str | Path, base: str, examples: Sequence[TrainExample], settings: LoraSettings,
              out_dir: str | Path, validation: Sequence[TrainExample] | None = None, device: str = "cpu",
              dtype: str = "float32", seed: int = 0, threads: int | None = None) -> Path:
    """Write what one run trains: ``base`` (a pruned checkpoint's folder, or a model spec), the examples,
    the settings and where the adapter goes. Returns ``path``.

    ``threads``: torch threads of each process on a CPU (default: this process's). The base weights'
    fingerprint, which decides whether the calling kernel may reuse the adapter, sums in float64 in
    thread-sized chunks, so the processes compute it with the caller's thread count.
    """
    if not examples:
        raise ValueError("no training examples")
    if settings.distill > 0:
        raise ValueError("distillation needs the dense teacher in every process: not supported in a "
                         "data-parallel run (processes = 1 trains it)")
    if not str(device).startswith(("cpu", "cuda")):
        raise ValueError(f"device must be cpu or cuda for a data-parallel run, not {device!r}")
    write_json(path, {"base": str(base), "device": str(device), "dtype": str(dtype), "seed": seed,
                      "threads": threads or torch.get_num_threads(),
                      "out_dir": str(out_dir), "settings": settings.to_dict(),
                      "examples": [dataclasses.asdict(e) for e in examples],
                      "validation": [dataclasses.asdict(e) for e in validation] if validation else None})
    return Path(path)


def command(job: str | Path, processes: int) -> list[str]:
    """The launcher's command line (accelerate's ``multi_gpu`` launcher: one process per device, torchrun's
    environment; on a CPU-only machine the same launcher starts CPU processes)."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, not {processes}")
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
            "--num_processes", str(processes), "--mixed_precision", "no", "--dynamo_backend", "no",
            "-m", "tailored.lora_launch", str(job)]


def launch(job: str | Path, processes: int, env: dict | None = None) -> None:
    """Run the job in ``processes`` processes and wait, printing their output as it comes (process 0's
    progress bar every 30 s) and keeping all of it in ``<job>.log``. Raises ``RuntimeError`` with the end of
    the output if one fails (the adapter folder then holds the last snapshot, and a rerun resumes from it).
    An interrupt stops the processes before it is passed on: none keeps writing into the adapter folder."""
    log_path = Path(f"{job}.log")
    for stale in Path(job).parent.glob(f"{Path(job).name}.error-*.json"):
        stale.unlink()
    tail: collections.deque[str] = collections.deque(maxlen=60)
    env = {**os.environ, "TQDM_MININTERVAL": "30", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
            command(job, processes), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace", env=env) as proc:
        try:
            for line in proc.stdout:  # text mode reads a progress bar's carriage returns as line ends
                log.write(line)
                if line.strip():
                    print(line, end="" if line.endswith("\n") else "\n", flush=True)
                    tail.append(line)
        except BaseException:  # KeyboardInterrupt in a notebook: the launcher stops its workers on SIGTERM
            proc.terminate()
            proc.wait()
            raise
    if proc.returncode != 0:
        worker_error(job, processes, log_path)
        raise RuntimeError(f"the data-parallel LoRA run of {job} failed (exit {proc.returncode}); the whole "
                           f"output is in {log_path}; its last lines:\n" + "".join(tail)[-3000:])


def error_path(job: str | Path, rank: int) -> Path:
    """Where process ``rank`` of a job leaves its error: ``<job>.error-<rank>.json``."""
    return Path(f"{job}.error-{rank}.json")


def worker_error(job: str | Path, processes: int, log_path: Path) -> None:
    """Raise the error the lowest-ranked failed process recorded, in one line and of its own kind where known
    (``KNOWN_ERRORS``, else ``WorkerFailed``); return when none recorded one (killed: the caller says so)."""
    found = sorted(Path(job).parent.glob(f"{Path(job).name}.error-*.json"),
                   key=lambda p: int(p.name.rsplit("-", 1)[1].split(".")[0]))
    if not found:
        return
    err = read_json(found[0])
    message = " ".join(str(err["message"]).split())  # one line
    where = f"(process {err['rank']} of {processes} failed, in the data-parallel LoRA run of {job}; the whole output: {log_path})"
    kind = KNOWN_ERRORS.get(err["type"])
    if kind is not None:
        raise kind(f"{message} {where}")
    raise WorkerFailed(f"{err['type']}: {message} {where}")


def _record_error(job: str | Path, err: BaseException) -> None:
    """Write this process's error for ``launch`` (and its traceback to the log, for a closer look)."""
    traceback.print_exc()
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    write_json(error_path(job, rank), {"rank": rank, "type": type(err).__name__, "message": str(err) or repr(err)})


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: accelerate launch --multi_gpu --num_processes N -m tailored.lora_launch JOB.json",
              file=sys.stderr)
        return 2
    try:
        return _run_job(args[0])
    except Exception as err:  # the worker's own error, for launch to raise in one line
        _record_error(args[0], err)
        return 1


def _run_job(job_path: str) -> int:
    """Train the job of ``job_path`` in this process (one of ``WORLD_SIZE``)."""
    job = read_json(job_path)
    local, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = job["device"]
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if job.get("threads") and not device.startswith("cuda"):
        torch.set_num_threads(job["threads"])
    if world > 1:  # loading 8 copies of a 7B checkpoint can take minutes
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=2))
    try:
        torch.manual_seed(job["seed"])
        # a pruned checkpoint's folder or any model spec (models.load reads both)
        model, tokenizer = models.load(job["base"], device=device, dtype=job["dtype"], seed=job["seed"])
        examples = [TrainExample(**e) for e in job["examples"]]
        validation = [TrainExample(**e) for e in job["validation"]] if job["validation"] else None
        result = train_lora(model, tokenizer, examples, LoraSettings.from_dict(job["settings"]), job["out_dir"],
                            validation=validation, progress=local == 0)
        if local == 0:
            print(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.wall_s:.1f} s "
                  f"on {world} processes -> {job['out_dir']}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
