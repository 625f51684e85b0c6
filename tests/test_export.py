"""A model to take away: the run folder's safetensors files load into a fresh build_model() with
torch alone and score what the run reported; fedq export writes a run's kept versions."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedq.federation import run_federation, site_names
from shared.task import load_task

pytestmark = pytest.mark.broker

TASK = "shared.digits_task:DigitsStraggler"


def score(path):
    task = load_task(TASK)
    model = task.build_model()
    model.load_state_dict(load_file(str(path)))  # strict: every name of the task's own state_dict
    return task.evaluate(model)["accuracy"]


def test_the_final_and_best_models_load_with_torch_alone_and_score_as_the_run_did(broker_url, tmp_path):
    run_dir = tmp_path / "run"
    summary = run_federation(broker_url, run_dir, site_names(10),
                             coordinator={"strategy": "fedbuff", "stop_at_accuracy": 0.90, "max_seconds": 90})
    assert summary["best_accuracy"] >= 0.90
    assert score(run_dir / "model.safetensors") == pytest.approx(summary["final_accuracy"], abs=1e-6)
    assert score(run_dir / "model-best.safetensors") == pytest.approx(summary["best_accuracy"], abs=1e-6)

    out = tmp_path / "exported.safetensors"
    exported = subprocess.run([sys.executable, "-m", "fedq", "export", str(run_dir), "--out", str(out)],
                              capture_output=True, text=True, timeout=60)
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.strip() == f"version {summary['final_version']} -> {out}"
    final = load_file(str(run_dir / "model.safetensors"))
    assert all(torch.equal(tensor, final[name]) for name, tensor in load_file(str(out)).items())

    missing = subprocess.run([sys.executable, "-m", "fedq", "export", str(run_dir), "--version", "100000",
                              "--out", str(tmp_path / "nope.safetensors")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "version 100000 was not kept" in missing.stderr
    assert f"version {summary['final_version']} (the checkpoint)" in missing.stderr
    best_version = [e for e in map(json.loads, (run_dir / "events.jsonl").read_text().splitlines())
                    if e["event"] == "evaluation" and e.get("accuracy") == summary["best_accuracy"]][0]["version"]
    best = tmp_path / "best.safetensors"
    assert subprocess.run([sys.executable, "-m", "fedq", "export", str(run_dir), "--version", str(best_version),
                           "--out", str(best)], capture_output=True, text=True, timeout=60).returncode == 0
    assert score(best) == pytest.approx(summary["best_accuracy"], abs=1e-6)
