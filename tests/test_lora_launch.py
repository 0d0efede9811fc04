"""LoRA data-parallel through accelerate's launcher, on the CPU: two processes make the one-process run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tailored import checkpoint, lora, lora_launch, models
from tailored.artifacts import ArtifactError
from tailored.lora import LoraSettings, TrainExample

REPO = Path(__file__).resolve().parent.parent
WORDS = ("apple", "pear", "plum", "fig", "car", "rock", "bus", "shoe")
EXAMPLES = [TrainExample(f"Is {w} a fruit?\nAnswer:", " yes" if i < 4 else " no", f"toy/{w}")
            for i, w in enumerate(WORDS)]
# batch 4 in micro-batches of 1: each process takes two rows of every step; no dropout, so the runs can match
SETTINGS = LoraSettings(max_steps=4, dropout=0.0, lr=1e-2, batch_size=4, micro_batch_size=1, max_seq_len=64,
                        warmup_ratio=0.0, save_every=2)


@pytest.fixture
def env():
    # the processes import this checkout's package, with one thread each (two of them on a 2-core machine)
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_two_processes_make_the_one_process_run(tmp_path, env):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, tok = models.load("tiny", seed=0)
    single = lora.train_lora(model, tok, EXAMPLES, SETTINGS, tmp_path / "single", progress=False)

    job = lora_launch.write_job(tmp_path / "job.json", base="tiny", examples=EXAMPLES, settings=SETTINGS,
                                out_dir=tmp_path / "dp")
    lora_launch.launch(job, processes=2, env=env)

    a, b = load_file(str(tmp_path / "single" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "dp" / "adapter_model.safetensors"))
    assert set(a) == set(b) and a
    # the same start (process 0's LoRA init is broadcast), the same summed gradients, the same steps: equal up to
    # the order of float sums, which Adam's step (g / sqrt(v)) can magnify to ~1e-5 on a weight
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-3)
    diff = torch.cat([(b[k] - a[k]).abs().reshape(-1) for k in a])
    assert float(diff.mean()) < 1e-6, float(diff.mean())
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-3  # B starts at zero: the comparison is about trained weights
    dp = lora.read_train_metrics(tmp_path / "dp")
    assert dp.steps == single.steps == 4 and dp.tokens == single.tokens
    for (s1, l1), (s2, l2) in zip(single.losses, dp.losses):  # the whole batch's loss, summed over processes
        assert s1 == s2 and abs(l1 - l2) < 1e-4

    # the notebook's kernel then finds the adapter finished and loads it instead of training again
    model2, _ = models.load("tiny", seed=0)
    again = lora.train_lora(model2, tok, EXAMPLES, SETTINGS, tmp_path / "dp", progress=False)
    assert again.train_s == dp.train_s and again.steps == 4


def test_a_failed_worker_is_its_own_error_in_one_line(tmp_path, env):
    """A worker's error comes back as itself, not as the launcher's traceback: a damaged base checkpoint is the
    same ArtifactError, naming the file, that one process would raise; the whole output stays in the log."""
    base = checkpoint.save_pruned(*models.load("tiny", seed=0), tmp_path / "block_20", {"method": "none"})
    weights = base / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])  # a full disk cut it
    job = lora_launch.write_job(tmp_path / "job.json", base=str(base), examples=EXAMPLES, settings=SETTINGS,
                                out_dir=tmp_path / "dp")
    with pytest.raises(ArtifactError) as err:
        lora_launch.launch(job, processes=2, env=env)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{weights} is damaged: "), message
    assert f"(process 0 of 2 failed, in the data-parallel LoRA run of {job}; the whole output: {job}.log)" in message
    assert not (tmp_path / "dp" / lora.METRICS_FILE).exists()
    assert "Traceback" in (tmp_path / "job.json.log").read_text()  # the whole output, kept beside the job


def test_write_job_refuses_what_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="no training examples"):
        lora_launch.write_job(tmp_path / "j.json", "tiny", [], SETTINGS, tmp_path / "o")
    with pytest.raises(ValueError, match="cpu or cuda"):
        lora_launch.write_job(tmp_path / "j.json", "tiny", EXAMPLES, SETTINGS, tmp_path / "o", device="mps")
    with pytest.raises(ValueError, match="distillation"):
        lora_launch.write_job(tmp_path / "j.json", "tiny", EXAMPLES, LoraSettings(distill=0.5), tmp_path / "o")
    with pytest.raises(ValueError, match="at least 1"):
        lora_launch.command(tmp_path / "j.json", 0)
