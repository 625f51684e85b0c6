"""Which tensors travel (``Task.trained_tensors``), the frozen part's digest, and the task errors
that name what is wrong. The federation of a frozen-backbone task is in tests/test_devices.py."""

import pytest
import torch
from torch import nn

from shared.model_state import TaskMismatch, checked_names, default_trained_tensors, frozen_digest


def backbone_and_head(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16))
    backbone.requires_grad_(False)
    torch.manual_seed(0)
    return nn.Sequential(backbone, nn.ReLU(), nn.Linear(16, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4, affine=False))


def test_parameters_that_train_and_the_buffers_of_modules_that_are_not_frozen_travel():
    names = default_trained_tensors(backbone_and_head())
    assert names == ["2.weight", "2.bias", "3.weight", "3.bias", "3.running_mean", "3.running_var",
                     "4.running_mean", "4.running_var"], "a frozen BatchNorm's statistics are the backbone's"
    assert "3.num_batches_tracked" not in names, "integer buffers cannot be averaged"


def test_tied_weights_travel_once_and_a_trained_alias_is_not_frozen():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

    model = Tied()
    names = checked_names(model, default_trained_tensors(model))
    assert names == ("embed.weight",)
    before = frozen_digest(model, names)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    assert frozen_digest(model, names) == before, "training the shared tensor is not a change of the frozen part"


def test_the_frozen_digest_sees_every_frozen_value_and_nothing_that_trains():
    a, b = backbone_and_head(), backbone_and_head()
    names = checked_names(a, default_trained_tensors(a))
    assert frozen_digest(a, names) == frozen_digest(b, names)
    with torch.no_grad():
        b[2].weight.add_(1.0)
    assert frozen_digest(a, names) == frozen_digest(b, names)
    with torch.no_grad():
        b[0][0].weight[3, 5] += 1e-6
    assert frozen_digest(a, names) != frozen_digest(b, names)
    assert frozen_digest(backbone_and_head(seed=1), names) != frozen_digest(a, names)
    half = backbone_and_head().to(torch.bfloat16)
    assert frozen_digest(half, names) != frozen_digest(a, names), "the dtype is part of what must agree"


def test_a_task_that_names_tensors_wrongly_or_trains_nothing_is_told_what_to_fix():
    model = backbone_and_head()
    assert checked_names(model, {"4.running_var", "2.bias"}) == ("2.bias", "4.running_var"), "state_dict order"
    with pytest.raises(TaskMismatch, match=r"names \['head.weight'\], which the model's state_dict does not hold"):
        checked_names(model, ["head.weight"])
    with pytest.raises(TaskMismatch, match="not floating-point"):
        checked_names(model, ["3.num_batches_tracked"])
    model.requires_grad_(False)
    with pytest.raises(TaskMismatch, match="nothing to train.*peft"):
        checked_names(model, [name for name in default_trained_tensors(model) if "running" not in name])
