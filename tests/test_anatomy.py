"""The model-anatomy helpers every stage stands on."""

from __future__ import annotations

import pytest

from tailored import models
from tailored.anatomy import decoder_layers, preserved, recomputes_activations, set_recompute_activations


def test_preserved_restores_modes_flags_and_recomputation_even_after_an_error(one_thread):
    model, _ = models.load("tiny")
    model.train()
    decoder_layers(model)[0].eval()  # a mixed state: restored module by module, not by one model.train()
    frozen = model.get_input_embeddings().weight
    frozen.requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inside"):
        with preserved(model):
            model.eval()
            model.requires_grad_(True)
            set_recompute_activations(model, True)
            raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags and not frozen.requires_grad
    assert not recomputes_activations(model)
    set_recompute_activations(model, True)
    with preserved(model):
        set_recompute_activations(model, False)
    assert recomputes_activations(model), "a recomputation the caller switched on stays on"
