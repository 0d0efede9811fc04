"""Notebook 01 run in JupyterLab as a user runs it: `tailored lab`, headless Chromium, Run > Run All Cells, save.

A copy of the working tree stands in for the user's clone (a git repository with the filter `make install` sets
up), so the user's own runs/lab/ and git state are never touched. The notebook runs with its defaults, the class
model included (a minute or two on 2 cores), with the project's kernel ("Python (tailored)"). Asserted: no error
output, an inline figure, its artifacts under runs/lab/, figures/ unchanged and `git status` clean.

Needs Debian's chromium and chromium-driver (`make browser` installs them; as root this test does too).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from tailored.paths import REPO_ROOT

pytestmark = pytest.mark.browser
CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
NOTEBOOK = "01_trace_graph.ipynb"
RUN_LIMIT_S = 20 * 60  # notebook 01 on the class model takes a minute or two; a busy 2-core machine more


def ensure_chromium() -> None:
    """Debian's chromium and chromium-driver, installed where missing (what `make browser` does)."""
    if CHROMIUM.exists() and DRIVER.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail("the browser test needs Debian's chromium and chromium-driver: `sudo make browser`")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The working tree's files (tracked, and untracked ones git does not ignore) as a fresh repository, with the
    git filter installed by the Makefile's own target."""
    repo = tmp_path_factory.mktemp("clone") / "tailored"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO_ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, repo / name)
    git(repo, "init", "-q")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    subprocess.run(["make", "-s", "git-filter", f"BIN={Path(sys.executable).parent}"], cwd=repo, check=True, env=env)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=test", "-c", "user.email=test@example.org", "commit", "-qm", "clone")
    return repo


@pytest.fixture(scope="module")
def lab(clone, tmp_path_factory):
    """`tailored lab -- --no-browser --port=...` in the clone: its URL with the token; stopped afterwards."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "tailored" not in KernelSpecManager().find_kernel_specs():
        pytest.fail("the project's kernel is not registered: `make install` registers it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = hashlib.sha256(os.urandom(16)).hexdigest()[:32]
    home = tmp_path_factory.mktemp("jupyter")
    options = ["--", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
               "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               *(["--allow-root"] if os.geteuid() == 0 else [])]
    env = {**os.environ, "PYTHONPATH": str(clone), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    log = open(home / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tailored.cli", "lab", *options], cwd=clone, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"tailored lab exited: {(home / 'lab.log').read_text()[-2000:]}")
            time.sleep(1)
    else:
        pytest.fail(f"JupyterLab did not answer in 2 minutes: {(home / 'lab.log').read_text()[-2000:]}")
    yield url, token, home / "lab.log"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    yield driver
    driver.quit()


def wait_for(predicate, timeout: float, what: str, every: float = 1.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def run_all_cells(driver) -> None:
    """Run > Run All Cells, clicked in the menu bar as a user clicks it."""
    from selenium.webdriver.common.by import By

    menu = wait_for(lambda: [m for m in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item")
                             if m.text.strip() == "Run"], 60, "the Run menu")[0]
    menu.click()
    item = wait_for(lambda: [i for i in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-item .lm-Menu-itemLabel")
                             if i.text.strip() == "Run All Cells"], 30, "Run All Cells in the Run menu")[0]
    item.click()


def test_notebook_01_runs_in_jupyterlab_and_leaves_the_repository_clean(clone, lab, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, token, log = lab
    figures_before = tree_digest(clone / "figures")
    runs_lab = clone / "runs" / "lab"
    browser.get(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), 120, "the notebook")

    def kernel_ready():
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".jp-KernelName")]
        idle = browser.find_elements(By.CSS_SELECTOR, '.jp-Notebook-ExecutionIndicator[data-status="idle"]')
        return idle and any("Python (tailored)" in n for n in names)

    try:
        wait_for(kernel_ready, 300, "the project's kernel (Python (tailored)) to start")
    except BaseException:
        browser.save_screenshot(str(log.with_name("kernel.png")))
        raise

    run_all_cells(browser)
    metrics = runs_lab / "metrics" / "01_trace_graph.json"  # the last cell writes it

    def finished_or_failed():
        failed = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")
                  if "Traceback (most recent call last)" in e.text]
        assert not failed, f"a cell failed in JupyterLab:\n{failed[0][-3000:]}"
        return metrics.exists()

    wait_for(finished_or_failed, RUN_LIMIT_S, f"notebook 01 to finish (JupyterLab log: {log})", every=3)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, '.jp-Notebook-ExecutionIndicator[data-status="idle"]'),
             120, "the kernel to be idle")
    assert browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img"), "no inline figure on the page"

    ActionChains(browser).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()  # File > Save
    executed = runs_lab / NOTEBOOK  # the hook of `tailored lab`: the executed copy, outputs and all

    def saved_after_the_run():
        if not executed.exists():
            return None
        nb = nbformat.read(str(executed), as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        return code if all(c.execution_count for c in code) else None  # (an autosave during the run has fewer)

    code = wait_for(saved_after_the_run, 120, "the save of the executed notebook")
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no inline figure in the saved notebook"
    for name in ("graph.json", "figures/graph_block.png", "figures/graph_groups_per_layer.csv"):
        assert (runs_lab / name).is_file(), f"runs/lab/{name} was not written"
    assert tree_digest(clone / "figures") == figures_before, "the committed figures/ changed"
    assert git(clone, "status", "--porcelain") == "", "JupyterLab left changes in the repository"
    saved = nbformat.read(str(clone / "notebooks" / NOTEBOOK), as_version=4)
    assert not [o for c in saved.cells if c.cell_type == "code" for o in c.outputs]
