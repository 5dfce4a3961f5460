"""No head holds a trainable parameter its training step never uses: under DDP with
find_unused_parameters=False (Accelerate's default) such a parameter stops the second step with
"Expected to have finished reduction in the prior iteration"."""

from __future__ import annotations

import pytest
import torch

from hf_mim import MODEL_FAMILIES


def unused_trainable(model, loss) -> list[str]:
    loss.backward()
    return [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]


CASES = [(model_type, {}) for model_type in sorted(MODEL_FAMILIES)] + [("revcolv2", {"use_reversible": False})]


@pytest.mark.parametrize("model_type, overrides", CASES)
def test_every_trainable_classifier_parameter_gets_a_gradient(model_type, overrides):
    """(RevColV2's reversible engine hands zero gradients to every level it runs; plain columns give None.)"""
    family = MODEL_FAMILIES[model_type]
    torch.manual_seed(0)
    config = family.config_class.from_preset("tiny", num_labels=3, **overrides)
    model = family.image_classification_class(config).train()
    loss = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2])).loss
    assert unused_trainable(model, loss) == []
