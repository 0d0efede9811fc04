"""Nothing wrong goes through silently (issues 12 and 23): each case is refused, named, or rebuilt.

Tiny models and temporary folders throughout; the runner runs a one-cell study, and the CLI is refused
on the smoke profile before any notebook starts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import nbformat
import pytest
import torch
import yaml

from tailored import adapters, checkpoint, cli, lora, models, runner
from tailored.artifacts import ArtifactError, read_json
from tailored.graph import Graph
from tailored.importance import Importance
from tailored.lock import LOCK_FILE, RunLocked, read_lock, run_lock
from tailored.lora import LoraSettings, TrainExample, TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FRUIT = ("apple", "pear", "plum", "fig")
EXAMPLES = [TrainExample(f"Is {w} a fruit?\nAnswer:", " yes" if w in FRUIT else " no", f"toy/{w}")
            for w in FRUIT + ("car", "rock", "bus", "shoe")]
QUICK = dict(lr=1e-2, batch_size=4, max_seq_len=64, warmup_ratio=0.0, save_every=100)
U = math.log(257)  # the tiny model's vocabulary: 256 bytes + <|endoftext|>


def dead_pid() -> int:
    """The pid of a process that has exited (as a killed run's is)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


# ============================================================================================== LoRA
@pytest.mark.parametrize("losses, validation, needle", [
    ([3.0, 3.5, 2.8, 2.5, 2.0], None, None),  # healthy
    ([4.3, 5.0, 4.8, 4.75, 4.2, 4.3], None, None),  # noisy rise early on (seen on the class profile)
    ([U + 0.011, U + 0.01, U + 5e-4, U + 3e-4, U + 1e-4], None, None),  # a random model starts at U: left alone
    ([3.0, float("nan")], None, "loss is nan"),
    ([2.8, 20.96], None, "blew up"),  # SmolLM2 at lr 1000, step 2
    ([6.8, 6.68, U, U, U], None, "collapsed to a uniform guess"),  # tiny (init 0.2) at lr 1000
    ([3.0, 2.9], U + 1e-5, "validation loss is ln"),
    ([3.0, 2.9], 4.0, None),
    ([3.0, 2.9], float("inf"), "validation loss is inf"),
])
def test_divergence_rule_on_known_loss_curves(losses, validation, needle):
    problem = lora.divergence(losses, 257, validation=validation)
    assert (problem is None) if needle is None else (needle in problem), problem


def test_lr_1000_raises_training_diverged_and_installs_no_adapter(tmp_path):
    # initializer_range 0.2: the model starts away from a uniform guess (a std-0.02 random model starts at it)
    model, tok = models.build_tiny("tiny", seed=0, initializer_range=0.2)
    settings = LoraSettings(max_steps=6, **{**QUICK, "lr": 1000.0, "save_every": 2})
    out = tmp_path / "blown"
    with pytest.raises(TrainingDiverged, match=r"at step 5 of 6 \(lr 250\): the model collapsed to a uniform"):
        lora.train_lora(model, tok, EXAMPLES, settings, out, progress=False)
    assert not any((out / name).exists() for name in (*adapters.ADAPTER_FILES, lora.METRICS_FILE, "best"))
    assert not list(out.glob("snapshot-*"))  # snapshot-2 and -4 were saved, then removed: nothing to resume
    assert issubclass(TrainingDiverged, FloatingPointError)


def test_load_adapter_refuses_a_pickled_adapter(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"a pickle would run code here")
    with pytest.raises(ValueError, match=r"adapter_model\.bin, a pickle.*safetensors only"):
        adapters.load_adapter(models.load("tiny")[0], tmp_path)


def test_rerun_removes_what_a_killed_run_left_behind(tmp_path):
    settings = LoraSettings(max_steps=2, **{**QUICK, "save_every": 1})
    out = tmp_path / "run"
    lora.train_lora(*models.load("tiny"), EXAMPLES, settings, out, progress=False, stop_after=1)
    pid = dead_pid()  # killed while saving step 2: its temporary folder and file stay
    (out / f".snapshot-2.tmp-{pid}").mkdir()
    (out / f".adapter_model.safetensors.tmp-{pid}").write_bytes(b"half")
    with pytest.warns(UserWarning, match=r"interrupted run.*\.adapter_model\.safetensors\.tmp-.*\.snapshot-2\.tmp-"):
        result = lora.train_lora(*models.load("tiny"), EXAMPLES, settings, out, progress=False)
    assert result.resumed_from == 1 and result.steps == 2
    assert sorted(p.name for p in out.iterdir()) == sorted([*adapters.ADAPTER_FILES, lora.METRICS_FILE, "SHA256SUMS"])

    # killed after finishing, before cleaning up: checkpoints beside the installed adapter
    (out / "snapshot-2").mkdir()
    (out / "best").mkdir()
    with pytest.warns(UserWarning, match=r"best, snapshot-2"):
        again = lora.train_lora(*models.load("tiny"), EXAMPLES, settings, out, progress=False)
    assert again.losses == result.losses and not (out / "snapshot-2").exists() and not (out / "best").exists()


# ====================================================================================== models, checkpoints
def test_model_folder_holding_only_pickled_weights_is_refused(tmp_path):
    model, tok = models.build_tiny("tiny")
    model.save_pretrained(tmp_path / "good")
    tok.save_pretrained(tmp_path / "good")
    models.load(str(tmp_path / "good"))  # safetensors: loads

    bad = tmp_path / "bad"
    bad.mkdir()
    model.config.save_pretrained(bad)
    (bad / "pytorch_model.bin").write_bytes(b"a pickle would run code here")
    with pytest.raises(models.ModelNotAvailable, match=r"only pickled weights \(pytorch_model\.bin\).*safetensors only"):
        models.load(str(bad))


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    model, tok = models.load("tiny")
    return checkpoint.save_pruned(model, tok, tmp_path_factory.mktemp("ckpt") / "pruned", {"method": "none"})


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "saved-before-recording"])
@pytest.mark.parametrize("key, value, needle", [
    ("hidden_size", 32, "hidden_size"),
    ("num_attention_heads", 2, "num_attention_heads"),
    ("num_hidden_layers", 3, "num_hidden_layers"),
    ("vocab_size", 300, "vocab_size"),
    ("head_dim", 32, "head_dim"),
])
def test_config_that_disagrees_with_the_tensors_is_refused(pruned_dir, tmp_path, key, value, needle, recorded):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(pruned_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config[key] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "SHA256SUMS").unlink()  # edited by hand: the seal would refuse it before the config is read
    if not recorded:  # a checkpoint from before save_pruned recorded the config: the tensors alone decide
        meta = json.loads((ckpt / "pruning.json").read_text())
        del meta["config"]
        (ckpt / "pruning.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"config\.json: .*{needle}"):
        checkpoint.load_pruned(ckpt)


# ============================================================================================ artifacts
def test_importance_file_is_byte_stable(tmp_path):
    imp = Importance(scores={("param_first", "sum", "layers.0.mlp"): torch.arange(4.0),
                             ("l2", "mean", "hidden"): torch.ones(3)}, settings={"n": 2, "model": "tiny"})
    # safetensors writes its metadata from a Rust hash map seeded anew for every map: five saves, five orders
    blobs = {imp.save(tmp_path / f"{i}.safetensors").read_bytes() for i in range(5)}
    assert len(blobs) == 1
    assert Importance.load(tmp_path / "0.safetensors") == imp


def test_damaged_artifacts_name_the_file_and_the_step_that_rebuilds_it(tmp_path):
    imp = Importance(scores={("l1", "sum", "hidden"): torch.ones(3)})
    blob = imp.save(tmp_path / "importance.safetensors").read_bytes()
    (tmp_path / "importance.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated by a full disk
    with pytest.raises(ArtifactError, match=r"importance\.safetensors is damaged.*`tailored run --steps 02 --force`"):
        Importance.load(tmp_path / "importance.safetensors")

    (tmp_path / "graph.json").write_text('{"groups": [{"name": "hidden", ')
    with pytest.raises(ArtifactError, match=r"graph\.json is damaged .*`tailored run --steps 01 --force`"):
        Graph.load(tmp_path / "graph.json")
    (tmp_path / "graph.json").write_text("[1, 2]")  # valid JSON, not a graph
    with pytest.raises(ArtifactError, match=r"graph\.json is damaged"):
        Graph.load(tmp_path / "graph.json")

    (tmp_path / "manifest.json").write_bytes(b'{"steps": {\xff')
    with pytest.raises(ArtifactError, match=r"manifest\.json is damaged"):
        read_json(tmp_path / "manifest.json")


# ================================================================================================ lock
def lock_of(pid: int, host: str | None = None) -> str:
    return json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2024-10-25T10:00:00+00:00",
                       "command": "tailored run --profile smoke"})


