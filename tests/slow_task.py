"""A task whose training outlasts several heartbeat intervals, for the connection-liveness test."""

import time

from shared.digits_task import DigitsStraggler

TRAIN_SECONDS = 8.0


class SlowDigits(DigitsStraggler):
    def train(self, model, site):
        time.sleep(TRAIN_SECONDS)
        return super().train(model, site)


class SlowDigitsWithProgress(DigitsStraggler):
    """Reports progress through a long task, as a real training loop would."""

    def train(self, model, site):
        for step in range(1, 5):
            time.sleep(TRAIN_SECONDS / 4)
            site.progress(step / 5)
        return super().train(model, site)


EVALUATE_SECONDS = 6.0


class SlowlyScoredDigits(DigitsStraggler):
    """An evaluation that outlasts three heartbeats of 2 s, as scoring a large test set does."""

    def evaluate(self, model):
        time.sleep(EVALUATE_SECONDS)
        return super().evaluate(model)


class PacedDigits(DigitsStraggler):
    """A second per task: a run paced by the clock rather than by how fast this machine trains, so a
    test can act in its middle."""

    def train(self, model, site):
        time.sleep(1.0)
        return super().train(model, site)
