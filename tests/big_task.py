"""digits with a 65,536-wide hidden layer: a 20 MB update travels in five chunks, slow enough to cut."""

import torch
from torch import nn

from shared.digits_task import DigitsStraggler


class WideDigits(DigitsStraggler):
    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 65536), nn.ReLU(), nn.Linear(65536, 10))