def test_second_run_on_a_directory_is_refused_naming_the_holder(tmp_path):
    with run_lock(tmp_path, command="tailored run --profile smoke") as path:
        assert read_lock(path)["pid"] == os.getpid()
        with pytest.raises(RunLocked, match=rf"in use by another run \(pid {os.getpid()} on {socket.gethostname()}, "
                                            r"started .*`tailored run --profile smoke`"):
            with run_lock(tmp_path):
                pass
    assert not (tmp_path / LOCK_FILE).exists()  # released


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_message(tmp_path):
    pid = dead_pid()
    (tmp_path / LOCK_FILE).write_text(lock_of(pid))
    said = []
    with run_lock(tmp_path, log=said.append) as path:
        assert read_lock(path)["pid"] == os.getpid()
    assert len(said) == 1 and "stale lock" in said[0] and f"pid {pid}" in said[0]


def test_lock_from_another_machine_is_refused_saying_which_file_to_delete(tmp_path):
    (tmp_path / LOCK_FILE).write_text(lock_of(1, host="elsewhere"))
    with pytest.raises(RunLocked, match=rf"another machine.*delete {tmp_path / LOCK_FILE}"):
        with run_lock(tmp_path):
            pass


def test_runner_refuses_a_locked_run_directory_and_takes_over_a_stale_one(tmp_path):
    # a one-cell study (the runner's wiring is under test, not a notebook): starts a kernel once, in seconds
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir()
    params.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell('profile = ""\nrun_dir = ""\nfigures_dir = ""\nvalue = 1\n')
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell("assert value == 2")]
    nbformat.write(nb, str(nbs / "01_only.ipynb"))
    (params / "t.yaml").write_text("common:\n  value: 2\n")

    def run(log=lambda *_: None):
        return runner.run(profile="t", run_root=tmp_path / "runs", notebooks_dir=nbs, params_dir=params,
                          progress=False, log=log)

    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / LOCK_FILE).write_text(lock_of(os.getppid()))  # a live process holds it
    with pytest.raises(RunLocked, match=f"pid {os.getppid()}"):
        run()
    assert not (run_dir / "manifest.json").exists()  # refused before anything was written

    (run_dir / LOCK_FILE).write_text(lock_of(dead_pid()))
    said = []
    assert run(log=said.append)["steps"]["01_only"]["status"] == "ok"
    assert any("stale lock" in line for line in said) and not (run_dir / LOCK_FILE).exists()


