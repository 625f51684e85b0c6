"""docs/settings.md: every setting of every process, with its flag, variable and default.

    python -m fedq.settings_page > docs/settings.md

A test keeps the page and the code in step.
"""

from __future__ import annotations

import json

from coordinator.settings import CoordinatorSettings
from shared.settings import ENV_PREFIX, CommonSettings
from worker.settings import WorkerSettings


def settings_table() -> str:
    """docs/settings.md: every setting of every process, with its flag, variable and default."""
    lines = [
        "# Settings",
        "",
        "Every fedq process reads its settings from three places. Highest precedence first:",
        "",
        "1. command-line flags (`fedq coordinator --strategy fedasync`);",
        f"2. environment variables with the prefix `{ENV_PREFIX}` (`{ENV_PREFIX}STRATEGY=fedasync`);",
        "3. a `.env` file in the working directory, in the same `NAME=value` form as the environment;",
        "",
        "and then the defaults below. Lists and maps are JSON (`--any-site-users '[]'`). An empty value turns "
        f"an optional setting off (`{ENV_PREFIX}MAX_STALENESS=`). Every value is checked at start-up; a bad one stops "
        "the process with a message naming the variable and what it accepts. `fedq status` takes the settings "
        "every process has, except `task`, `log_level` and `torch_threads`.",
        "",
        "This page is generated from the settings classes (`shared/settings.py`, `coordinator/settings.py`, "
        "`worker/settings.py`) by `python -m fedq.settings_page > docs/settings.md`; a test keeps the two in step.",
        "",
        "| flag | environment | default | process | meaning |",
        "|---|---|---|---|---|",
    ]
    common = set(CommonSettings.model_fields)
    for cls, process in ((CommonSettings, "all"), (CoordinatorSettings, "coordinator"), (WorkerSettings, "worker")):
        for name, field in cls.model_fields.items():
            if cls is not CommonSettings and name in common:
                continue
            default = "required" if field.is_required() else _shown(field.default)
            lines.append(f"| `--{name.replace('_', '-')}` | `{ENV_PREFIX}{name.upper()}` | {default} | {process} | "
                         f"{field.description} |")
    return "\n".join(lines) + "\n"


def _shown(default) -> str:
    if default is None:
        return "(off)"
    if isinstance(default, (list, dict)):
        return f"`{json.dumps(default)}`"
    return f"`{default}`"


if __name__ == "__main__":
    print(settings_table(), end="")
