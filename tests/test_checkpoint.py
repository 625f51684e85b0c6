"""Checkpoint files: the model is written once per version, and a crash never leaves a checkpoint without its model."""

import pytest
import torch

from coordinator.checkpoint import Checkpoint, CheckpointFiles, read_checkpoint
from shared.protocol import ProtocolError
from shared.tensor_files import save_tensors


def checkpoint(version, params, buffer=None):
    return Checkpoint(run_id="run-a", version=version, params=params,
                      strategy_tensors={"buffer": buffer} if buffer else {}, strategy_values={"samples": 1},
                      ledger_rows=[["u1", "site-1", 0, version, None]], run={"sites_seen": ["site-1"]})


def test_between_versions_only_the_state_is_rewritten_and_the_model_file_follows_the_version(tmp_path):
    files = CheckpointFiles(tmp_path)
    params = {"w": torch.arange(4.0)}
    files.write(checkpoint(3, params))
    model = tmp_path / "model-v3.fedq"
    written = model.stat().st_ino
    # Another checkpoint of version 3 (FedBuff settling its window): a new buffer, the same model.
    files.write(checkpoint(3, params, buffer={"w": torch.ones(4)}))
    assert model.stat().st_ino == written, "an unchanged model must not be written again"
    back = read_checkpoint(tmp_path / "checkpoint.fedq")
    assert back.version == 3 and torch.equal(back.params["w"], params["w"])
    assert torch.equal(back.strategy_tensors["buffer"]["w"], torch.ones(4))

    params["w"] += 10
    files.write(checkpoint(4, params))
    assert sorted(p.name for p in tmp_path.glob("model-v*.fedq")) == ["model-v4.fedq"]
    back = read_checkpoint(tmp_path / "checkpoint.fedq")
    assert back.version == 4 and torch.equal(back.params["w"], params["w"]) and back.strategy_tensors == {}
    assert read_checkpoint(tmp_path / "checkpoint.fedq", model=False).params == {}


def test_a_model_file_left_by_a_crash_before_its_checkpoint_is_not_trusted(tmp_path):
    CheckpointFiles(tmp_path).write(checkpoint(4, {"w": torch.zeros(2)}))
    # The crash: version 5's model reached the disk, its checkpoint did not.
    save_tensors(tmp_path / "model-v5.fedq", {"w": torch.full((2,), 99.0)}, {"run_id": "run-a", "version": 5})
    resumed = CheckpointFiles(tmp_path)
    assert resumed.read().version == 4
    # The resumed run makes a different version 5; its model must replace the crashed one's.
    resumed.write(checkpoint(5, {"w": torch.ones(2)}))
    assert torch.equal(read_checkpoint(tmp_path / "checkpoint.fedq").params["w"], torch.ones(2))


def test_a_checkpoint_whose_model_file_is_of_another_version_is_refused(tmp_path):
    CheckpointFiles(tmp_path).write(checkpoint(4, {"w": torch.zeros(2)}))
    save_tensors(tmp_path / "model-v4.fedq", {"w": torch.zeros(2)}, {"run_id": "run-a", "version": 7})
    with pytest.raises(ProtocolError, match="holds version 7 of run run-a"):
        read_checkpoint(tmp_path / "checkpoint.fedq")
