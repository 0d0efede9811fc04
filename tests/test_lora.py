"""LoRA recovery on the tiny model: the answer-only loss falls, adapters reload, runs resume, bad input fails."""

from __future__ import annotations

import math
import types

import pytest
import torch
from safetensors.torch import load_file

from tailored import adapters, lora, models, recovery_data
from tailored.anatomy import recomputes_activations, set_recompute_activations
from tailored.lora import LoraSettings, TrainExample

FRUIT = ("apple", "pear", "plum", "fig")
OTHER = ("car", "rock", "bus", "shoe")
EXAMPLES = [TrainExample(f"Is {w} a fruit?\nAnswer:", " yes" if w in FRUIT else " no", f"toy/{w}")
            for w in FRUIT + OTHER]
# Quick settings for the tiny model: a high rate so a few steps show learning.
QUICK = dict(lr=1e-2, batch_size=4, max_seq_len=64, warmup_ratio=0.0, save_every=100)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny():
    return models.load("tiny", seed=0)


def adapter_weights(out_dir):
    return load_file(str(out_dir / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------ data
def test_loss_mask_covers_exactly_the_answer_and_eos():
    _, tok = tiny()
    ex = EXAMPLES[0]
    enc = recovery_data.encode(tok, ex, max_seq_len=64)
    mask = recovery_data.loss_mask(enc)
    kept = [t for t, m in zip(enc.input_ids, mask) if m]
    assert tok.decode(kept) == ex.answer + tok.eos_token
    assert kept == [lab for lab in enc.labels if lab != recovery_data.IGNORE]
    assert tok.decode([t for t, m in zip(enc.input_ids, mask) if not m]) == ex.prompt
    # too long: the prompt loses tokens from the left, the answer stays whole and masked the same way
    long = TrainExample("x" * 100 + ex.prompt, ex.answer)
    enc = recovery_data.encode(tok, long, max_seq_len=20)
    assert len(enc) == 20 and enc.truncated == 100 + len(ex.prompt) - (20 - len(ex.answer) - 1)
    assert tok.decode([t for t, m in zip(enc.input_ids, recovery_data.loss_mask(enc)) if m]) == ex.answer + tok.eos_token
    assert tok.decode(enc.input_ids).endswith(ex.prompt[-5:] + ex.answer + tok.eos_token)
    # as the evaluator scores it, a prompt's trailing space belongs to the answer
    enc = recovery_data.encode(tok, TrainExample("Answer: ", "yes"))
    assert tok.decode([t for t, m in zip(enc.input_ids, recovery_data.loss_mask(enc)) if m]) == " yes" + tok.eos_token


def test_collate_pads_on_the_right_and_masks_padding():
    _, tok = tiny()
    a, b = recovery_data.encode(tok, EXAMPLES[0]), recovery_data.encode(tok, EXAMPLES[5])  # " yes" and " no": lengths differ
    batch = recovery_data.collate([a, b], pad_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(a), len(b)))
    short = 0 if len(a) < len(b) else 1
    n = min(len(a), len(b))
    assert batch["attention_mask"][short, n:].sum() == 0 and (batch["labels"][short, n:] == recovery_data.IGNORE).all()


def test_train_and_validation_are_disjoint_and_nested(monkeypatch):
    """With a stand-in data module: validation is the first part of the seeded order, training the next."""
    def load_task(name, split="eval", limit=None, seed=0):
        assert split == "train"
        rows = [types.SimpleNamespace(task=name, id=str(i), fields={"instruction": f"say {i}", "input": ""},
                                      choices=(), label=None, references=(str(i),)) for i in range(100)]
        return rows[:limit]

    monkeypatch.setattr(recovery_data, "load_task", load_task)  # the loader recovery_data imported
    train, val = recovery_data.train_and_validation("generic", n=10, n_validation=5)
    assert len(train) == 10 and len(val) == 5
    assert not {e.source for e in train} & {e.source for e in val}
    bigger, val2 = recovery_data.train_and_validation("generic", n=30, n_validation=5)
    assert val2 == val and bigger[:10] == train
    assert train[0].prompt == recovery_data.GENERIC_TEMPLATE.format(instruction="say 5") and train[0].answer == "5"


# -------------------------------------------------------------------------------------- training
def test_training_reduces_the_completion_only_loss(tmp_path):
    # Larger initial weights than models.load("tiny"): with std 0.02 and a frozen, RMS-normed LM head the
    # random model cannot put a logit more than ~2.5 above the rest, so its loss could not fall below ~4.
    model, tok = models.build_tiny("tiny", seed=0, initializer_range=0.2)
    encoded = [recovery_data.encode(tok, e) for e in EXAMPLES]
    before = lora.validation_loss(model, encoded, tok.pad_token_id)
    result = lora.train_lora(model, tok, EXAMPLES, LoraSettings(max_steps=24, dropout=0.0, **QUICK), tmp_path / "a",
                             progress=False)
    after = lora.validation_loss(result.model, encoded, tok.pad_token_id)
    assert after < 0.1 * before, (before, after)
    assert result.steps == 24 and len(result.losses) == 24 and result.tokens_per_s > 0
    assert result.losses[-1][1] < result.losses[0][1]
    metrics = lora.read_train_metrics(tmp_path / "a")
    assert metrics.losses == result.losses and metrics.steps == 24
    assert not list((tmp_path / "a").glob("snapshot-*"))  # a finished run keeps the adapter, not the state


def test_saved_adapter_reloads_onto_a_reloaded_pruned_model_with_identical_logits(tmp_path):
    checkpoint = pytest.importorskip("tailored.checkpoint")
    model, tok = tiny()
    # Prune by hand: layer 0 keeps 96 of its 128 MLP channels, so the adapter has non-stock shapes.
    mlp = model.model.layers[0].mlp
    keep = torch.arange(96)
    for name in ("gate_proj", "up_proj"):
        lin = getattr(mlp, name)
        setattr(mlp, name, torch.nn.Linear(64, 96, bias=False))
        getattr(mlp, name).weight.data = lin.weight.data[keep].clone()
    down = mlp.down_proj
    mlp.down_proj = torch.nn.Linear(96, 64, bias=False)
    mlp.down_proj.weight.data = down.weight.data[:, keep].clone()
    checkpoint.save_pruned(model, tok, tmp_path / "pruned", {"method": "by hand"})

    pruned, tok = checkpoint.load_pruned(tmp_path / "pruned")
    result = lora.train_lora(pruned, tok, EXAMPLES, LoraSettings(max_steps=3, **QUICK), tmp_path / "adapter",
                             progress=False)
    ids = torch.tensor([recovery_data.encode(tok, EXAMPLES[0]).input_ids])
    with torch.no_grad():
        expected = result.model(input_ids=ids).logits

    reloaded = adapters.load_adapter(checkpoint.load_pruned(tmp_path / "pruned")[0], tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
        merged = adapters.merge(reloaded)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    checkpoint.save_pruned(merged, tok, tmp_path / "merged", {"lora": str(tmp_path / "adapter")})
    with torch.no_grad():
        again = checkpoint.load_pruned(tmp_path / "merged")[0](input_ids=ids).logits
    torch.testing.assert_close(again, expected, atol=1e-4, rtol=1e-4)


def test_nan_loss_raises_floating_point_error_naming_the_step(tmp_path):
    model, tok = tiny()
    settings = LoraSettings(max_steps=5, **{**QUICK, "lr": 1e30})  # step 1 blows the adapter up
    with pytest.raises(FloatingPointError, match=r"at step 2 of 5"):
        lora.train_lora(model, tok, EXAMPLES, settings, tmp_path / "nan", progress=False)


def test_interrupted_run_resumes_from_its_saved_step(tmp_path):
    # dropout on: resuming must restore the random state too, not only weights and optimizer
    settings = LoraSettings(max_steps=4, dropout=0.1, **{**QUICK, "save_every": 2, "warmup_ratio": 0.25})
    first = lora.train_lora(*tiny(), EXAMPLES, settings, tmp_path / "run", progress=False, stop_after=2)
    assert first.steps == 2 and (tmp_path / "run" / "snapshot-2" / "optimizer.safetensors").exists()
    assert not (tmp_path / "run" / lora.METRICS_FILE).exists()
    resumed = lora.train_lora(*tiny(), EXAMPLES, settings, tmp_path / "run", progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4]

    straight = lora.train_lora(*tiny(), EXAMPLES, settings, tmp_path / "straight", progress=False)
    assert [v for _, v in resumed.losses] == pytest.approx([v for _, v in straight.losses], rel=1e-5)
    a, b = adapter_weights(tmp_path / "run"), adapter_weights(tmp_path / "straight")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)

    # a finished run is not trained again: the rerun loads its adapter
    again = lora.train_lora(*tiny(), EXAMPLES, settings, tmp_path / "run", progress=False)
    assert again.losses == resumed.losses
    # another setting: the old adapter is kept aside, the run trains afresh (the run does not stop)
    with pytest.warns(UserWarning, match=r"other settings \(lr"):
        other = lora.train_lora(*tiny(), EXAMPLES, LoraSettings(**{**settings.to_dict(), "lr": 1e-3}),
                                tmp_path / "run", progress=False)
    assert other.resumed_from == 0 and other.steps == 4 and other.losses != resumed.losses
    aside = tmp_path / "retired" / "run"  # rundir.retire's one place, as for checkpoints
    assert adapter_weights(aside).keys() == a.keys() and not list(tmp_path.rglob("*.replaced"))
    torch.testing.assert_close(adapter_weights(aside)[next(iter(a))], a[next(iter(a))])


def test_an_adapter_is_reused_only_on_the_weights_it_was_trained_on(tmp_path):
    settings = LoraSettings(max_steps=2, dropout=0.0, **{**QUICK, "save_every": 2})
    out = tmp_path / "adapters" / "block_20" / "a"  # a run directory's layout: rundir.adapter_dir
    first = lora.train_lora(*tiny(), EXAMPLES, settings, out, progress=False)
    again = lora.train_lora(*tiny(), EXAMPLES, settings, out, progress=False)
    assert again.losses == first.losses and not (tmp_path / "retired").exists()  # same base: reused
    model, tok = tiny()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.5)  # "re-pruned": the same shapes, other weights
    with pytest.warns(UserWarning, match=r"adapters/block_20/a moved to retired/adapters/block_20/a: it held a "
                                         r"LoRA run made from another base model"):
        retrained = lora.train_lora(model, tok, EXAMPLES, settings, out, progress=False)
    assert retrained.losses != first.losses
    assert (tmp_path / "retired" / "adapters" / "block_20" / "a" / lora.METRICS_FILE).exists()
    assert not list(tmp_path.rglob("*.replaced"))