# ============================================================================================== params
@pytest.mark.parametrize("text, needle", [
    ("common:\n  model: tiny\n    seed: 1\n", r"p\.yaml, line 3, column 9: mapping values are not allowed"),
    ("common:\n\tmodel: tiny\n", r"p\.yaml, line 2, column 1: .*never tabs"),
    ("- common\n- steps\n", r"the file is a list, but must be a mapping"),
    ("common: 3\n", r"'common' is the int 3, but must be a mapping"),
    ("common: {model: tiny}\nsteps: [01_trace_graph]\n", r"'steps' is a list"),
    ("common: {model: tiny}\nsteps:\n  01_trace_graph: [1]\n", r"'steps\.01_trace_graph' is a list"),
    ("", r"p\.yaml sets no parameters"),
    ("description: only words\n", r"p\.yaml sets no parameters"),
])
def test_params_file_errors_name_the_file_line_and_key(tmp_path, text, needle):
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(runner.ParamsError, match=needle) as err:
        runner.load_params_file("p", tmp_path)
    assert "\n" not in str(err.value)


def test_profile_name_cannot_leave_the_runs_folder(tmp_path):
    (tmp_path / "x.yaml").write_text("common: {model: tiny}\n")
    with pytest.raises(runner.ParamsError, match="letters, digits"):
        runner.load_params_file("../x", tmp_path / "sub")


def test_exponent_floats_are_floats(tmp_path):
    (tmp_path / "p.yaml").write_text("common:\n  lr: 1e-3\n  big: 1.5e3\n  kept: '1e-3'\n  n: 1_000\n")
    assert runner.load_params_file("p", tmp_path)["common"] == {"lr": 0.001, "big": 1500.0, "kept": "1e-3", "n": 1000}


