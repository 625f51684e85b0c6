"""Sparse deltas fold in exactly as their dense form would, wherever the coordinator uses them."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.robust import clip_to_norm, update_norm
from coordinator.strategies import FedAsync, FedBuff, Update
from shared.codecs import Layout, decode_tensors, encode_tensors, get_codec
from shared.deltas import BEHIND_MIN, FlatTensors, RunningSum, SparseDelta, add_scaled, dense_copy
from shared.protocol import PROTOCOL_VERSION, UpdateHeader, decode_payload, encode_payload, new_id

SHAPES = {"embedding": (50, 4), "empty": (0,), "head.weight": (3, 4), "head.bias": (3,)}


def sparse_and_dense(seed: int, fraction: float):
    torch.manual_seed(seed)
    tensors = {name: torch.randn(shape) for name, shape in SHAPES.items()}
    specs, parts = encode_tensors(tensors, get_codec("topk", fraction))
    header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=new_id(), site="s", base_version=0,
                          num_samples=1, train_seconds=0.0, tensors=specs)
    decoded_header, decoded_parts = decode_payload(b"".join(encode_payload(header, parts)))
    layout = Layout.of(tensors)
    return (decode_tensors(decoded_header.tensors, decoded_parts, layout, sparse=True),
            decode_tensors(decoded_header.tensors, decoded_parts, layout))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), fraction=st.sampled_from([0.01, 0.1, 0.5, 1.0]), alpha=st.floats(-2, 2))
def test_sparse_delta_adds_like_its_dense_form(seed, fraction, alpha):
    sparse, dense = sparse_and_dense(seed, fraction)
    assert isinstance(sparse, SparseDelta) and not isinstance(dense, SparseDelta)
    via_sparse = {name: torch.ones(shape) for name, shape in SHAPES.items()}
    via_dense = {name: torch.ones(shape) for name, shape in SHAPES.items()}
    add_scaled(via_sparse, sparse, alpha)
    add_scaled(via_dense, dense, alpha)
    assert all(torch.allclose(via_sparse[n], via_dense[n], atol=1e-5) for n in SHAPES)
    assert all(torch.equal(dense_copy(sparse)[n], dense[n]) for n in SHAPES)
    assert abs(update_norm(sparse) - update_norm(dense)) <= 1e-5 * max(1.0, update_norm(dense))


def test_clipping_a_sparse_delta_scales_its_values():
    sparse, _ = sparse_and_dense(1, 0.5)
    norm = clip_to_norm(sparse, 0.5)
    assert norm > 0.5 and abs(update_norm(sparse) - 0.5) < 1e-5


def test_strategies_treat_sparse_and_dense_updates_alike():
    sparse, dense = sparse_and_dense(2, 0.1)
    for make in (lambda: FedAsync(alpha=0.5), lambda: FedBuff(buffer_size=2)):
        results = []
        for delta in (sparse, dense):
            strategy = make()
            params = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
            for i in range(2):
                strategy.submit(params, Update(new_id(), f"site-{i}", 0, 10, delta), staleness=i)
            results.append(params)
        assert all(torch.allclose(results[0][n], results[1][n], atol=1e-6) for n in SHAPES)


def test_a_non_contiguous_target_is_refused_rather_than_silently_copied():
    sparse, _ = sparse_and_dense(3, 1.0)
    target = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    target["head.weight"] = torch.zeros(4, 3).t()
    with pytest.raises(RuntimeError, match="view"):
        add_scaled(target, sparse, 1.0)


def large_sparse_delta(codec: str = "topk"):
    torch.manual_seed(3)
    shapes = {"a": (700, 300), "b": (5,), "c": (400, 400)}
    values = {name: torch.randn(shape) for name, shape in shapes.items()}
    specs, parts = encode_tensors(values, get_codec(codec, 0.5))
    header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=new_id(), site="s", base_version=0,
                          num_samples=1, train_seconds=0.0, tensors=specs)
    payload = bytearray(b"".join(encode_payload(header, parts)))  # writable, as the coordinator's buffers are
    decoded_header, decoded_parts = decode_payload(memoryview(payload))
    return values, payload, decode_tensors(decoded_header.tensors, decoded_parts, Layout.of(values), sparse=True)


def test_a_sparse_delta_adds_into_flat_tensors_as_it_does_tensor_by_tensor():
    values, _, delta = large_sparse_delta()
    flat = FlatTensors.zeros_like(values)
    assert flat.shapes == delta.shapes, "the delta would be added tensor by tensor, not into the flat tensor"
    assert all(view.data_ptr() == flat.flat[start:].data_ptr() for view, start in zip(flat.values(), (0, 210_000, 210_005)))
    plain = {name: torch.zeros(t.shape) for name, t in values.items()}
    add_scaled(flat, delta, 0.5)
    add_scaled(plain, delta, 0.5)
    assert all(torch.equal(flat[name], plain[name]) for name in values)
    assert torch.count_nonzero(flat.flat) == len(delta.values)


@pytest.mark.parametrize("codec", ["topk", "topk-int8"])
def test_a_decoded_sparse_delta_keeps_its_values_when_the_payload_buffer_is_reused(codec):
    _, payload, delta = large_sparse_delta(codec)
    values, indices = delta.values.clone(), delta.indices.clone()
    payload[:] = bytes(len(payload))  # the coordinator's next upload lands in the same buffer
    assert torch.equal(delta.values, values) and torch.equal(delta.indices, indices)


def test_a_running_sum_is_complete_whenever_it_is_read():
    values, _, sparse = large_sparse_delta()
    assert len(sparse.values) >= BEHIND_MIN, "small enough to be added before add returns"
    running = RunningSum(values)
    expected = {name: torch.zeros(t.shape) for name, t in values.items()}
    for alpha in (0.5, -2.0, 3.0):
        running.add(sparse, alpha)  # returns before the add is done; reading waits for it
        add_scaled(expected, sparse, alpha)
    assert all(torch.equal(running.tensors[name], expected[name]) for name in values)
    dense = {name: torch.ones(t.shape) for name, t in values.items()}
    running.add(dense, 1.0)
    for tensor in dense.values():
        tensor.fill_(100.0)  # a dense delta may view its payload: it was added before add returned
    assert all(torch.equal(running.tensors[name], expected[name] + 1.0) for name in values)


def test_a_failed_add_is_raised_when_the_sum_is_next_read():
    values, _, sparse = large_sparse_delta()
    running = RunningSum(values)
    other_model = SparseDelta(sparse.shapes, sparse.indices + 10**9, sparse.values)  # positions past the end
    running.add(other_model, 1.0)
    with pytest.raises(RuntimeError, match="out of bounds"):
        running.tensors
    running.add(sparse, 1.0)  # the failure is reported once; the sum goes on
    assert torch.count_nonzero(running.tensors.flat) == len(sparse.values)
