"""digits on a frozen backbone: random features that every process builds from the same seed (a
stand-in for pretrained weights each site loads locally) under a small trained head. The frozen
part is six times the trained one, so updates that carried it would show. It reports the run
configuration its site received, as tests.config_task does."""

import torch
from torch import nn

from tests.config_task import ConfigDigits

FEATURES = 4096


class FrozenBackboneDigits(ConfigDigits):
    backbone_seed = 0

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.backbone_seed)
        backbone = nn.Linear(64, FEATURES)
        backbone.requires_grad_(False)
        torch.manual_seed(0)
        return nn.Sequential(backbone, nn.ReLU(), nn.Linear(FEATURES, 10))


class OtherBackboneDigits(FrozenBackboneDigits):
    """The same task built with other frozen weights, as a site with another weights file would."""

    backbone_seed = 1
