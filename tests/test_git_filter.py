"""A JupyterLab session leaves the repository clean.

`tailored lab` saves the study's notebooks as they are committed (their executed copies, outputs and all, go to
runs/lab/), and the git filter `make install` sets up (nbstripout, named by .gitattributes) keeps outputs that any
other editor saves out of `git diff` and `git add`. The committed notebooks are exactly what both make of them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tailored import cli
from tailored.paths import REPO_ROOT

BIN = Path(sys.executable).parent


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """The notebooks, Makefile, .gitattributes and .gitignore in a fresh repository, with the filter installed by make."""
    if shutil.which("make") is None or not (BIN / "nbstripout").exists():
        pytest.fail("make and the venv's nbstripout are needed (`make install` installs nbstripout)")
    repo = tmp_path_factory.mktemp("filter") / "repo"
    (repo / "notebooks").mkdir(parents=True)
    for name in ("Makefile", ".gitattributes", ".gitignore"):
        shutil.copy(REPO_ROOT / name, repo / name)
    for nb in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        shutil.copy(nb, repo / "notebooks" / nb.name)
    git(repo, "init", "-q")
    subprocess.run(["make", "-s", "git-filter", f"BIN={BIN}"], cwd=repo, check=True)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "notebooks")
    return repo


@pytest.fixture
def clone(repository):
    """The repository, put back as committed after each test (the filter runs once per notebook: seconds)."""
    yield repository
    git(repository, "reset", "-q", "--hard")
    git(repository, "clean", "-qfdx")


def test_committed_notebooks_are_what_the_filter_makes_of_them(clone):
    for nb in sorted((clone / "notebooks").glob("*.ipynb")):
        assert git(clone, "show", f"HEAD:notebooks/{nb.name}") == nb.read_text(), \
            f"{nb.name} changes under the git filter: run `nbstripout` on it (with `make install`'s filter) and commit"


def executed(path: Path):
    """The notebook as JupyterLab holds it after "Run All": outputs, counts, its kernel's metadata."""
    nb = nbformat.read(str(path), as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = i + 1
        cell.outputs = [nbformat.v4.new_output("stream", text="traced\n"),
                        nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="})]
        cell.metadata["execution"] = {"iopub.status.busy": "2026-12-01T00:00:00Z"}
    nb.metadata["language_info"] = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                                    "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                                    "pygments_lexer": "ipython3", "version": "3.11.7"}
    nb.metadata["kernelspec"] = {"display_name": "Python (tailored)", "language": "python", "name": "tailored"}
    return nb


def test_tailored_lab_saves_the_notebook_as_committed_and_its_outputs_to_runs_lab(clone, monkeypatch):
    monkeypatch.setattr(cli, "LAB_NOTEBOOKS", clone / "notebooks")
    monkeypatch.setattr(cli, "LAB_RUN_DIR", clone / "runs" / "lab")
    path = clone / "notebooks" / "01_trace_graph.ipynb"
    model = {"type": "notebook", "content": executed(path)}

    class Contents:  # what jupyter_server's contents manager hands the hook: its root and the path in it
        root_dir = str(clone / "notebooks")

    cli.save_notebook_hook(model, "01_trace_graph.ipynb", Contents())
    nbformat.write(nbformat.from_dict(model["content"]), str(path))  # as jupyter_server then writes it
    assert git(clone, "status", "--porcelain") == ""
    copy = nbformat.read(str(clone / "runs" / "lab" / "01_trace_graph.ipynb"), as_version=4)
    assert any(o.get("data", {}).get("image/png") for c in copy.cells if c.cell_type == "code" for o in c.outputs)
    other = {"type": "notebook", "content": executed(path)}  # a notebook outside notebooks/ keeps its outputs
    cli.save_notebook_hook(other, "../elsewhere.ipynb", Contents())
    assert other["content"].cells[2].outputs


def test_outputs_another_editor_saves_never_reach_git(clone):
    path = clone / "notebooks" / "01_trace_graph.ipynb"
    nbformat.write(executed(path), str(path))
    assert "image/png" in path.read_text()  # the file on disk keeps them for the user
    assert git(clone, "diff") == ""
    git(clone, "add", "-A")  # the index takes the filtered notebook: the one committed
    assert git(clone, "status", "--porcelain") == "" and git(clone, "diff", "--cached") == ""