def test_validation_chooses_the_adapter_with_the_lowest_validation_loss(tmp_path):
    settings = LoraSettings(max_steps=6, dropout=0.0, select="validation", **{**QUICK, "save_every": 2})
    result = lora.train_lora(*tiny(), EXAMPLES[:6], settings, tmp_path / "v", validation=EXAMPLES[6:],
                             progress=False)
    assert [s for s, _ in result.validation] == [2, 4, 6]
    best = min(result.validation, key=lambda x: x[1])
    assert result.selected_step == best[0]
    _, tok = tiny()
    val = [recovery_data.encode(tok, e) for e in EXAMPLES[6:]]
    assert lora.validation_loss(result.model, val, tok.pad_token_id) == pytest.approx(best[1], rel=1e-5)
    with pytest.raises(ValueError, match="needs validation examples"):
        lora.train_lora(*tiny(), EXAMPLES, settings, tmp_path / "w", progress=False)


def test_token_budget_sets_the_number_of_steps():
    _, tok = tiny()
    encoded = [recovery_data.encode(tok, e) for e in EXAMPLES]
    per_step = sum(len(e) for e in encoded[:4])  # about: every step is 4 of these similar examples
    steps = lora.plan_steps(encoded, LoraSettings(batch_size=4, max_steps=1000, max_tokens=10 * per_step))
    assert 9 <= steps <= 11
    assert lora.plan_steps(encoded, LoraSettings(batch_size=4, max_steps=3, max_tokens=10 * per_step)) == 3


