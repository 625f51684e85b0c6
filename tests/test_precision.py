"""A model of any floating dtype: updates merge into a float32 master, and sites send what training moved in float32."""

import torch

from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from shared.codecs import encode_tensors, get_codec
from shared.protocol import PROTOCOL_VERSION, UpdateHeader, encode_payload, new_id
from shared.settings import load_settings
from shared.task import load_task
from shared.model_state import trained_delta


def test_a_bfloat16_model_merges_small_updates_into_a_float32_master(tmp_path):
    """In bfloat16, 0.0004 added to a weight of about 0.1 rounds away: 20 such updates must still move it."""
    settings = load_settings(CoordinatorSettings, broker_url="amqp://127.0.0.1:1", run_dir=tmp_path,
                             strategy="fedasync", alpha=1.0, staleness="constant", task="tests.bfloat16_task:BFloat16Digits")
    coordinator = Coordinator(settings, load_task(settings.task))
    assert all(t.dtype == torch.float32 for t in coordinator.params.values())
    start = {name: t.clone() for name, t in coordinator.params.items()}
    for version in range(20):
        delta = {name: torch.full_like(t, 4e-4) for name, t in coordinator.params.items()}
        specs, parts = encode_tensors(delta, get_codec("fp32"))
        header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=coordinator.run_id, site="site-1",
                              base_version=version, num_samples=10, train_seconds=0.1, tensors=specs)
        assert coordinator.ingest.take(memoryview(bytearray(b"".join(encode_payload(header, parts)))), "fedq").outcome == "applied"
    for name, tensor in coordinator.params.items():
        assert torch.allclose(tensor - start[name], torch.full_like(tensor, 20 * 4e-4), atol=1e-6), name
    coordinator._score()  # the task evaluates its own bfloat16 model, loaded from the master
    weight = coordinator.model.state_dict()["0.weight"]
    assert weight.dtype == torch.bfloat16 and torch.equal(weight, coordinator.params["0.weight"].to(torch.bfloat16))
    assert coordinator.last_metrics["accuracy"] > 0


def test_a_site_with_a_bfloat16_model_sends_what_training_moved_in_float32():
    base = {"w": torch.tensor([0.1, 0.2, 0.3])}  # not representable in bfloat16
    model = {"w": base["w"].to(torch.bfloat16)}  # where training starts
    model["w"] += torch.tensor([0.0, 0.5, -0.25], dtype=torch.bfloat16)
    expected = model["w"].float() - base["w"].to(torch.bfloat16).float()
    delta = trained_delta(model, base)["w"]
    assert delta.dtype == torch.float32 and torch.equal(delta, expected)
    assert delta[0] == 0, "measured from where training started, not from the float32 base it was rounded from"
    fp32_base = {"w": torch.tensor([0.5, 0.25, 2.0])}
    fp32 = {"w": fp32_base["w"] + 1.0}
    assert torch.equal(trained_delta(fp32, fp32_base)["w"], torch.ones(3)) and torch.equal(fp32["w"], torch.ones(3)), \
        "a float32 model becomes its delta in place"
