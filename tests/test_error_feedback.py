"""Error feedback and the residual's life on disk."""

import logging

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.codecs import Layout, get_codec
from shared.tensor_files import load_tensors, save_tensors
from worker.error_feedback import ErrorFeedback, compensate_and_encode, group_parts

LAYOUT = Layout((("w", (40, 30)), ("b", (30,))))


@settings(max_examples=25, deadline=None)
@given(codec_name=st.sampled_from(["topk", "topk-int8", "int8", "fp16"]), seed=st.integers(0, 10_000),
       steps=st.integers(1, 30))
def test_everything_sent_plus_the_residual_is_everything_learned(codec_name, seed, steps):
    generator = torch.Generator().manual_seed(seed)
    codec = get_codec(codec_name, topk_fraction=0.05)
    residual = {name: torch.zeros(shape) for name, shape in LAYOUT.shapes}
    total_true = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in LAYOUT.shapes}
    total_sent = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in LAYOUT.shapes}
    for _ in range(steps):
        delta = {name: torch.randn(shape, generator=generator) for name, shape in LAYOUT.shapes}
        for name in delta:
            total_true[name] += delta[name]
        specs, parts, residual = compensate_and_encode(delta, residual, codec, LAYOUT)
        sent = codec.decode(specs, group_parts(specs, parts), LAYOUT)
        for name in sent:
            total_sent[name] += sent[name]
    for name in total_true:
        assert torch.allclose(total_sent[name] + residual[name], total_true[name], atol=1e-4)


def test_topk_without_feedback_loses_what_feedback_keeps():
    torch.manual_seed(0)
    codec = get_codec("topk", topk_fraction=0.01)
    delta = {name: torch.randn(shape) for name, shape in LAYOUT.shapes}
    specs, parts, residual = compensate_and_encode({k: v.clone() for k, v in delta.items()},
                                                   {k: torch.zeros_like(v) for k, v in delta.items()}, codec, LAYOUT)
    sent = codec.decode(specs, group_parts(specs, parts), LAYOUT)
    assert all(residual[k].abs().sum() > 0 for k in delta), "top-k leaves most of the update out"
    assert all(torch.allclose(sent[k] + residual[k], delta[k]) for k in delta)


def test_residual_survives_a_restart(tmp_path):
    path = tmp_path / "site-1.residual"
    feedback = ErrorFeedback(path, LAYOUT)
    feedback.encode({name: torch.randn(shape) for name, shape in LAYOUT.shapes}, get_codec("topk", 0.01), "run-a")
    feedback.commit()
    restarted = ErrorFeedback(path, LAYOUT)
    assert all(torch.equal(restarted.residual[k], feedback.residual[k]) for k in feedback.residual)
    assert any(t.abs().sum() > 0 for t in restarted.residual.values()) and restarted.run_id == "run-a"


def test_a_residual_left_by_another_run_is_not_folded_into_an_update(tmp_path, caplog):
    path = tmp_path / "site-1.residual"
    codec = get_codec("topk", 0.01)
    earlier = ErrorFeedback(path, LAYOUT)
    earlier.encode({name: torch.randn(shape) for name, shape in LAYOUT.shapes}, codec, "run-a")
    earlier.commit()
    feedback = ErrorFeedback(path, LAYOUT)
    delta = {name: torch.randn(shape) for name, shape in LAYOUT.shapes}
    _, expected = codec.encode({k: v.clone() for k, v in delta.items()})
    with caplog.at_level(logging.INFO):
        _, parts = feedback.encode(delta, codec, "run-b")
    assert "belongs to run run-a" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(parts, expected, strict=True)), \
        "the new run's update is its own, with nothing of run-a's residual"
    feedback.commit()
    assert ErrorFeedback(path, LAYOUT).run_id == "run-b"


def test_residual_for_other_shapes_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "site-1.residual"
    save_tensors(path, {"w": torch.ones(2, 2)})
    with caplog.at_level(logging.WARNING):
        feedback = ErrorFeedback(path, LAYOUT)
    assert "other shapes" in caplog.text
    assert all(t.abs().sum() == 0 for t in feedback.residual.values())
    assert Layout.of(feedback.residual) == LAYOUT


def test_damaged_residual_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "site-1.residual"
    save_tensors(path, {name: torch.ones(shape) for name, shape in LAYOUT.shapes})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        feedback = ErrorFeedback(path, LAYOUT)
    assert "damaged" in caplog.text
    assert all(t.abs().sum() == 0 for t in feedback.residual.values())


def test_tensor_files_round_trip_with_meta(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5.0)}
    save_tensors(tmp_path / "x", tensors, {"version": 7, "sites": {"site-1": [1, 2]}})
    loaded, meta = load_tensors(tmp_path / "x")
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert meta == {"version": 7, "sites": {"site-1": (1, 2)}}
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"