def test_schedule_warms_up_then_decays_with_every_step_positive():
    lrs = [lora.lr_at(s, total=20, warmup=4, peak=1e-4) for s in range(1, 21)]
    assert lrs[:5] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4, 1e-4])
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0


# -------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("bad", [
    {"rank": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": ()}, {"lr": -1e-4}, {"lr": math.nan},
    {"warmup_ratio": 1.0}, {"batch_size": 0}, {"micro_batch_size": 9}, {"max_steps": 0}, {"max_tokens": 0},
    {"max_seq_len": 1}, {"precision": "fp8"}, {"select": "best_eval"}, {"save_every": 0}, {"seed": -1},
])
def test_bad_settings_raise_a_clear_value_error(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        LoraSettings(**bad)


def test_unknown_setting_and_missing_module_are_named():
    with pytest.raises(ValueError, match="lora_r"):
        LoraSettings.from_dict({"lora_r": 8})
    model, _ = tiny()
    with pytest.raises(ValueError, match="c_attn"):
        adapters.add_lora(model, LoraSettings(target_modules=("q_proj", "c_attn")))
    adapters.add_lora(model, LoraSettings())  # adds LoRA layers to `model` in place
    with pytest.raises(ValueError, match="already carries LoRA"):
        adapters.add_lora(model, LoraSettings())


def test_settings_round_trip_through_json():
    s = LoraSettings(rank=4, target_modules=["q_proj", "v_proj"], max_tokens=1000)
    assert LoraSettings.from_dict(s.to_dict()) == s and s.target_modules == ("q_proj", "v_proj")


# --------------------------------------------------------------------------------------- figures
def test_figures_draw_curves_and_accuracy_against_n(tmp_path):
    pd = pytest.importorskip("pandas")
    from tailored.figures import save_figure
    from tailored.figures.lora import plot_accuracy_vs_n, plot_loss_curves

    fig = plot_loss_curves({"generic": [(1, 3.0), (2, 2.5), (3, 2.2)],
                            "tailored boolq": [(1, 2.0), (2, 1.0), (3, 0.8)]}, smooth=2)
    assert len(fig.axes[0].lines) == 2 and fig.axes[0].lines[0].get_linestyle() == "--"
    assert fig.axes[0].get_xlabel() == "optimizer step"  # bare (step, loss) lists: no tokens to count
    assert save_figure(fig, tmp_path, "loss").stat().st_size > 0
    from tailored.lora import TrainResult

    def run(steps, tokens):  # the same token budget in a different number of steps
        return TrainResult(adapter_dir=tmp_path, steps=steps, tokens=tokens, train_s=1.0, wall_s=1.0,
                           tokens_per_s=1.0, losses=tuple((s, 2.0) for s in range(1, steps + 1)),
                           validation=((steps // 2, 2.2), (steps, 1.9)))
    fig = plot_loss_curves({"generic": run(40, 8000), "tailored": run(10, 8000)})
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("trained tokens")
    ends = [line.get_xdata()[-1] for line in ax.lines if "validation" in line.get_label()]
    assert ends == [8.0, 8.0]  # both end at the budget, in thousands of tokens
    df = pd.DataFrame([
        {"task": t, "method": m, "n": n, "accuracy": a, "ci_low": a - 0.05, "ci_high": a + 0.05, "chance": 0.5}
        for t in ("boolq", "piqa") for m, n, a in
        [("generic", 50, 0.55), ("generic", 500, 0.57), ("tailored", 50, 0.58), ("tailored", 500, 0.63),
         ("pruned", 0, 0.52)]])
    fig = plot_accuracy_vs_n(df)
    assert [ax.get_title() for ax in fig.axes] == ["boolq", "piqa"]
    assert save_figure(fig, tmp_path, "acc").stat().st_size > 0


def test_recomputed_activations_train_the_same_adapter_and_may_be_switched_on_resume(tmp_path):
    # dropout on: the recomputed forward must draw the same masks (recomputation keeps the random state)
    plain = LoraSettings(max_steps=4, dropout=0.1, **{**QUICK, "save_every": 2})
    ckpt = LoraSettings(**{**plain.to_dict(), "recompute_activations": True})
    a = lora.train_lora(*tiny(), EXAMPLES, plain, tmp_path / "plain", progress=False)
    b = lora.train_lora(*tiny(), EXAMPLES, ckpt, tmp_path / "ckpt", progress=False)
    assert [v for _, v in a.losses] == pytest.approx([v for _, v in b.losses], rel=1e-5)
    half = lora.train_lora(*tiny(), EXAMPLES, plain, tmp_path / "switched", progress=False, stop_after=2)
    assert half.steps == 2
    resumed = lora.train_lora(*tiny(), EXAMPLES, ckpt, tmp_path / "switched", progress=False)  # no "other settings"
    assert resumed.resumed_from == 2 and resumed.steps == 4


# ---------------------------------------------------------------------------------- distillation
def _pruned_student_and_teacher():
    """A tiny teacher with confident outputs and a copy of it with half of two layers' MLP channels removed."""
    import copy

    from tailored.graph import trace
    from tailored.prune import apply, make_plan

    teacher, tok = models.build_tiny("tiny", seed=0, initializer_range=0.2)
    teacher.eval()
    student = copy.deepcopy(teacher)
    graph = trace(student)
    apply(make_plan(graph, {f"layers.{i}.mlp": range(0, 128, 2) for i in (1, 2)}), student, graph)
    return student, teacher, tok


def _mean_kl(student, teacher, tok, tokens: str) -> float:
    batch = recovery_data.collate([recovery_data.encode(tok, e) for e in EXAMPLES], tok.pad_token_id)
    with torch.no_grad():
        kl, n = lora.distillation_loss(student, teacher, batch, tokens=tokens)
    return float(kl) / n


def test_distillation_loss_is_zero_against_an_identical_teacher_and_counts_its_positions():
    import copy

    model, tok = tiny()
    encoded = [recovery_data.encode(tok, e) for e in EXAMPLES]
    batch = recovery_data.collate(encoded, tok.pad_token_id)
    for tokens, expected in (("answer", sum(sum(recovery_data.loss_mask(e)) for e in encoded)),
                             ("all", sum(len(e) - 1 for e in encoded))):
        kl, n = lora.distillation_loss(model, copy.deepcopy(model), batch, temperature=2.0, tokens=tokens)
        assert n == expected and abs(float(kl)) < 1e-4


def test_distillation_pulls_the_pruned_student_towards_its_dense_teacher(tmp_path):
    student, teacher, tok = _pruned_student_and_teacher()
    before = _mean_kl(student, teacher, tok, "all")
    settings = LoraSettings(max_steps=12, dropout=0.0, distill=1.0, distill_tokens="all", **QUICK)
    result = lora.train_lora(student, tok, EXAMPLES, settings, tmp_path / "d", progress=False, teacher=teacher)
    after = _mean_kl(result.model, teacher, tok, "all")
    assert after < 0.5 * before, (before, after)
    assert lora.read_train_metrics(tmp_path / "d").settings.distill == 1.0


def test_distillation_needs_a_teacher_and_sane_settings(tmp_path):
    model, tok = tiny()
    with pytest.raises(ValueError, match="needs a teacher"):
        lora.train_lora(model, tok, EXAMPLES, LoraSettings(distill=0.5, **QUICK), tmp_path / "x", progress=False)
    for bad in ({"distill": 1.5}, {"temperature": 0.0}, {"distill_tokens": "prompt"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoraSettings(**bad)


def test_a_run_saved_before_the_distillation_settings_existed_still_continues():
    now = LoraSettings(max_steps=5)
    saved = {"settings": {k: v for k, v in now.to_dict().items() if k not in ("distill", "temperature",
                                                                               "distill_tokens")},
             "data_fingerprint": "f"}
    assert lora._changed(saved, now, "f", "base") is None  # the same run: the missing keys had their defaults
    assert "distill" in lora._changed(saved, LoraSettings(max_steps=5, distill=0.5), "f", "base")


def test_flattened_at_finds_where_a_validation_curve_stopped_improving():
    from tailored.lora import flattened_at

    assert flattened_at([]) is None
    # 2.0 -> 1.5 -> 1.2 -> 1.195 -> 1.19: within 1% of the rest from step 30 on
    assert flattened_at([(10, 2.0), (20, 1.5), (30, 1.2), (40, 1.195), (50, 1.19)]) == 30
    # still falling by more than 1% at the end: the last step, i.e. not flattened within the budget
    assert flattened_at([(10, 2.0), (20, 1.8), (30, 1.6)]) == 30
    # a late dip counts: step 20 is beaten by more than 1% at step 40
    assert flattened_at([(10, 2.0), (20, 1.5), (30, 1.52), (40, 1.4)]) == 40


def test_measure_throughput_leaves_the_model_as_it_found_it():
    """A throughput probe before evaluation must not leave adapters, recomputation or dropout behind."""
    model, _ = tiny()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = lora.measure_throughput(model, LoraSettings(recompute_activations=True), batch_size=2, seq_len=16,
                                  steps=1, warmup=0)
    assert out["tokens_per_s"] > 0 and out["batch_size"] == 2
    assert not model.training and not recomputes_activations(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_measure_throughput_keeps_the_recomputation_the_caller_switched_on():
    model, _ = tiny()
    set_recompute_activations(model, True)
    lora.measure_throughput(model, LoraSettings(recompute_activations=True), batch_size=2, seq_len=16, steps=1, warmup=0)
    assert recomputes_activations(model)
    lora.measure_throughput(model, LoraSettings(recompute_activations=False), batch_size=2, seq_len=16, steps=1,
                            warmup=0)
    assert recomputes_activations(model)