def test_cli_prints_one_line_and_no_traceback_for_user_errors(tmp_path, capsys):
    def one_line(code: int, argv: list[str], needle: str) -> None:
        assert cli.main(argv) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and needle in err, err

    one_line(2, ["run", "--profile", "../../etc"], "letters, digits")
    run_dir = tmp_path / "smoke"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(lock_of(os.getppid()))
    base = ["run", "--profile", "smoke", "--steps", "01", "--run-root", str(tmp_path), "--quiet"]
    one_line(1, base, f"in use by another run (pid {os.getppid()}")
    (run_dir / LOCK_FILE).unlink()
    (run_dir / "manifest.json").write_text('{"steps": ')
    one_line(1, base, f"{run_dir / 'manifest.json'} is damaged")


# ============================================================================ issue 23: content, not mtime
def _fake_study(tmp_path):
    """Notebooks named as the study's (the runner knows their outputs by name), in seconds: 02 writes the
    calibration batch, 04 "trains" an adapter only where none is installed (as notebook 04 reuses finished ones)."""
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    nbs.mkdir()
    params.mkdir()
    head = 'profile = ""\nrun_dir = ""\nfigures_dir = ""\nvalue = 1\n'
    bodies = {
        "02_importance": "import pathlib, torch\nfrom tailored.artifacts import write_safetensors\n"
                         "write_safetensors(pathlib.Path(run_dir, 'calibration.safetensors'), "
                         "{'input_ids': torch.arange(64).reshape(2, 32)}, {'format': 'tailored.calibration/1'})",
        "04_lora_tune": "import pathlib, torch\nfrom tailored.artifacts import write_safetensors\n"
                        "a = pathlib.Path(run_dir, 'adapters', 'block_20', 'tailored')\n"
                        "if not (a / 'adapter_model.safetensors').exists():\n"
                        "    a.mkdir(parents=True, exist_ok=True)\n"
                        "    write_safetensors(a / 'adapter_model.safetensors', {'w': torch.arange(256.0)},\n"
                        "                      sealed=False)\n"
                        "    log = pathlib.Path(run_dir, 'trained.txt')\n"
                        "    log.write_text((log.read_text() if log.exists() else '') + 'trained\\n')",
    }
    for name, body in bodies.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        cell = nbformat.v4.new_code_cell(head)
        cell.metadata["tags"] = ["parameters"]
        nb.cells = [cell, nbformat.v4.new_code_cell(body)]
        nbformat.write(nb, str(nbs / f"{name}.ipynb"))
    (params / "t.yaml").write_text("common:\n  value: 2\n")

    def run(log):
        return runner.run(profile="t", run_root=tmp_path / "runs", notebooks_dir=nbs, params_dir=params,
                          progress=False, log=log)
    return tmp_path / "runs" / "t", run


def test_runner_rebuilds_a_damaged_adapter_and_calibration_even_with_their_mtime_restored(tmp_path):
    run_dir, run = _fake_study(tmp_path)
    run(lambda *_: None)
    adapter = run_dir / "adapters" / "block_20" / "tailored" / "adapter_model.safetensors"
    good_adapter, good_calibration = adapter.read_bytes(), (run_dir / "calibration.safetensors").read_bytes()

    dead = dead_pid()  # a run killed during 03's save left a full copy of the old checkpoint
    (run_dir / "pruned" / f".block_20.old-{dead}").mkdir(parents=True)
    st = adapter.stat()  # 64 bytes overwritten in the middle, the modification time put back (`touch -r`)
    adapter.write_bytes(good_adapter[:512] + b"\xff" * 64 + good_adapter[576:])
    os.utime(adapter, ns=(st.st_atime_ns, st.st_mtime_ns))
    said = []
    run(said.append)
    rel = "adapters/block_20/tailored/adapter_model.safetensors"
    assert f"[04_lora_tune] {rel} is damaged: its content differs from the sha256 recorded when the step wrote it: " \
           "the step rebuilds it" in said, said
    assert any("adapters/block_20/tailored moved to retired/adapters/block_20/tailored" in s for s in said), said
    assert any(f"pruned/.block_20.old-{dead}" in s and "removed" in s for s in said), said
    assert any("[02_importance] unchanged" in s for s in said)
    assert adapter.read_bytes() == good_adapter and (run_dir / "trained.txt").read_text() == "trained\ntrained\n"
    assert not (run_dir / "pruned" / f".block_20.old-{dead}").exists()

    (run_dir / "calibration.safetensors").write_bytes(good_calibration[:40])  # a full disk cut it
    said.clear()
    run(said.append)
    assert "[02_importance] calibration.safetensors is damaged: its content differs from the sha256 recorded when " \
           "the step wrote it: the step rebuilds it" in said, said
    assert (run_dir / "calibration.safetensors").read_bytes() == good_calibration
    assert any("[04_lora_tune] unchanged" in s for s in said), said  # 02 made the same bytes: 04 stands


