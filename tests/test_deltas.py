"""Sparse deltas fold in exactly as their dense form would, wherever the coordinator uses them."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.robust import clip_to_norm, update_norm
from coordinator.strategies import FedAsync, FedBuff, Update
from shared.codecs import Layout, decode_tensors, encode_tensors, get_codec
from coordinator.kernels import BLOCK
from coordinator.running_sum import BEHIND_MIN, FlatTensors, RunningSum, add_encoded, fold_sparse
from shared.deltas import SparseDelta, add_scaled, dense_copy
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
    flat.add(delta, 0.5)
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


def random_sparse(total: int, count: int, seed: int, shapes=None) -> SparseDelta:
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(total, generator=generator)[:count].sort().values
    return SparseDelta(shapes or (("flat", (total,)),), positions, torch.randn(count, generator=generator))


class CountingExecutor(ThreadPoolExecutor):
    submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


# Block by block once the deltas hold 1/8 of the sum's positions (16k here), one by one below.
@pytest.mark.parametrize("helped", [False, True], ids=["one thread", "helped"])
@pytest.mark.parametrize("count, values", [(1, 40_000), (2, 40_000), (5, 40_000), (3, 2_000)])
def test_folding_deltas_together_gives_exactly_the_one_by_one_sum(count, values, helped):
    total = 2 * BLOCK + 1000  # three blocks, the last one short
    deltas = [(random_sparse(total, values, seed), alpha) for seed, alpha in zip(range(count), (1.0, -0.5, 3.0, 0.25, 1.0))]
    # Positions on every block edge, both sides of the helper's half and both ends, in two deltas, so they meet there.
    edges = torch.tensor([0, BLOCK - 1, BLOCK, total // 2 - 1, total // 2, 2 * BLOCK, total - 1])
    deltas += [(SparseDelta(deltas[0][0].shapes, edges, torch.full((7,), 2.0)), 0.5)] * 2
    folded, expected = torch.ones(total), torch.ones(total)
    with CountingExecutor(1) as helper:  # with a helper, the last two blocks are folded on its thread
        fold_sparse(folded, deltas, helper=helper if helped else None, blockwise=True)
    assert helper.submitted == (helped and count * values >= total // 8)
    for delta, alpha in deltas:
        expected.scatter_add_(0, delta.indices, delta.values * alpha)
    assert torch.equal(folded, expected)
    assert folded[total - 1] != 1.0 and folded[BLOCK] != 1.0


@pytest.mark.parametrize("helped", [False, True], ids=["one thread", "helped"])
def test_deltas_of_every_encoding_fold_together_to_exactly_the_one_by_one_sum(helped):
    total = 3 * BLOCK + 77
    # Runs of one kind of gaps and values fold together; the kinds alternate, so order matters.
    deltas = [(encoded_delta("topk-int8", total, 20_000, 0), 1.0), (encoded_delta("topk-int8", total, 15_000, 1), -0.5),
              (encoded_delta("topk", total, 20_000, 2), 3.0), (random_sparse(total, 10_000, 3), 0.25),
              (encoded_delta("topk-int8", total, 300, 4), 2.0), (encoded_delta("topk", total, 20_000, 5), 1.5)]
    assert len({(d.gap_form()[0].dtype, d.gap_form()[1].dtype) for d, _ in deltas}) == 4
    folded, expected = torch.ones(total), torch.ones(total)
    with CountingExecutor(1) as helper:
        fold_sparse(folded, deltas, helper=helper if helped else None, blockwise=True)
    assert helper.submitted == helped
    for delta, alpha in deltas:
        expected.scatter_add_(0, delta.indices, delta.values * alpha)
    assert torch.equal(folded, expected)


def test_a_delta_outside_the_sum_is_refused_before_anything_is_added():
    total = BLOCK + 10
    inside, outside = random_sparse(total, 100, 0), random_sparse(total + 5, 100, 1)
    outside = SparseDelta(outside.shapes, torch.cat([outside.indices[:-1], torch.tensor([total])]), outside.values)
    flat = torch.zeros(total)
    with pytest.raises(IndexError, match="outside a sum of"):
        fold_sparse(flat, [(inside, 1.0), (outside, 1.0)], blockwise=True)
    assert torch.count_nonzero(flat) == 0


def test_a_sum_that_fits_in_the_cache_takes_each_delta_straight_in_to_the_same_sum():
    total = 2 * BLOCK + 1000
    deltas = [(random_sparse(total, 40_000, seed), alpha) for seed, alpha in zip(range(4), (1.0, -0.5, 3.0, 0.25))]
    blockwise, straight = torch.ones(total), torch.ones(total)
    with CountingExecutor(1) as helper:
        fold_sparse(straight, deltas, helper=helper, blockwise=False)
    assert helper.submitted == 0, "no block was handed to the helper"
    fold_sparse(blockwise, deltas, blockwise=True)
    assert torch.equal(straight, blockwise)


@pytest.mark.parametrize("blockwise", [True, False], ids=["blockwise", "straight"])
def test_a_running_sum_adds_queued_deltas_exactly_and_queues_at_most_half_its_bytes(blockwise):
    total = 64 * BLOCK
    deltas = [random_sparse(total, BEHIND_MIN + 1000, seed) for seed in range(16)]
    running = RunningSum({"flat": torch.zeros(total)}, blockwise=blockwise)
    expected = torch.zeros(total)
    queued = []
    for i, delta in enumerate(deltas):
        running.add(delta, 1.0 + i)
        queued.append(running._queued_bytes)
        expected.scatter_add_(0, delta.indices, delta.values * (1.0 + i))
    if blockwise:
        assert max(queued) > 4 * (deltas[0].indices.nbytes + deltas[0].values.nbytes), "deltas were not queued together"
    assert max(queued) <= total * 4 // 2
    assert torch.equal(running.tensors.flat, expected)
    assert running._queued_bytes == 0


def test_a_sparse_delta_outside_a_running_sum_is_refused_when_added():
    values, _, sparse = large_sparse_delta()
    running = RunningSum(values)
    with pytest.raises(IndexError, match="outside a sum of"):
        running.add(SparseDelta(sparse.shapes, sparse.indices + 10**9, sparse.values), 1.0)
    running.add(sparse, 1.0)
    assert torch.count_nonzero(running.tensors.flat) == len(sparse.values)


def test_a_failed_fold_is_raised_when_the_sum_is_next_read():
    values, _, sparse = large_sparse_delta()
    running = RunningSum(values)
    running.add(SparseDelta(sparse.shapes, sparse.indices, sparse.values.double()), 1.0)  # not the sum's dtype
    with pytest.raises(RuntimeError, match="dtype"):
        running.tensors
    running.add(sparse, 1.0)  # the failure is reported once; the sum goes on
    assert torch.count_nonzero(running.tensors.flat) == len(sparse.values)


def encoded_delta(codec: str, total: int, count: int, seed: int) -> SparseDelta:
    """A top-k delta as the coordinator receives it: still its wire encoding."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.zeros(total)
    flat[torch.randperm(total, generator=generator)[:count]] = torch.randn(count, generator=generator) * 3
    specs, parts = encode_tensors({"flat": flat}, get_codec(codec, count / total))
    delta = decode_tensors(specs, [parts], Layout((("flat", (total,)),)), sparse=True)
    assert delta.encoding is not None
    return delta


