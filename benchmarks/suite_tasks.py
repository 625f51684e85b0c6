"""The benchmark suite's tasks (benchmarks/suite.py): federations that differ the way real ones do.

Every task trains on data that ships with Python or with a package fedq depends on; nothing is
downloaded. Workers load them as ``benchmarks.suite_tasks:NAME`` (the suite puts the checkout on
their PYTHONPATH).

- ``CharTransformer``: homogeneous. Eight equally fast sites train a small causal transformer
  with AdamW to predict the next character of Python's own help texts (``pydoc_data.topics``,
  465 kB of English prose), each site on its own contiguous eighth.
- ``LognormalDigits``: heterogeneous compute. The digits-straggler data and model, with each of
  the ten sites' delays drawn from a lognormal distribution (seed 0: 0.06 to 2.94 s); the suite
  also takes sites offline and brings them back on a schedule.
- ``ManyDigits``: many sites. 24 sites, labels split by Dirichlet(0.1): half the sites hold 3
  digits or fewer (one holds all ten), 9 or more samples each.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from shared.digits_task import DigitsStraggler, site_number
from shared.task import SiteContext, Task, TrainResult

# Lognormal(log 0.2, 1.2) with seed 0, rounded: a heavy tail, as site hardware and links have.
LOGNORMAL_DELAYS = [round(float(d), 2) for d in np.random.RandomState(0).lognormal(np.log(0.2), 1.2, size=10)]


class LognormalDigits(DigitsStraggler):
    delays = LOGNORMAL_DELAYS


class ManyDigits(DigitsStraggler):
    sites, alpha, delays = 24, 0.1, [0.0] * 24


class SoakDigits(DigitsStraggler):
    """benchmarks/soak.py's 20 sites, each pausing a second per task: 20 workers on two cores still
    leave the brokers and the coordinator room to run."""

    sites, delays = 20, [1.0] * 20


# The character model: printable ASCII and the newline, everything else a space.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
CONTEXT, WIDTH, HEADS, LAYERS = 32, 64, 4, 2
TEXT_SITES = 8
STEPS, BATCH, LR = 30, 32, 3e-3
EVAL_WINDOWS = 256


@lru_cache(maxsize=1)
def text() -> tuple[np.ndarray, np.ndarray]:
    """(training characters, held-out characters) as indices into VOCAB: the last tenth of the help
    texts, in their sorted order, is held out."""
    from pydoc_data.topics import topics

    raw = "\n".join(topics[name] for name in sorted(topics))
    lookup = np.full(0x110000, VOCAB.index(" "), dtype=np.int64)
    lookup[[ord(c) for c in VOCAB]] = np.arange(len(VOCAB))
    codes = lookup[np.frombuffer(raw.encode("utf-32-le"), dtype=np.uint32)]
    cut = len(codes) * 9 // 10
    return codes[:cut], codes[cut:]


def windows(codes: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-character targets of the windows beginning at ``starts``."""
    index = starts[:, None] + np.arange(CONTEXT + 1)[None, :]
    chunk = torch.from_numpy(codes[index])
    return chunk[:, :-1], chunk[:, 1:]


class CausalTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), WIDTH)
        self.position = nn.Parameter(torch.zeros(CONTEXT, WIDTH))
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, len(VOCAB))
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.embed(codes) + self.position[: codes.shape[1]]
        return self.head(self.layers(x, mask=self.mask[: codes.shape[1], : codes.shape[1]], is_causal=True))


class CharTransformer(Task):
    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return CausalTransformer()

    def prepare_site(self, site: str) -> None:
        site_number(site, TEXT_SITES)
        text()

    def train(self, model: nn.Module, site: SiteContext) -> TrainResult:
        train, _ = text()
        shard = np.array_split(np.arange(len(train) - CONTEXT - 1), TEXT_SITES)[site_number(site.site, TEXT_SITES)]
        optimizer = torch.optim.AdamW(model.parameters(), lr=float(site.config.get("lr", LR)), weight_decay=0.01)
        rng = np.random.default_rng()
        model.train()
        total = 0.0
        for step in range(STEPS):
            inputs, targets = windows(train, rng.choice(shard, BATCH))
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
            loss.backward()
            optimizer.step()
            total += loss.item()
            site.progress((step + 1) / STEPS)
        return TrainResult(num_samples=len(shard), metrics={"train_loss": total / STEPS})

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        _, held_out = text()
        starts = np.random.default_rng(0).choice(len(held_out) - CONTEXT - 1, EVAL_WINDOWS, replace=False)
        inputs, targets = windows(held_out, starts)
        model.eval()
        with torch.no_grad():
            logits = model(inputs)
        return {"accuracy": (logits.argmax(-1) == targets).float().mean().item(),
                "loss": nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()}