def test_a_prompt_template_naming_a_field_the_task_lacks_is_refused_before_any_step(tmp_path, monkeypatch):
    from tailored import data, prompts

    data.load_task("sst2", limit=1)  # prepared, as `tailored prepare` leaves it: its fields are known
    text = prompts.PROMPTS_FILE.read_text()
    harness = '"{sentence}\\nQuestion: Is this sentence positive or negative?'  # sst2's, in a smoke task
    assert text.count(harness) == 1
    bad = tmp_path / "prompts.yaml"
    field = "sentence"
    bad.write_text(text.replace(harness, harness.replace("{sentence}", "{sentence_text}")))
    monkeypatch.setattr(prompts, "PROMPTS_FILE", bad)
    with pytest.raises(runner.ParamsError) as err:
        runner.resolve_params("smoke", runner.discover_steps(), tmp_path, tmp_path)
    message = str(err.value)
    assert "\n" not in message and f"{bad}: sst2/" in message
    assert f"{bad}: sst2/harness: template names field {field}_text, which sst2 does not have (its fields: " in message
    assert prompts.check_prompts({"sst2": ("sentence",)}, bad) and not prompts.check_prompts({"sst2": None}, bad)


def test_an_unreachable_target_for_the_method_is_refused_before_any_step(tmp_path):
    smoke = yaml.safe_load((runner.PARAMS_DIR / "smoke.yaml").read_text())
    smoke["steps"]["03_prune"]["method"] = "param_first"  # LLM-Pruner's range: layers 1..2 of the tiny model's 4
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(smoke))
    with pytest.raises(runner.ParamsError) as err:
        runner.resolve_params("p", runner.discover_steps(), tmp_path, tmp_path, params_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert ("03_prune.targets = [0.5]: method 'param_first' prunes layers 1..2 of 4, which removes at most 41.3% of "
            "the decoder; lower the target or choose a method whose layer_range is 'all' (flap, ") in str(err.value)


@pytest.mark.parametrize("variant", sorted(models.TINY_VARIANTS))
@pytest.mark.parametrize("attention", ["kv", "qheads"])
def test_the_reach_of_a_layer_range_from_the_config_is_the_planners(variant, attention):
    """The up-front check counts from config.json what plan_pruning counts on the traced graph."""
    from tailored.graph import trace
    from tailored.prune import max_share, plan_pruning

    model, _ = models.build_tiny(variant)
    graph = trace(model)
    config = models.tiny_config(variant).to_dict()
    most = max_share(config, (1, 3), attention)
    scores = {g.name: torch.rand(g.units) for g in graph.groups}
    plan_pruning(graph, scores, target=most, layer_range=(1, 3), attention=attention)  # reachable exactly
    with pytest.raises(ValueError, match=f"removes at most {most:.1%}"):
        plan_pruning(graph, scores, target=most + 0.011, layer_range=(1, 3), attention=attention)


def test_a_non_llama_model_directory_is_refused_naming_its_architecture(tmp_path, capsys):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 12}))
    assert runner._check_model(str(tmp_path / "gpt2")) == (
        f"{tmp_path / 'gpt2'}: architecture gpt2 is not LLaMA-family; supported: llama, qwen2 (the layouts the "
        "tracer and the pruned checkpoints are built for)")
    assert cli.main(["run", "--profile", "smoke", "--model", str(tmp_path / "gpt2"), "--run-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "architecture gpt2 is not LLaMA-family" in err and "Traceback" not in err


@pytest.mark.parametrize("edit, needle", [
    (("kind: classification", "kind: quiz", 1), "task 'boolq', key 'kind': 'quiz' is not one of multiple_choice"),
    (("    fields: [support, question]\n", "", 1), "task 'sciq', key 'fields': a mapping prompt field -> column"),
])
def test_a_malformed_tasks_yaml_is_one_line_naming_the_file_task_and_key(tmp_path, edit, needle):
    """tasks.yaml is read when tailored.data is imported: every command refuses it before doing anything."""
    shutil.copytree(runner.paths.REPO_ROOT / "tailored", tmp_path / "tailored",
                    ignore=shutil.ignore_patterns("__pycache__"))
    tasks = tmp_path / "tailored" / "tasks.yaml"
    text = tasks.read_text()
    assert edit[0] in text
    tasks.write_text(text.replace(*edit))
    proc = subprocess.run([sys.executable, "-m", "tailored.cli", "run", "--profile", "smoke"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"tailored run: {tasks}: ") and needle in proc.stderr, proc.stderr


def test_tailored_lab_hands_its_options_to_jupyterlab(monkeypatch):
    for args, tail in ((["--no-browser"], ["--no-browser"]), (["--", "--port=8899", "--allow-root"],
                                                              ["--port=8899", "--allow-root"])):
        cmd = cli.lab_command(args)
        assert cmd[1:4] == ["-m", "jupyter", "lab"] and cmd[-len(tail):] == tail
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    with pytest.raises(SystemExit) as done:
        cli.main(["lab", "--no-browser", "--port=8899"])
    assert done.value.code == 0 and calls[0][-2:] == ["--no-browser", "--port=8899"]


def test_a_damaged_input_of_the_selected_step_is_refused_naming_the_step_that_rebuilds_it(tmp_path, capsys):
    run_dir, run = _fake_study(tmp_path)
    run(lambda *_: None)
    calibration = run_dir / "calibration.safetensors"
    flip = bytearray(calibration.read_bytes())
    flip[-1] ^= 0x01
    calibration.write_bytes(bytes(flip))
    nbs, params = tmp_path / "notebooks", tmp_path / "params"
    with pytest.raises(ArtifactError) as err:  # only 04 asked for: 02's output is not rebuilt behind the user's back
        runner.run(profile="t", only="04", run_root=tmp_path / "runs", notebooks_dir=nbs, params_dir=params,
                   progress=False, log=lambda *_: None)
    assert str(err.value) == ("calibration.safetensors is damaged: its content differs from the sha256 recorded when "
                              "the step wrote it; notebook 02 rebuilds it: `tailored run --from 02`")


# ===================================================================== issue 23, phase 2: checked before reuse
def _damage(path, offset: int | None = None) -> None:
    """64 bytes overwritten in the middle of ``path``, its modification time put back (as `touch -r` or bit rot)."""
    blob, st = path.read_bytes(), path.stat()
    at = len(blob) // 2 if offset is None else offset
    path.write_bytes(blob[:at] + bytes(b ^ 0xFF for b in blob[at: at + 64]) + blob[at + 64:])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_damaged_finished_adapter_is_trained_again_not_loaded(tmp_path):
    settings = LoraSettings(max_steps=2, **{**QUICK, "save_every": 1})
    out = tmp_path / "run"
    first = lora.train_lora(*models.load("tiny"), EXAMPLES, settings, out, progress=False)
    assert (out / "SHA256SUMS").is_file() and not adapters.check_adapter(out)
    good = (out / "adapter_model.safetensors").read_bytes()
    _damage(out / "adapter_model.safetensors")
    with pytest.raises(ArtifactError, match=r"run/adapter_model\.safetensors is damaged: .*notebook 04"):
        adapters.load_adapter(models.load("tiny")[0], out)  # notebook 05's path: refused, named
    with pytest.warns(UserWarning, match=r"run moved to retired/run: it held a LoRA run that is damaged \(.*run/"
                                         r"adapter_model\.safetensors is damaged: .*trained afresh"):
        again = lora.train_lora(*models.load("tiny"), EXAMPLES, settings, out, progress=False)
    assert again.losses == first.losses and (out / "adapter_model.safetensors").read_bytes() == good
    assert (tmp_path / "retired" / "run" / "adapter_model.safetensors").is_file()  # where replaced checkpoints go
    assert not list(tmp_path.rglob("*.replaced"))


def test_a_truncated_adapter_is_named_in_one_line_sealed_or_not(tmp_path):
    settings = LoraSettings(max_steps=1, **{**QUICK, "save_every": 1})
    out = tmp_path / "run"
    lora.train_lora(*models.load("tiny"), EXAMPLES, settings, out, progress=False)
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a full disk cut it
    for sealed in (True, False):
        if not sealed:  # an adapter from elsewhere, without SHA256SUMS: the header says it is cut
            (out / "SHA256SUMS").unlink()
        with pytest.raises(ArtifactError) as err:
            adapters.load_adapter(models.load("tiny")[0], out)
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{weights} is damaged"), str(err.value)
        assert "`tailored run --steps 04 --force`" in str(err.value)


def test_a_damaged_snapshot_is_not_resumed_from(tmp_path):
    settings = LoraSettings(max_steps=2, **{**QUICK, "save_every": 1})
    out = tmp_path / "run"
    whole = lora.train_lora(*models.load("tiny"), EXAMPLES, settings, tmp_path / "whole", progress=False)
    lora.train_lora(*models.load("tiny"), EXAMPLES, settings, out, progress=False, stop_after=1)
    _damage(out / "snapshot-1" / "optimizer.safetensors", offset=200)
    with pytest.warns(UserWarning, match=r"snapshot-1 is not resumed from: .*optimizer\.safetensors is damaged"):
        result = lora.train_lora(*models.load("tiny"), EXAMPLES, settings, out, progress=False)
    assert result.resumed_from == 0 and result.losses == whole.losses


def test_a_pruned_checkpoint_damaged_with_its_mtime_restored_is_refused_naming_the_file(pruned_dir, tmp_path):
    ckpt = tmp_path / "block_20"
    shutil.copytree(pruned_dir, ckpt)
    assert "model.safetensors" in (ckpt / "SHA256SUMS").read_text()
    _damage(ckpt / "model.safetensors")
    with pytest.raises(ArtifactError) as err:
        models.load(str(ckpt))  # how notebooks 04 and 05 load it
    assert "\n" not in str(err.value) and str(err.value) == (
        f"{ckpt / 'model.safetensors'} is damaged: its content differs from the sha256 recorded when it was written; "
        "save the checkpoint again (in a run: notebook 03, `tailored run --from 03`)")


def test_a_truncated_calibration_batch_is_named_in_one_line(tmp_path):
    from tailored.importance import load_calibration, save_calibration

    path = save_calibration(torch.arange(64).reshape(2, 32), tmp_path / "calibration.safetensors", {"n": 2})
    assert (tmp_path / "calibration.safetensors.sha256").is_file()
    path.write_bytes(path.read_bytes()[:40])
    for sealed in (True, False):
        if not sealed:  # without its seal, safetensors' "incomplete metadata" is named too
            (tmp_path / "calibration.safetensors.sha256").unlink()
        with pytest.raises(ArtifactError) as err:
            load_calibration(path)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{path} is damaged") and "notebook 02" in message, message


def test_a_damaged_graph_is_refused_by_its_seal(tmp_path):
    graph = Graph.load(Graph.save(_tiny_graph(), tmp_path / "graph.json"))
    assert (tmp_path / "graph.json.sha256").is_file() and graph.groups
    text = (tmp_path / "graph.json").read_text()
    (tmp_path / "graph.json").write_text(text.rstrip("\n") + " \n")  # still valid JSON, the same graph
    with pytest.raises(ArtifactError, match=r"graph\.json is damaged: .*`tailored run --steps 01 --force`"):
        Graph.load(tmp_path / "graph.json")


def _tiny_graph() -> Graph:
    from tailored.graph import trace

    return trace(models.build_tiny("tiny")[0])


# ====================================================================== issue 23, phase 2: nothing learned
@pytest.mark.parametrize("validation, base, needle", [
    (5.259, 5.5236, None),  # the smoke model after two steps of lr 0.01 (its base: U - 0.025)
    (U, 5.5236, "is not below the base model's 5.5236"),  # lr 1000 on the smoke model: a uniform guess, above base
    (U - 2e-4, U + 0.01, "is ln(257) = 5.5491, a uniform guess"),  # below a base above U, but still uniform
    (3.30, 3.25, "is not below the base model's 3.2500"),  # a real model made worse
    (float("nan"), 3.25, "is not below"),
    (3.20, 3.25, None),
])
def test_the_nothing_learned_rule_on_known_losses(validation, base, needle):
    problem = lora.not_learned(validation, base, 257)
    assert (problem is None) if needle is None else (needle in problem), problem


def test_lr_1000_on_the_smoke_model_installs_no_adapter_and_says_the_numbers(tmp_path):
    """The smoke model is random (std 0.02): its base loss is near ln(vocab) (here 0.035 above it; on the smoke
    profile's sst2 examples 0.025 below), and lr 1000 collapses it to exactly ln(vocab) without tripping the
    training-loss rules, so the validation loss decides: a uniform guess, though below this base's."""
    model, tok = models.build_tiny("tiny", seed=0)
    settings = LoraSettings(max_steps=3, **{**QUICK, "lr": 1000.0, "save_every": 1})
    out = tmp_path / "blown"
    with pytest.raises(lora.NothingLearned) as err:
        lora.train_lora(model, tok, EXAMPLES, settings, out, validation=EXAMPLES[:4], progress=False)
    message = str(err.value)
    assert "\n" not in message and f"LoRA run {out}: the adapter of step 3 of 3 is not installed: its " in message
    assert f"its validation loss {U:.4f} is ln(257) = {U:.4f}, a uniform guess (the base model's: 5.5840)" in message
    assert isinstance(err.value, TrainingDiverged)
    assert not any((out / name).exists() for name in (*adapters.ADAPTER_FILES, lora.METRICS_FILE, "best"))
    assert not list(out.glob("snapshot-*"))

    healthy = lora.train_lora(*models.build_tiny("tiny", seed=0), EXAMPLES, LoraSettings(max_steps=3, **QUICK),
                              tmp_path / "ok", validation=EXAMPLES[:4], progress=False)
    assert (tmp_path / "ok" / "SHA256SUMS").is_file() and healthy.validation[-1][1] < U - 0.01

    # a scale check (benchmarks/paper_scale.py: one step on random weights) measures memory and time, not
    # learning: with require_learning off the same collapsed run is installed
    kept = lora.train_lora(*models.build_tiny("tiny", seed=0), EXAMPLES, LoraSettings(
        max_steps=3, **{**QUICK, "lr": 1000.0, "save_every": 1}, require_learning=False), tmp_path / "scale",
        validation=EXAMPLES[:4], progress=False)
    assert kept.steps == 3 and (tmp_path / "scale" / lora.METRICS_FILE).is_file()


def test_a_file_size_limit_while_saving_an_adapter_names_the_file(tmp_path):
    """`ulimit -f` during PEFT's save: the adapter's weights file is named, and no temporary folder stays."""
    script = (
        "import pathlib, resource, sys\n"
        "from tailored import adapters, models\n"
        "from tailored.lora import LoraSettings\n"
        "peft_model = adapters.add_lora(models.build_tiny('tiny')[0], LoraSettings())\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ\n"
        "try:\n"
        "    adapters.write_adapter(peft_model, pathlib.Path(sys.argv[1]) / 'best')\n"
        "except OSError as err:\n"
        "    print(type(err).__name__ + ': ' + str(err))\n")
    env = {**os.environ, "PYTHONPATH": str(runner.paths.REPO_ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert len(out) == 1 and out[0].startswith(
        f"WriteFailed: cannot write {tmp_path / 'best' / 'adapter_model.safetensors'}: the file is larger than this "
        "process may write (a file-size limit: `ulimit -f`"), out
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_is_written_as_the_same_bytes_whatever_python_s_string_hashing(tmp_path):
    """PEFT writes target_modules from a set; two processes with different PYTHONHASHSEED used to write them in
    different orders (seen: one class adapter retrained on a second machine, weights identical, config not)."""
    script = ("import pathlib, sys\n"
              "from tailored import adapters, models\n"
              "from tailored.lora import LoraSettings\n"
              "peft_model = adapters.add_lora(models.build_tiny('tiny')[0], LoraSettings())\n"
              "adapters.write_adapter(peft_model, pathlib.Path(sys.argv[1]))\n")
    written = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"hash{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(runner.paths.REPO_ROOT), "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, capture_output=True)
        written.append((out / "adapter_config.json").read_bytes())
    assert written[0] == written[1] == written[2]
    modules = json.loads(written[0])["target_modules"]
    assert modules == sorted(modules) and len(modules) > 1