# Gaps of uint8 (with fillers for the wider ones), uint16 and uint32: sparser positions need wider types.
@pytest.mark.parametrize("total, count", [(300_000, 100_000), (3_000_000, 3_000), (10_000_000, 50)],
                         ids=["uint8 gaps", "uint16 gaps", "uint32 gaps"])
@pytest.mark.parametrize("codec", ["topk", "topk-int8"])
def test_an_encoded_delta_adds_bit_for_bit_as_its_decoded_form_scatters(codec, total, count):
    sums = {"encoded": torch.ones(total), "decoded": torch.ones(total)}
    for seed, alpha in enumerate((1.0, 0.37, -2.5)):
        delta = encoded_delta(codec, total, count, seed)
        assert delta.encoding.gaps.dtype.itemsize == {100_000: 1, 3_000: 2, 50: 4}[count]
        add_encoded(sums["encoded"], delta.encoding, alpha)
        positions, values = delta.encoding.decode()
        sums["decoded"].scatter_add_(0, positions, values * alpha)
    assert torch.equal(sums["encoded"], sums["decoded"])
    assert torch.count_nonzero(sums["encoded"] != 1.0) > 0


def test_a_delta_decodes_once_and_its_tensors_are_the_delta_from_then_on():
    delta = encoded_delta("topk-int8", 100_000, 5_000, 0)
    first, last = delta.span()
    assert len(delta) == 5_000 and last < 100_000 and delta.nbytes < 5_000 * 3
    clip_to_norm(delta, 1.0)  # reads the values: decoded, and scaled in place
    assert delta.encoding is None and delta.span() == (int(delta.indices[0]), last)
    assert first == int(delta.indices[0]), "the encoding's span named the same first position"
    flat = FlatTensors(torch.zeros(100_000), (("flat", (100_000,)),))
    flat.add(delta, 1.0)
    assert abs(float(torch.linalg.vector_norm(flat.flat)) - 1.0) < 1e-5, "the clipped values were added"


def test_an_encoded_delta_is_not_added_into_a_tensor_it_does_not_fit():
    delta = encoded_delta("topk", 100_000, 5_000, 1)
    with pytest.raises(ValueError, match="cannot be added"):
        add_encoded(torch.zeros(delta.span()[1]), delta.encoding, 1.0)
    with pytest.raises(ValueError, match="cannot be added"):
        add_encoded(torch.zeros(100_000, dtype=torch.float64), delta.encoding, 1.0)


def test_an_encodings_finiteness_is_read_from_its_values_or_its_int8_scales():
    floats = encoded_delta("topk", 10_000, 1_000, 2).encoding
    int8 = encoded_delta("topk-int8", 10_000, 1_000, 2).encoding
    assert floats.all_finite() and int8.all_finite()
    floats.values[7] = float("nan")
    assert not floats.all_finite()
    int8.scales[0] = float("inf")
    assert not int8.all_finite()
    int8.scales[0] = 3e38 / 100  # finite, but 127 times it is not: its int8 values could overflow
    assert not int8.all_finite()


def test_a_running_sum_of_encoded_deltas_equals_the_decoded_sum():
    total = 32 * BLOCK
    deltas = [encoded_delta("topk-int8", total, BEHIND_MIN + 1000, seed) for seed in range(6)]
    running = RunningSum({"flat": torch.zeros(total)}, blockwise=False)
    expected = torch.zeros(total)
    for i, delta in enumerate(deltas):
        positions, values = delta.encoding.decode()
        expected.scatter_add_(0, positions, values * (0.5 + i))
        running.add(delta, 0.5 + i)
    assert torch.equal(running.tensors.flat, expected)
    assert all(delta.encoding is not None for delta in deltas), "added from their encodings, not decoded"
