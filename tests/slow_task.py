"""A task whose training outlasts several heartbeat intervals, for the connection-liveness test."""

import time

from shared.digits_task import DigitsStraggler

TRAIN_SECONDS = 8.0


class SlowDigits(DigitsStraggler):
    def train(self, model, site):
        time.sleep(TRAIN_SECONDS)
        return super().train(model, site)
