"""digits that reports the run configuration its site received, in its update's metrics."""

from shared.digits_task import DigitsStraggler


class ConfigDigits(DigitsStraggler):
    def train(self, model, site):
        result = super().train(model, site)
        result.metrics.update({f"config_{name}": float(value) for name, value in site.config.items()
                               if isinstance(value, (int, float))})
        return result
