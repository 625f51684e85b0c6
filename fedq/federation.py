"""A whole federation on one machine: the coordinator in this process, each site a worker process.

The demo, the benchmarks and the integration tests all run federations through this one function,
so what the tests check is what users run.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from shared.settings import load_settings
from shared.task import load_task

log = logging.getLogger("fedq.federation")


def site_names(count: int) -> list[str]:
    return [f"site-{i}" for i in range(count)]


def _start(command: str, log_path: Path, settings: dict[str, Any]) -> subprocess.Popen:
    env = {**os.environ, **{f"FEDQ_{k.upper()}": str(v) for k, v in settings.items() if v is not None}}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "fedq", command], env=env, stdout=out, stderr=subprocess.STDOUT)


def start_worker(broker_url: str, site: str, log_path: Path, **settings: Any) -> subprocess.Popen:
    """Start one site's worker process; its output goes to ``log_path``, its state beside it."""
    defaults = {"broker_url": broker_url, "site": site, "torch_threads": 1, "state_dir": log_path.parent}
    return _start("worker", log_path, {**defaults, **settings})


def start_coordinator(broker_url: str, run_dir: Path, **settings: Any) -> subprocess.Popen:
    """Start a coordinator process on ``run_dir`` (resuming its checkpoint if any); output in coordinator.log."""
    return _start("coordinator", run_dir / "coordinator.log", {"broker_url": broker_url, "run_dir": run_dir, **settings})


def run_federation(
    broker_url: str,
    run_dir: Path,
    sites: list[str],
    *,
    coordinator: dict[str, Any] | None = None,
    worker: dict[str, Any] | None = None,
    worker_broker_url: str | None = None,
    site_settings: dict[str, dict[str, Any]] | None = None,
    fresh: bool = False,
    offline: dict[str, list[tuple[float, float]]] | None = None,
) -> dict[str, Any]:
    """Run a coordinator and one worker per site until the coordinator stops; returns its summary.

    ``coordinator`` and ``worker`` are settings (as for the ``fedq`` flags) for each side, and
    ``site_settings`` adds settings for single sites; workers may reach the broker by another URL. Worker logs and state land in ``run_dir/sites/``. The coordinator waits for every site's hello before version 0, so
    the clock starts when the federation is complete, as a benchmark wants. ``fresh`` removes an
    earlier run's folder at ``run_dir`` first, where a run of its own would otherwise resume that
    run's checkpoint (and a benchmark time its remainder). ``offline`` takes sites away and brings
    them back, as intermittent sites come and go: for each site, (from, to) spans in seconds of the
    run's clock during which its worker process is killed, to start again on its state at the end.

    SIGINT and SIGTERM stop the run in order (final model, checkpoint, workers told and waited for),
    then raise KeyboardInterrupt and SystemExit(128 + signal) here, so that the caller stops too.
    """
    worker = worker or {}
    if fresh and ((run_dir / "events.jsonl").exists() or (run_dir / "checkpoint.fedq").exists()):
        shutil.rmtree(run_dir)  # a run folder, and only one: never a folder of something else
    settings = load_settings(
        CoordinatorSettings,
        **{"broker_url": broker_url, "run_dir": run_dir, "wait_for_sites": len(sites), **(coordinator or {})},
    )
    def start(site: str) -> subprocess.Popen:
        return start_worker(worker_broker_url or broker_url, site, run_dir / "sites" / f"{site}.log",
                            **{**worker, **(site_settings or {}).get(site, {})})

    workers = {site: start(site) for site in sites}
    coordinator = Coordinator(settings, load_task(settings.task))
    churn = threading.Thread(target=_come_and_go, args=(coordinator, workers, start, offline or {}), daemon=True)
    churn.start()
    try:
        summary = coordinator.run()
        churn.join()  # it ends with the run; no worker starts again while the others are waited for
        _wait_for_exit(workers, timeout=30.0)
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    summary["worker_exit_codes"] = {site: p.returncode for site, p in workers.items()}
    # The coordinator ends its run on SIGINT and SIGTERM as on any stop; the caller must end too, or
    # a benchmark's loop would go on to its next run (Ctrl-C once ran the suite's next federation).
    if coordinator.stopped_by == signal.SIGINT:
        raise KeyboardInterrupt(summary["stop_reason"])
    if coordinator.stopped_by is not None:
        raise SystemExit(128 + coordinator.stopped_by)
    return summary


def _come_and_go(coordinator: Coordinator, workers: dict[str, subprocess.Popen],
                 start: Callable[[str], subprocess.Popen], offline: dict[str, list[tuple[float, float]]]) -> None:
    """Kill each site's worker at the start of its offline spans and start it again at their end,
    by the run's clock, until the run stops."""
    moves = sorted([(begin, "leave", site) for site, spans in offline.items() for begin, _ in spans]
                   + [(end, "return", site) for site, spans in offline.items() for _, end in spans])
    for at, move, site in moves:
        while not coordinator.runlog.clock_started or coordinator.runlog.elapsed < at:
            if coordinator.stop_reason is not None:
                return
            time.sleep(0.05)
        if move == "leave":
            workers[site].kill()
            workers[site].wait()
            log.info("site %s went offline at %.1f s", site, coordinator.runlog.elapsed)
        else:
            workers[site] = start(site)
            log.info("site %s came back at %.1f s", site, coordinator.runlog.elapsed)


def _wait_for_exit(workers: dict[str, subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for site, process in workers.items():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker %s did not exit after the final announcement; killing it", site)
