"""The run report: plots of a run's log, and a small HTML page that shows them together.

Reads ``events.jsonl`` from a run folder (the coordinator's, or any copy of it) and writes
``accuracy.png`` (accuracy and loss against time and against version), ``staleness.png`` (how old
the applied updates' bases were), ``sites.png`` (updates applied, dropped and bytes sent per
site) and, where the sites scored versions, ``site-scores.png`` (each site's accuracy on its own
held-out data and the pooled one, by version), plus ``report.html``.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coordinator.runlog import EVENTS_FILE, read_events  # noqa: E402


def latest_run(run_dir: Path) -> list[dict]:
    """The events of the latest run in ``run_dir``'s log; a clear error where there is none to report."""
    path = run_dir / EVENTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; point fedq report at a coordinator's run folder (FEDQ_RUN_DIR)")
    events = read_events(run_dir)
    # A folder reused for a new run holds several; the report is of the latest (resumes continue it).
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    events = events[starts[-1]:] if starts else events
    if not any(e["event"] == "evaluation" for e in events):
        raise ValueError(f"{path} holds no evaluations yet; the run has not published its first version")
    return events


def write_report(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the report's PNGs and HTML page; returns their paths."""
    out_dir = out_dir or run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    events = latest_run(run_dir)
    evaluations = [e for e in events if e["event"] == "evaluation"]
    updates = [e for e in events if e["event"] == "update"]
    dropped = [e for e in events if e["event"] == "dropped"]
    written = [_accuracy(evaluations, out_dir / "accuracy.png"), _staleness(updates, out_dir / "staleness.png"),
               _sites(updates, dropped, out_dir / "sites.png")]
    scores = [e for e in events if e["event"] == "site_evaluation" and e.get("set_aside") is None]
    if scores:
        rounds = [e for e in events if e["event"] == "federated_evaluation"]
        written.append(_site_scores(scores, rounds, out_dir / "site-scores.png"))
    written.append(_page(run_dir, evaluations, updates, dropped, out_dir / "report.html"))
    return written


def _accuracy(evaluations: list[dict], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, x, label in ((axes[0], "t", "seconds since version 0"), (axes[1], "version", "version")):
        xs = [e[x] for e in evaluations]
        ax.plot(xs, [e.get("accuracy") for e in evaluations], color="C0", label="accuracy", drawstyle="steps-post")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy", color="C0")
        ax.set_ylim(0, 1)
        loss_axis = ax.twinx()
        loss_axis.plot(xs, [e.get("loss") for e in evaluations], color="C3", alpha=0.7, label="loss")
        loss_axis.set_ylabel("loss", color="C3")
    axes[0].set_title("accuracy and loss over time")
    axes[1].set_title("accuracy and loss by version")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _site_scores(scores: list[dict], rounds: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for site in sorted({e["site"] for e in scores}):
        mine = [e for e in scores if e["site"] == site and "accuracy" in e["metrics"]]
        ax.plot([e["version"] for e in mine], [e["metrics"]["accuracy"] for e in mine], linewidth=0.8, alpha=0.5,
                marker=".", label=site if len(scores) <= 400 else None)
    pooled = [e for e in rounds if "accuracy" in e]
    ax.plot([e["version"] for e in pooled], [e["accuracy"] for e in pooled], color="black", linewidth=2.2,
            marker="o", label="pooled (by samples)")
    ax.set_xlabel("version scored")
    ax.set_ylabel("accuracy on the site's held-out data")
    ax.set_ylim(0, 1)
    ax.set_title("federated evaluation: each site and the pooled score")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _staleness(updates: list[dict], path: Path) -> Path:
    counts = Counter(e["staleness"] for e in updates)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.bar(list(counts), list(counts.values()), color="C1")
    ax.set_xlabel("staleness (versions between an update's base and the model it joined)")
    ax.set_ylabel("updates applied")
    ax.set_title(f"staleness of {len(updates)} applied updates")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _sites(updates: list[dict], dropped: list[dict], path: Path) -> Path:
    sites = sorted({e["site"] for e in updates + dropped})
    applied, lost = Counter(e["site"] for e in updates), Counter(e["site"] for e in dropped)
    sent = Counter()
    for e in updates:
        sent[e["site"]] += e.get("bytes", 0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    left.bar(sites, [applied[s] for s in sites], color="C2", label="applied")
    left.bar(sites, [lost[s] for s in sites], bottom=[applied[s] for s in sites], color="C7", label="dropped")
    left.set_ylabel("updates")
    left.set_title("updates per site")
    left.legend()
    right.bar(sites, [sent[s] / 1e6 for s in sites], color="C4")
    right.set_ylabel("MB received")
    right.set_title("bytes of applied updates per site")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _page(run_dir: Path, evaluations: list[dict], updates: list[dict], dropped: list[dict], path: Path) -> Path:
    last = evaluations[-1]
    facts = {
        "run": str(run_dir),
        "versions": last["version"],
        "last accuracy": f"{last.get('accuracy', float('nan')):.4f}",
        "best accuracy": f"{max(e.get('accuracy', 0) for e in evaluations):.4f}",
        "updates applied": len(updates),
        "updates dropped": len(dropped),
        "sites": len({e["site"] for e in updates}),
        "elapsed": f"{last['t']:.1f} s",
    }
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    images = "".join(f'<p><img src="{name}" alt="{name}" style="max-width:100%"></p>'
                     for name in ("accuracy.png", "staleness.png", "sites.png", "site-scores.png")
                     if (path.parent / name).exists())
    path.write_text(f"<!doctype html><meta charset=utf-8><title>fedq run report</title>"
                    f"<h1>fedq run report</h1><table>{rows}</table>{images}\n")
    return path
