"""Codec round trips within their stated bounds, and refusal of payloads that do not fit the model."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shared.codecs import (
    CODECS,
    INT8_BLOCK,
    Layout,
    decode_tensors,
    encode_gaps,
    encode_tensors,
    gap_positions,
    get_codec,
    last_gap_position,
    top_k_indices,
)
from shared.protocol import PROTOCOL_VERSION, PartSpec, ProtocolError, TensorSpec, UpdateHeader, decode_payload, encode_payload, new_id

finite = st.floats(-60000, 60000, allow_nan=False, width=32)
shapes = st.tuples(st.integers(0, 6), st.integers(1, 700))
models = st.lists(arrays(np.float32, shapes, elements=finite), min_size=1, max_size=4).map(
    lambda arrs: {f"layer{i}.weight": torch.from_numpy(a) for i, a in enumerate(arrs)}
)
RELATIVE = {"fp32": 0.0, "fp16": 2**-11, "bf16": 2**-8}
# Below the normal range the spacing of representable values, not the relative bound, limits the error.
FLOORS = {"fp32": 0.0, "fp16": 2**-25, "bf16": 2**-134}


def through_the_wire(tensors, codec):
    """Encode, frame as a real payload, and decode from the bytes, as the coordinator does."""
    specs, parts = encode_tensors(tensors, codec)
    header = UpdateHeader(protocol=PROTOCOL_VERSION, update_id=new_id(), run_id=new_id(), site="s", base_version=0,
                          num_samples=1, train_seconds=0.0, tensors=specs)
    payload = bytearray(b"".join(encode_payload(header, parts)))
    decoded_header, decoded_parts = decode_payload(payload)
    return decode_tensors(decoded_header.tensors, decoded_parts, Layout.of(tensors)), len(payload)


@settings(max_examples=40, deadline=None)
@given(model=models, codec_name=st.sampled_from(sorted(RELATIVE)))
def test_float_codecs_round_trip_within_their_bound(model, codec_name):
    decoded, _ = through_the_wire(model, get_codec(codec_name))
    for name, tensor in model.items():
        error = (decoded[name] - tensor).abs()
        assert decoded[name].dtype == torch.float32 and decoded[name].shape == tensor.shape
        assert torch.all(error <= RELATIVE[codec_name] * tensor.abs() + FLOORS[codec_name])


@settings(max_examples=40, deadline=None)
@given(model=models)
def test_int8_error_is_at_most_half_a_step_per_block(model):
    decoded, _ = through_the_wire(model, get_codec("int8"))
    for name, tensor in model.items():
        flat, out = tensor.reshape(-1), decoded[name].reshape(-1)
        for start in range(0, flat.numel(), INT8_BLOCK):
            block = flat[start : start + INT8_BLOCK]
            bound = block.abs().max() / 254 * (1 + 1e-5) + 1e-30
            assert torch.all((out[start : start + INT8_BLOCK] - block).abs() <= bound)


@settings(max_examples=40, deadline=None)
@given(model=models, fraction=st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0]))
def test_topk_keeps_exactly_the_k_largest_magnitudes(model, fraction):
    # Distinct magnitudes make "the k largest" a unique set.
    model = {n: torch.randperm(t.numel()).float().add(1).mul(torch.sign(torch.randn(t.numel()))).view(t.shape)
             for n, t in model.items()}
    decoded, _ = through_the_wire(model, get_codec("topk", fraction))
    for name, tensor in model.items():
        flat, out = tensor.reshape(-1), decoded[name].reshape(-1)
        k = max(1, math.ceil(fraction * flat.numel()))
        kept = torch.nonzero(out).squeeze(1)
        assert kept.numel() == min(k, flat.numel())
        assert torch.equal(out[kept], flat[kept]), "kept values are exact"
        if kept.numel() < flat.numel():
            dropped = torch.ones_like(flat, dtype=torch.bool)
            dropped[kept] = False
            assert flat[kept].abs().min() > flat[dropped].abs().max()


@settings(max_examples=40, deadline=None)
@given(model=models, fraction=st.sampled_from([0.01, 0.1]))
def test_topk_int8_keeps_the_same_positions_with_int8_values(model, fraction):
    exact, _ = through_the_wire(model, get_codec("topk", fraction))
    quantized, _ = through_the_wire(model, get_codec("topk-int8", fraction))
    # Blocks of 256 kept values may span tensors, so the largest kept value anywhere bounds the step.
    step = max(float(t.abs().max()) if t.numel() else 0.0 for t in exact.values()) / 254
    for name in model:
        a, b = exact[name].reshape(-1), quantized[name].reshape(-1)
        assert torch.all((a - b).abs() <= step * (1 + 1e-5) + 1e-30)
        assert torch.all((b != 0) <= (a != 0)), "no value appears where top-k put none"


def test_large_tensor_uses_the_sampled_threshold_and_stays_exact():
    torch.manual_seed(1)
    values = torch.randn(3_000_000)
    k = 30_000
    chosen = top_k_indices(values, k)
    assert chosen.numel() == k and torch.all(chosen[1:] > chosen[:-1])
    assert torch.equal(torch.sort(torch.topk(values.abs(), k).indices).values, chosen)


def test_large_sparse_delta_sends_only_its_nonzero_values():
    values = torch.zeros(40_000_000)  # more than two scan blocks
    touched = torch.sort(torch.randperm(values.numel())[:500]).values
    values[touched] = torch.randn(500)
    assert torch.equal(top_k_indices(values, 400_000), touched), "fewer nonzeros than k: exactly those"
    assert torch.equal(top_k_indices(values, 100), torch.sort(torch.topk(values.abs(), 100).indices).values)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**33), min_size=0, max_size=200, unique=True))
def test_gap_encoding_round_trips_any_sorted_indices(raw):
    indices = np.array(sorted(raw), dtype=np.int64)
    gaps, ends = encode_gaps(indices)
    positions = gap_positions(gaps).numpy()
    assert last_gap_position(gaps, 2**33 + 1) == (positions[-1] if len(positions) else -1)
    if ends is None:  # no fillers
        assert np.array_equal(positions, indices)
    else:
        assert np.array_equal(positions[ends], indices)
        fillers = np.ones(len(positions), bool)
        fillers[ends] = False
        assert not np.isin(positions[fillers], indices).any(), "a filler landed on a real index"


def test_gap_encoding_picks_the_smallest_type():
    assert encode_gaps(np.arange(0, 1000, 7))[0].dtype == np.uint8
    assert encode_gaps(np.arange(0, 100_000, 1000))[0].dtype == np.uint16


def test_compressed_update_of_a_small_model_is_over_50x_smaller():
    torch.manual_seed(0)
    model = {"0.weight": torch.randn(128, 64), "0.bias": torch.randn(128), "2.weight": torch.randn(10, 128), "2.bias": torch.randn(10)}
    _, dense = through_the_wire(model, get_codec("fp32"))
    _, compressed = through_the_wire(model, get_codec("topk-int8", 0.005))
    assert dense / compressed > 50


def test_every_codec_is_named_and_round_trips_a_zero_model():
    model = {"w": torch.zeros(3, 3)}
    for name in CODECS.names:
        decoded, _ = through_the_wire(model, get_codec(name))
        assert torch.equal(decoded["w"], model["w"])


def test_unknown_codec_names_the_choices():
    with pytest.raises(ValueError, match="choose one of fp32, fp16, bf16, int8, topk, topk-int8"):
        get_codec("zip")


@pytest.mark.parametrize("codec_name", ["fp32", "fp16", "bf16", "int8"])
def test_dense_entries_that_do_not_fit_the_model_are_refused(codec_name):
    specs, parts = encode_tensors({"t": torch.ones(4, 4)}, get_codec(codec_name))
    with pytest.raises(ProtocolError, match="shape"):
        decode_tensors(specs, [parts], Layout((("t", (4, 5)),)))
    with pytest.raises(ProtocolError, match="not in the model"):
        decode_tensors(specs, [parts], Layout((("u", (4, 4)),)))
    with pytest.raises(ProtocolError, match="missing"):
        decode_tensors(specs, [parts], Layout((("t", (4, 4)), ("u", (1,)))))
    wrong = specs[0].model_copy(update={"parts": tuple(PartSpec(dtype=p.dtype, shape=(1,)) for p in specs[0].parts)})
    with pytest.raises(ProtocolError, match="has parts"):
        decode_tensors((wrong,), [[p[:1] for p in parts]], Layout((("t", (4, 4)),)))


@pytest.mark.parametrize("codec_name", ["topk", "topk-int8"])
def test_sparse_payloads_that_do_not_fit_are_refused(codec_name):
    model = {"a": torch.randn(50), "b": torch.randn(30)}
    specs, parts = encode_tensors(model, get_codec(codec_name, 0.1))
    with pytest.raises(ProtocolError, match="another model"):
        decode_tensors(specs, [parts], Layout((("a", (50,)), ("b", (31,)))))
    gaps = parts[0].copy()
    gaps[-1] = 200  # lands past the 80 values of the model
    with pytest.raises(ProtocolError, match="outside a model of 80"):
        decode_tensors(specs, [[gaps, *parts[1:]]], Layout.of(model))
    gaps = parts[0].copy()
    gaps[1] = 0
    with pytest.raises(ProtocolError, match="not strictly increasing"):
        decode_tensors(specs, [[gaps, *parts[1:]]], Layout.of(model))
    with pytest.raises(ProtocolError, match="has parts"):
        decode_tensors(specs, [[parts[0], parts[1][:-1], *parts[2:]]], Layout.of(model))


def test_mixed_and_unknown_codecs_are_refused():
    a, pa = encode_tensors({"a": torch.ones(2)}, get_codec("fp32"))
    b, pb = encode_tensors({"b": torch.ones(2)}, get_codec("fp16"))
    with pytest.raises(ProtocolError, match="mixes codecs"):
        decode_tensors(a + b, [pa, pb], Layout((("a", (2,)), ("b", (2,)))))
    spec = TensorSpec(name="t", shape=(1,), codec="lzma", parts=(PartSpec(dtype="uint8", shape=(1,)),))
    with pytest.raises(ProtocolError, match="unknown codec 'lzma'"):
        decode_tensors((spec,), [[np.zeros(1, np.uint8)]], Layout((("t", (1,)),)))
