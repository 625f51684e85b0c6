"""A hostile site: it trains honestly, then sends its change scaled a hundred times."""

import torch

from shared.digits_task import DigitsStraggler

SCALE = 100.0


class ScaledDigits(DigitsStraggler):
    def train(self, model, site):
        start = [p.detach().clone() for p in model.parameters()]
        result = super().train(model, site)
        with torch.no_grad():
            for param, before in zip(model.parameters(), start):
                param.copy_(before + SCALE * (param - before))
        return result


class NonFiniteDigits(DigitsStraggler):
    """A broken site: every update it sends holds a NaN, so the coordinator refuses them all."""

    def train(self, model, site):
        result = super().train(model, site)
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        return result


class BatchNormDigits(DigitsStraggler):
    """Digits with a BatchNorm layer, whose running statistics are floating tensors that do not train."""

    def build_model(self):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.BatchNorm1d(128), torch.nn.ReLU(),
                                   torch.nn.Linear(128, 10))
