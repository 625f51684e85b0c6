"""Codec round trips within their stated bounds, and refusal of parts that do not fit."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shared.codecs import CODECS, decode_tensors, encode_tensors, get_codec
from shared.protocol import PartSpec, ProtocolError, TensorSpec

finite = st.floats(-60000, 60000, allow_nan=False, width=32)
tensors = arrays(np.float32, st.tuples(st.integers(0, 6), st.integers(1, 9)), elements=finite).map(torch.from_numpy)
BOUNDS = {"fp32": 0.0, "fp16": 2**-11, "bf16": 2**-8}
# Below the normal range the spacing of representable values, not the relative bound, limits the error.
FLOORS = {"fp32": 0.0, "fp16": 2**-25, "bf16": 2**-134}


def round_trip(tensor, codec_name):
    specs, parts = encode_tensors({"t": tensor}, get_codec(codec_name))
    return decode_tensors(specs, [[np.frombuffer(p.tobytes(), p.dtype).reshape(p.shape) for p in parts]])["t"]


@settings(max_examples=60, deadline=None)
@given(tensor=tensors, codec_name=st.sampled_from(sorted(BOUNDS)))
def test_round_trip_within_the_stated_bound(tensor, codec_name):
    decoded = round_trip(tensor, codec_name)
    assert decoded.shape == tensor.shape and decoded.dtype == torch.float32
    error = (decoded - tensor).abs()
    assert torch.all(error <= BOUNDS[codec_name] * tensor.abs() + FLOORS[codec_name])


def test_every_codec_is_covered():
    assert set(CODECS) == set(BOUNDS)


def test_unknown_codec_names_the_choices():
    with pytest.raises(ValueError, match="choose one of fp32, fp16, bf16"):
        get_codec("zip")


@pytest.mark.parametrize("codec_name", sorted(BOUNDS))
def test_parts_that_do_not_fit_the_shape_are_refused(codec_name):
    specs, parts = encode_tensors({"t": torch.ones(4, 4)}, get_codec(codec_name))
    spec = specs[0].model_copy(update={"shape": (4, 5)})
    with pytest.raises(ProtocolError, match="has parts"):
        decode_tensors((spec,), [parts])


def test_unknown_codec_in_a_header_is_refused():
    spec = TensorSpec(name="t", shape=(1,), codec="lzma", parts=(PartSpec(dtype="uint8", shape=(1,)),))
    with pytest.raises(ProtocolError, match="unknown codec 'lzma'"):
        decode_tensors((spec,), [[np.zeros(1, np.uint8)]])


def test_duplicate_tensor_names_are_refused():
    specs, parts = encode_tensors({"t": torch.ones(2)}, get_codec("fp32"))
    with pytest.raises(ProtocolError, match="appears twice"):
        decode_tensors(specs * 2, [parts, parts])
