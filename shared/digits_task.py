"""digits-straggler: the built-in demo and benchmark task, exactly as BENCHMARKS.md defines it.

scikit-learn's handwritten digits, split across ten sites by a Dirichlet(0.5) label partition, a
small MLP, and per-site delays that stand in for slow hardware and links.

The coordinator scores on the test split (``evaluate``); each site scores on its own share of it
(``evaluate_site``), partitioned the same way as the training data, so that the sites' pooled score
of a version is the central one when every site answers.
"""

from __future__ import annotations

import re
import time
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from shared.task import EvalResult, SiteContext, Task, TrainResult

SITES = 10
ALPHA = 0.5
DELAYS = [0.1, 0.1, 0.15, 0.15, 0.2, 0.2, 0.3, 0.5, 1.0, 3.0]
EPOCHS, BATCH_SIZE, LR = 2, 16, 0.1


@lru_cache(maxsize=1)
def dataset() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_train, X_test, y_train, y_test), split as the benchmark specifies."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X = (data.data / 16.0).astype(np.float32)
    return tuple(train_test_split(X, data.target, test_size=0.2, stratify=data.target, random_state=0))


def site_indices() -> list[np.ndarray]:
    """Training-set indices per site from the Dirichlet label partition."""
    return partitions()[0]


def site_test_indices() -> list[np.ndarray]:
    """Test-set indices per site, each site's held-out data: each class split in the same shares
    as the training set's, so a site is scored on data like its own."""
    return partitions()[1]


@lru_cache(maxsize=None)
def partitions(sites: int = SITES, alpha: float = ALPHA) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Training and test indices per site, for ``sites`` sites and Dirichlet(``alpha``) shares."""
    _, _, y_train, y_test = dataset()
    train, shares = partition(y_train, np.random.RandomState(0), sites=sites, alpha=alpha)
    test, _ = partition(y_test, np.random.RandomState(1), shares, sites=sites)
    return train, test


def partition(labels: np.ndarray, rng: np.random.RandomState, shares: list[np.ndarray] | None = None,
              sites: int = SITES, alpha: float = ALPHA) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Indices of ``labels`` per site, each class split by its ``shares`` across sites (drawn from
    Dirichlet(``alpha``) when not given); returns the indices and the shares."""
    pieces: list[list[np.ndarray]] = [[] for _ in range(sites)]
    drawn = []
    for c in range(10):
        idx = np.where(labels == c)[0]
        rng.shuffle(idx)
        p = rng.dirichlet([alpha] * sites) if shares is None else shares[c]
        drawn.append(p)
        for i, piece in enumerate(np.split(idx, (np.cumsum(p) * len(idx)).astype(int)[:-1])):
            pieces[i].append(piece)
    return [np.concatenate(p) for p in pieces], drawn


def site_number(site: str, sites: int = SITES) -> int:
    """The index 0..sites-1 in a site name such as ``site-3``."""
    match = re.fullmatch(r"\D*(\d+)", site)
    if not match or not 0 <= int(match.group(1)) < sites:
        raise ValueError(f"this task has sites site-0 .. site-{sites - 1}; {site!r} is not one of them")
    return int(match.group(1))


class DigitsStraggler(Task):
    #: How many sites, how unevenly labels are split among them, and each one's delay in seconds:
    #: a task of other sites is a subclass that changes these.
    sites, alpha, delays = SITES, ALPHA, DELAYS

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def prepare_site(self, site: str) -> None:
        site_number(site, self.sites)
        partitions(self.sites, self.alpha)

    def train(self, model: nn.Module, site: SiteContext) -> TrainResult:
        number = site_number(site.site, self.sites)
        X_train, _, y_train, _ = dataset()
        idx = partitions(self.sites, self.alpha)[0][number]
        X, y = torch.from_numpy(X_train[idx]).to(site.device), torch.from_numpy(y_train[idx]).long().to(site.device)
        # The central team may tune these per run (FEDQ_RUN_CONFIG); the benchmark's values otherwise.
        epochs, lr = int(site.config.get("local_epochs", EPOCHS)), float(site.config.get("lr", LR))
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        total, steps = 0.0, 0
        for epoch in range(epochs):
            order = torch.randperm(len(idx), device=site.device)
            for start in range(0, len(idx), BATCH_SIZE):
                batch = order[start : start + BATCH_SIZE]
                optimizer.zero_grad()
                loss = loss_fn(model(X[batch]), y[batch])
                loss.backward()
                optimizer.step()
                total += loss.item()
                steps += 1
            site.progress((epoch + 1) / epochs)
        time.sleep(self.delays[number])
        return TrainResult(num_samples=len(idx), metrics={"train_loss": total / max(steps, 1)})

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        _, X_test, _, y_test = dataset()
        return score(model, X_test, y_test)

    def evaluate_site(self, model: nn.Module, site: SiteContext) -> EvalResult | None:
        _, X_test, _, y_test = dataset()
        idx = partitions(self.sites, self.alpha)[1][site_number(site.site, self.sites)]
        if not len(idx):
            return None
        return EvalResult(num_samples=len(idx), metrics=score(model, X_test[idx], y_test[idx]))


def score(model: nn.Module, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(X).to(device))
        target = torch.from_numpy(y).long().to(device)
        loss = nn.functional.cross_entropy(logits, target).item()
        accuracy = (logits.argmax(1) == target).float().mean().item()
    return {"accuracy": accuracy, "loss": loss}


class ThreeSiteDigits(DigitsStraggler):
    """The digits task shared by three sites, as the compose stack runs it: every label is split among
    the three, so together they hold the whole training set. Three sites of the ten-site split hold
    almost no zeros between them, and a federation of them stayed near 0.87."""

    sites, delays = 3, [0.1, 0.3, 1.0]
