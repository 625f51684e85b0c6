"""The benchmark suite's tasks (benchmarks/suite_tasks.py), trained for real without a broker."""

import numpy as np
import pytest

from benchmarks.suite_tasks import LOGNORMAL_DELAYS, CharTransformer, ManyDigits, text
from shared.digits_task import dataset, partitions
from shared.task import SiteContext


def test_the_character_transformer_learns_the_help_texts_at_a_site_and_scores_centrally():
    task = CharTransformer()
    model = task.build_model()
    before = task.evaluate(model)
    assert before == task.evaluate(model), "the held-out windows are fixed"
    for _ in range(4):
        result = task.train(model, SiteContext(site="site-3", version=0))
    after = task.evaluate(model)
    train, held_out = text()
    assert result.num_samples == (len(train) - 33) // 8 + 1 and len(held_out) > 40_000
    assert after["loss"] < before["loss"] - 0.5 and after["accuracy"] > before["accuracy"] + 0.1
    with pytest.raises(ValueError, match="site-0 .. site-7"):
        task.prepare_site("site-8")


def test_many_sites_split_the_digits_unevenly_and_every_site_has_some():
    task = ManyDigits()
    train, test = partitions(task.sites, task.alpha)
    _, _, y_train, _ = dataset()
    classes = [len(np.unique(y_train[idx])) for idx in train]
    assert len(train) == len(test) == 24 and min(len(idx) for idx in train) > 0
    assert sum(np.concatenate(train).shape) == len(y_train), "every training sample at exactly one site"
    assert np.median(classes) <= 4 and sum(c <= 3 for c in classes) >= 8, "most sites hold a few digits only"
    task.prepare_site("site-23")
    with pytest.raises(ValueError, match="site-0 .. site-23"):
        task.prepare_site("site-24")


def test_lognormal_delays_have_a_heavy_tail():
    assert len(LOGNORMAL_DELAYS) == 10 and min(LOGNORMAL_DELAYS) < 0.1 and max(LOGNORMAL_DELAYS) > 2.5
    assert max(LOGNORMAL_DELAYS) / np.median(LOGNORMAL_DELAYS) > 5
