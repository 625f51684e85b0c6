"""digits as a coordinator with no data of its own runs it: the task keeps its sites' evaluation
(``evaluate_site``) and has no central one, so the federation is scored at the sites alone."""

from shared.digits_task import DigitsStraggler
from shared.task import Task


class DigitsWithoutCentralData(DigitsStraggler):
    evaluate = Task.evaluate  # the base class's: no central evaluation
