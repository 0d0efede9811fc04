"""Nothing damaged is reused, every failed write names its file, nothing is left behind (issue 23).

Sealed artifacts (tailored.artifacts: the sha256 of their bytes recorded beside them when written), the
byte-stable safetensors writer, the writers' one-line errors on a full disk or a file-size limit, and the run
directory's one place for what was replaced (tailored.rundir.retire) and its cleanup of dead writers'
temporaries. Temporary folders and tiny tensors throughout.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save

from tailored import rundir
from tailored.artifacts import (
    SUMS,
    ArtifactError,
    check_seal,
    open_safetensors,
    seal,
    verify,
    write_safetensors,
    write_sealed,
)
from tailored.paths import REPO_ROOT, WriteFailed, atomic_write_bytes

TENSORS = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.bfloat16), "ids": torch.arange(4),
           "empty": torch.zeros(0), "mask": torch.tensor([True, False])}
META = {"settings": '{"n": 2}', "format": "tailored.test/1", "keys": '["b", "a"]'}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def flip_one_byte_keeping_size_and_mtime(path) -> None:
    """Bit rot, or a copy tool that keeps times: other bytes, the same size and modification time (`touch -r`)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ============================================================================================== seals
def test_a_sealed_file_damaged_with_its_mtime_restored_is_named(tmp_path):
    path = write_sealed(tmp_path / "importance.safetensors", b"0123456789" * 100)
    assert (tmp_path / "importance.safetensors.sha256").read_text().endswith("  importance.safetensors\n")
    assert check_seal(path) is None
    flip_one_byte_keeping_size_and_mtime(path)
    with pytest.raises(ArtifactError, match=r"importance\.safetensors is damaged: its content differs from the "
                                            r"sha256 recorded when it was written; rerun notebook 02"):
        verify(path, rundir.rebuild_hint(tmp_path, path))


def test_a_sealed_folder_names_the_damaged_or_missing_file(tmp_path):
    ckpt = tmp_path / "pruned" / "block_20"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"w" * 4096)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "sub" / "x.txt").write_text("x")
    seal(ckpt)
    assert sorted(line.split("  ")[1] for line in (ckpt / SUMS).read_text().splitlines()) == [
        "config.json", "model.safetensors", "sub/x.txt"]  # sha256sum format: `sha256sum -c SHA256SUMS` checks it
    assert check_seal(ckpt) is None
    flip_one_byte_keeping_size_and_mtime(ckpt / "model.safetensors")
    assert check_seal(ckpt) == (f"{ckpt / 'model.safetensors'} is damaged: its content differs from the sha256 "
                                "recorded when it was written")
    assert "rerun notebook 03" in rundir.rebuild_hint(tmp_path, ckpt / "model.safetensors")
    (ckpt / "config.json").unlink()
    assert check_seal(ckpt) == f"{ckpt / 'config.json'} is missing (listed in {ckpt / SUMS})"
    assert "has no content hash" in check_seal(tmp_path / "pruned")  # never sealed: nothing to trust


def test_truncated_safetensors_names_the_file_and_the_step_that_rebuilds_it(tmp_path):
    path = tmp_path / "calibration.safetensors"
    write_safetensors(path, TENSORS, META, sealed=False)  # as a writer without seals left it
    blob = path.read_bytes()
    for cut in (5, 100, len(blob) - 3):  # a full disk cuts anywhere: the length, the header, the data
        path.write_bytes(blob[:cut])
        with pytest.raises(ArtifactError) as err:
            with open_safetensors(path, rundir.rebuild_hint(tmp_path, path)):
                pass
        message = str(err.value)
        assert message.startswith(f"{path} is damaged (SafetensorError: ") and "\n" not in message
        assert message.endswith("rerun notebook 02 to rebuild it (`tailored run --steps 02 --force`)")


# ======================================================================================= same bytes
def test_safetensors_writer_is_byte_stable_across_processes_and_reads_back(tmp_path):
    """safetensors writes its metadata from a hash map seeded anew in every process; ours sorts it."""
    meta = {f"key{i}": str(i) for i in range(8)}  # 8! orders: two processes of safetensors practically never agree
    script = textwrap.dedent(f"""
        import sys, torch
        from tailored.artifacts import write_safetensors
        from safetensors.torch import save
        tensors = {{"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.bfloat16)}}
        write_safetensors(sys.argv[1], tensors, {meta!r})
        open(sys.argv[1] + ".theirs", "wb").write(save(tensors, metadata={meta!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for i in range(2):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{i}.safetensors")], check=True, env=env)
    ours = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(2)}
    theirs = {(tmp_path / f"{i}.safetensors.theirs").read_bytes() for i in range(2)}
    assert len(ours) == 1 and len(theirs) == 2  # safetensors' order varied between the processes, ours did not
    write_safetensors(tmp_path / "all.safetensors", TENSORS, META)
    loaded = load_file(str(tmp_path / "all.safetensors"))
    assert set(loaded) == set(TENSORS) and all(torch.equal(loaded[k], v) for k, v in TENSORS.items())
    header = json.loads((tmp_path / "all.safetensors").read_bytes()[8:].split(b"}}", 1)[0] + b"}}")
    assert list(header["__metadata__"]) == sorted(META)
    assert len(save(TENSORS, metadata=META)) == len((tmp_path / "all.safetensors").read_bytes())  # the same layout


# ==================================================================================== failed writes
def test_a_file_size_limit_during_a_save_names_the_file_and_leaves_no_temporary(tmp_path):
    """`ulimit -f`: safetensors' own writer says only "I/O error: File too large"; ours name the file."""
    script = textwrap.dedent("""
        import pathlib, resource, sys, torch
        from tailored.artifacts import write_safetensors
        from tailored.paths import atomic_write_bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ
        folder = pathlib.Path(sys.argv[1])
        for name, write in (("tensors.safetensors", lambda p: write_safetensors(p, {"w": torch.zeros(10_000)})),
                            ("bytes.json", lambda p: atomic_write_bytes(p, b"x" * 10_000))):
            try:
                write(folder / name)
            except OSError as err:
                print(type(err).__name__ + ": " + str(err))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert len(out) == 2, out
    for line, name in zip(out, ("tensors.safetensors", "bytes.json")):
        assert line.startswith(f"WriteFailed: cannot write {tmp_path / name}: the file is larger than this process "
                               "may write (a file-size limit: `ulimit -f`"), line
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary of it


def test_a_full_disk_names_the_file_and_what_is_free(tmp_path, monkeypatch):
    class FullDisk:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", FullDisk)
    with pytest.raises(WriteFailed, match=rf"cannot write {tmp_path / 'graph.json'}: the disk is full "
                                          r"\(No space left on device\); [\d.]+ GiB free there"):
        atomic_write_bytes(tmp_path / "graph.json", b"{}")


# ======================================================================================== run folder
def test_a_damaged_or_unsealed_evaluation_is_named_retired_and_evaluated_again(tmp_path):
    said = []
    store = rundir.EvalStore(tmp_path, log=said.append)
    store.put("k1", {"value": 0.25, "seconds": 3.0})
    store.put("k2", {"value": 0.5, "seconds": 1.0})
    assert store.get("k1") == {"value": 0.25, "seconds": 3.0} and store.reused == 1
    path = tmp_path / "eval" / "k2.json"
    path.write_text(path.read_text().replace("0.5", "0.9"))  # still valid JSON, the same length: another number
    assert store.get("k2") is None and not path.exists()
    assert said[-1].startswith("eval/k2.json moved to retired/eval/k2.json: ") and "is damaged" in said[-1]
    (tmp_path / "eval" / "old.json").write_text('{"value": 1}')  # written before seals: cannot be trusted
    assert store.get("old") is None and "has no content hash" in said[-1]
    assert store.rejected == ["k2.json", "old.json"] and store.reused == 1
    assert (tmp_path / "retired" / "eval" / "k2.json.sha256").exists()  # moved with its seal


def test_a_resumed_run_removes_what_dead_writers_left_and_keeps_what_live_ones_write(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    stale = [f"pruned/.block_20.old-{dead}", f"pruned/.block_50.tmp-{dead}", f"adapters/block_20/.tailored.tmp-{dead}",
             f".importance.safetensors.tmp-{dead}", "03_prune.running.ipynb"]
    for name in stale:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if "old" in name or "tailored.tmp" in name else path.write_text("half")
    (tmp_path / "pruned" / f".block_20.old-{dead}" / "model.safetensors").write_bytes(b"a full copy")
    live = tmp_path / "pruned" / f".block_30.tmp-{alive}"  # its writer still runs: not provably dead
    live.mkdir()
    (tmp_path / "adapters" / "block_20" / "tailored.replaced").mkdir()  # how older versions set adapters aside
    said = []
    gone = rundir.remove_leftovers(tmp_path, log=said.append)
    assert sorted(gone) == sorted([*stale, "adapters/block_20/tailored.replaced"])
    assert all(not (tmp_path / n).exists() for n in gone) and live.exists()
    assert (tmp_path / "retired" / "adapters" / "block_20" / "tailored.replaced").is_dir()
    assert "removed what interrupted runs left behind" in said[-1] and f".block_20.old-{dead}" in said[-1]
    assert rundir.remove_leftovers(tmp_path, log=said.append) == []


def test_replaced_artifacts_of_every_kind_go_to_retired_said_out_loud(tmp_path):
    for rel in ("pruned/block_50/model.safetensors", "adapters/block_20/tailored/adapter_model.safetensors"):
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_bytes(b"w")
    write_sealed(tmp_path / "importance.safetensors", b"scores")
    said = []
    for rel in ("pruned/block_50", "adapters/block_20/tailored", "importance.safetensors"):
        dest = rundir.retire(tmp_path, tmp_path / rel, "replaced", log=said.append)
        assert dest == tmp_path / "retired" / rel and dest.exists() and not (tmp_path / rel).exists()
    assert said == [f"{r} moved to retired/{r}: replaced" for r in
                    ("pruned/block_50", "adapters/block_20/tailored", "importance.safetensors")]
    assert (tmp_path / "retired" / "importance.safetensors.sha256").exists()
    (tmp_path / "pruned" / "block_50").mkdir()  # retired again: the newer copy replaces the older one
    rundir.retire(tmp_path, tmp_path / "pruned" / "block_50", "again", log=said.append)
    assert not (tmp_path / "retired" / "pruned" / "block_50" / "model.safetensors").exists()


@pytest.mark.parametrize("rel, unit", [
    ("pruned/block_20/model.safetensors", "pruned/block_20"),
    ("adapters/block_20/tailored/adapter_model.safetensors", "adapters/block_20/tailored"),
    ("adapters/index.json", "adapters/index.json"),
    ("importance.safetensors", "importance.safetensors"),
])
def test_a_damaged_file_is_rebuilt_with_the_artifact_it_belongs_to(tmp_path, rel, unit):
    assert rundir.artifact_unit(tmp_path, rel) == tmp_path / unit


def test_a_lora_run_is_retired_into_the_run_directory_it_belongs_to(tmp_path):
    assert rundir.run_dir_of(tmp_path / "adapters" / "block_20" / "tailored") == tmp_path  # notebook 04's layout
    assert rundir.run_dir_of(tmp_path / "my_adapter") == tmp_path  # an out_dir of one's own: retired/ beside it
