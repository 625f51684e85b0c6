"""The fedq wire protocol, defined in one place.

Every message fedq sends is one chunk of a *payload*. A payload is::

    u32 little-endian header length | msgpack header | tensor parts, each aligned to its item size

The header is a msgpack map validated by the schemas below; it names the payload's kind and lists
every tensor (name, shape, dtype, codec, and the dtype and shape of each raw part the codec wrote).
Tensor bytes are never inside msgpack: they follow the header as raw little-endian arrays, so a
decoder maps them with ``numpy.frombuffer`` instead of copying, and no byte from the network is
ever unpickled.
"""

from __future__ import annotations

import math
import secrets
import struct
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import blake3
import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

# 2: payload digests are BLAKE3 (were SHA-256), in fedq-digest headers and Announcement.digest.
# 3: every chunk on the updates queue names its site (fedq-site); headers are bounded (HeaderLimits).
# 4: only trained tensors travel (Announcement.frozen, Hello.frozen); sites score versions
#    (Announcement.evaluate, EvalReport).
PROTOCOL_VERSION = 4


def new_digest() -> Any:
    """A hasher for every digest fedq checks, on the wire and on disk: BLAKE3, 256 bits.

    Four times as fast as SHA-256 on one core (8 against 2.2 GB/s with AVX-512 and SHA-NI here), and
    every byte of every snapshot, update and checkpoint goes through it at least twice.
    """
    return blake3.blake3()


# RabbitMQ 4.x refuses messages over 16 MiB by default; 4 MiB chunks stay far from any limit and
# keep the memory a reader holds per chunk in flight small.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
# Dtypes a part may declare. Anything else (object arrays above all) is refused before numpy sees it.
PART_DTYPES = frozenset({"float32", "float16", "uint16", "int8", "uint8", "int16", "int32", "uint32", "int64"})
SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"

_HEADER_LENGTH = struct.Struct("<I")

# Bounds every header is checked against before anything the size of its claims is made: numpy
# refuses more than 64 dimensions (ValueError, not a protocol error), and a dimension past 2**48 or
# a count past 2**53 (the last integer a float64 holds exactly) names nothing a model has.
MAX_NDIM = 32
MAX_DIM = 1 << 48
MAX_COUNT = 1 << 53
# Metrics a site reports with an update: a few named numbers, not a channel for data.
MAX_METRICS = 64


@dataclass(frozen=True)
class HeaderLimits:
    """How large a header may be before it is parsed: its bytes, and the entries of its largest
    list or map (its tensors: one per model tensor for a dense update). Nesting is bounded by
    msgpack itself (1024 levels)."""

    max_bytes: int = 16 * 1024 * 1024
    max_items: int = 1 << 17

    @classmethod
    def for_model(cls, tensors: int) -> "HeaderLimits":
        """The limits for payloads of a model of ``tensors`` tensors: a dense update lists each once
        (a few hundred bytes apiece); 64 KiB and 256 entries are room for everything else."""
        return cls(max_bytes=(64 << 10) + 2048 * tensors, max_items=256 + tensors)


#: Headers from the broker, when the model is not known: generous, but bounded.
WIRE_LIMITS = HeaderLimits()
#: Headers of fedq's own files (checkpoints hold a ledger row per recent update): no item limit.
FILE_LIMITS = HeaderLimits(max_bytes=1 << 31, max_items=-1)

Dim = Annotated[int, Field(ge=0, le=MAX_DIM)]
Shape = Annotated[tuple[Dim, ...], Field(max_length=MAX_NDIM)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Metrics = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[float, Field(allow_inf_nan=False)]],
    Field(max_length=MAX_METRICS),
]


# What the central team sends every site with each version (FEDQ_RUN_CONFIG): flat names to
# numbers, strings and booleans, so that a task reads settings, never code or structures.
RunConfig = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=64)],
         Union[bool, Annotated[int, Field(ge=-MAX_COUNT, le=MAX_COUNT)], Annotated[float, Field(allow_inf_nan=False)],
               Annotated[str, Field(max_length=1024)]]],
    Field(max_length=MAX_METRICS),
]


# A site's score of a version: finite, and small enough that summing millions of them weighted by
# sample counts stays far from overflow.
MAX_SCORE = 1e12
Scores = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=64)],
         Annotated[float, Field(ge=-MAX_SCORE, le=MAX_SCORE, allow_inf_nan=False)]],
    Field(max_length=MAX_METRICS),
]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
SiteName = Annotated[str, Field(pattern=SITE_NAME_PATTERN)]
# What a site claims to have trained or scored on: weights in merges and pools, so never zero.
Samples = Annotated[int, Field(gt=0, le=MAX_COUNT)]


# 64 random bits: no collision in any run's lifetime of updates, and half the bytes of a UUID,
# which matters when a whole compressed update is a few hundred bytes.
Id = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]


class ProtocolError(ValueError):
    """Bytes that do not follow the protocol; the message says what is wrong with them."""


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PartSpec(_Schema):
    dtype: str
    shape: Shape

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in PART_DTYPES:
            raise ValueError(f"part dtype {value!r} is not one of {sorted(PART_DTYPES)}")
        return value

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


class TensorSpec(_Schema):
    name: Annotated[str, Field(min_length=1, max_length=512)]
    shape: Shape
    codec: Annotated[str, Field(min_length=1, max_length=64)]
    params: dict[Annotated[str, Field(max_length=64)], Union[int, float, Annotated[str, Field(max_length=256)], bool]] = (
        Field(default_factory=dict, max_length=16))
    parts: tuple[PartSpec, ...] = Field(max_length=8, fail_fast=True)


class _PayloadHeader(_Schema):
    protocol: int
    # fail_fast: a list of many bad entries costs one error, not one (of several fields) per entry.
    tensors: tuple[TensorSpec, ...] = Field((), fail_fast=True)

    @field_validator("protocol")
    @classmethod
    def _supported_protocol(cls, value: int) -> int:
        if value != PROTOCOL_VERSION:
            raise ValueError(
                f"protocol version {value} is not supported (this build speaks {PROTOCOL_VERSION}); "
                "run the same fedq version on the coordinator and the sites"
            )
        return value


class SnapshotHeader(_PayloadHeader):
    """A global model version as the coordinator publishes it."""

    kind: Literal["snapshot"] = "snapshot"
    run_id: Id
    version: Count
    created_at: float


class UpdateHeader(_PayloadHeader):
    """What a site learned from one snapshot: the difference to that snapshot, encoded by a codec."""

    kind: Literal["update"] = "update"
    update_id: Id
    #: The run of the snapshot this update was trained from; updates from other runs are dropped.
    run_id: Id
    site: SiteName
    base_version: Count
    num_samples: Samples
    train_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    metrics: Metrics = Field(default_factory=dict)


class Hello(_PayloadHeader):
    """A site says it is up, so the coordinator repeats the newest announcement for it."""

    kind: Literal["hello"] = "hello"
    site: SiteName
    #: The digest of the site's frozen weights, so the coordinator can name a site that differs.
    frozen: Digest | None = None


class EvalReport(_PayloadHeader):
    """A site's score of one version on its own held-out data (``Task.evaluate_site``)."""

    kind: Literal["evaluation"] = "evaluation"
    report_id: Id
    run_id: Id
    site: SiteName
    #: The evaluation round it answers (``Announcement.evaluate``) and the version it scored.
    round: Count
    version: Count
    num_samples: Samples
    metrics: Scores


class Announcement(_PayloadHeader):
    """Tells every site that a snapshot is being written to the stream, and where to start reading it.

    It is published before the snapshot's chunks, so sites read while the coordinator writes; size,
    chunk count and digest are computed up front, and the digest is checked once all chunks are in.

    Readers attach at ``stream_offset``, the stream offset of the snapshot's first chunk, which the
    coordinator learns without any clock (``transport.Publisher.find_stream_end``). Only when it
    could not (None) do they attach at ``published_at`` (whole seconds, rounded down, on the
    coordinator's clock, which must then agree with the broker's), skipping the older chunks the
    broker may hand them by their payload id.
    """

    kind: Literal["announcement"] = "announcement"
    run_id: Id
    version: Count
    payload_id: Annotated[str, Field(min_length=1, max_length=64)]
    chunks: Annotated[int, Field(ge=1, le=MAX_COUNT)]
    size: Count
    digest: Digest
    published_at: float
    stream_offset: Count | None = None
    #: The run's configuration for the sites' tasks (``SiteContext.config``).
    config: RunConfig = Field(default_factory=dict)
    #: The digest of the model's frozen tensors (``shared.model_state.frozen_digest``): they never
    #: travel, so a site must have built the same ones to train.
    frozen: Digest | None = None
    #: The current evaluation round, when sites score versions: the version it started at. A site
    #: scores the first version at or after it that it fetches, once per round.
    evaluate: Count | None = None
    # Asynchronous strategies keep sites busy on the newest version even if they trained on it
    # already; a synchronous round wants exactly one update per site and version.
    retrain: bool = True
    # The run is over: workers that were running when it was published finish and exit.
    final: bool = False


class TensorFile(_PayloadHeader):
    """Tensors fedq keeps on its own disk (error-feedback residuals, checkpoints), never on the wire."""

    kind: Literal["tensors"] = "tensors"
    meta: dict[str, Any] = Field(default_factory=dict)


class SiteStatus(_Schema):
    """One site as the coordinator sees it, for ``fedq status``."""

    site: str
    last_seen: Union[float, None] = None  # unix time of its last message
    base_version: Union[int, None] = None  # of its last update
    staleness: Union[int, None] = None  # of its last update
    applied: int = 0
    dropped: int = 0
    refused: int = 0
    bytes_in: int = 0
    absent: bool = False  # it has no connection to the broker, and its latest update stands in for it


class Histogram(_Schema):
    """Counts of observations at or below each bound (the last bound is infinity), their sum and number."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int


class Status(_PayloadHeader):
    """The coordinator's state, published every few seconds for ``fedq status`` and metrics."""

    kind: Literal["status"] = "status"
    run_id: Id
    strategy: str
    published_at: float
    every: float  # seconds between status messages; an older one means the coordinator is quiet
    elapsed: float
    version: int
    evaluated_version: Union[int, None] = None
    metrics: dict[str, float] = Field(default_factory=dict)
    applied: int = 0
    dropped: int = 0
    refused: int = 0
    updates_per_minute: float = 0.0
    active_sites: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    queue_depths: dict[str, int] = Field(default_factory=dict)
    staleness: Histogram
    ingest_seconds: Histogram
    sites: tuple[SiteStatus, ...] = Field((), fail_fast=True)

    @property
    def absent_sites(self) -> int:
        """Sites with no connection to the broker, whose latest updates stand in for them."""
        return sum(1 for site in self.sites if site.absent)


Header = Annotated[
    Union[SnapshotHeader, UpdateHeader, Hello, EvalReport, Announcement, TensorFile, Status],
    Field(discriminator="kind")
]
_HEADER_ADAPTER: TypeAdapter[Any] = TypeAdapter(Header)


def new_id() -> str:
    """A fresh run, payload or update id: 16 lowercase hex digits."""
    return secrets.token_hex(8)


def now() -> float:
    return time.time()


def _aligned(offset: int, itemsize: int) -> int:
    # Natural alignment is all numpy and torch need; wider padding would dwarf small sparse updates.
    return -(-offset // itemsize) * itemsize


def encode_payload(header: _PayloadHeader, parts: list[np.ndarray]) -> list[memoryview]:
    """Frame a header and its tensor parts as a list of buffers, without copying the parts.

    ``parts`` are the raw arrays in the order the header's tensors list them. The buffers, laid end
    to end, are the payload; ``shared.chunking`` cuts them into messages.
    """
    declared = [part for tensor in header.tensors for part in tensor.parts]
    if len(declared) != len(parts):
        raise ValueError(f"header declares {len(declared)} parts but {len(parts)} arrays were given")
    header_bytes = msgpack.packb(header.model_dump(mode="python"), use_bin_type=True)
    buffers = [memoryview(_HEADER_LENGTH.pack(len(header_bytes)) + header_bytes)]
    offset = len(buffers[0])
    for spec, array in zip(declared, parts, strict=True):
        if array.dtype.name != spec.dtype or tuple(array.shape) != spec.shape:
            raise ValueError(f"array {array.dtype}{array.shape} does not match its declaration {spec}")
        padding = _aligned(offset, array.dtype.itemsize) - offset
        if padding:
            buffers.append(memoryview(bytes(padding)))
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        buffers.append(data)
        offset += padding + len(data)
    return buffers


def payload_size(buffers: list[memoryview]) -> int:
    return sum(len(b) for b in buffers)


def decode_header(payload: bytes | bytearray | memoryview, limits: HeaderLimits = WIRE_LIMITS) -> tuple[Any, int]:
    """Parse and validate a payload's header within ``limits``; returns it and the offset where parts begin."""
    view = memoryview(payload)
    if len(view) < _HEADER_LENGTH.size:
        raise ProtocolError(f"payload of {len(view)} bytes is too short to hold a header")
    (length,) = _HEADER_LENGTH.unpack_from(view)
    if _HEADER_LENGTH.size + length > len(view):
        raise ProtocolError(f"header length {length} does not fit a payload of {len(view)} bytes")
    if length > limits.max_bytes:
        raise ProtocolError(f"header of {length} bytes exceeds the limit of {limits.max_bytes} for this model")
    raw = view[_HEADER_LENGTH.size : _HEADER_LENGTH.size + length]
    try:
        fields = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=False, max_str_len=length,
                                 max_bin_len=length, max_ext_len=0, max_array_len=limits.max_items,
                                 max_map_len=limits.max_items)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"header is not valid msgpack within the limits ({type(exc).__name__}: {exc})") from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"header is a msgpack {type(fields).__name__}, not a map")
    try:
        header = _HEADER_ADAPTER.validate_python(fields)
    except ValidationError as exc:
        raise ProtocolError(f"header fails the schema: {_summarize(exc)}") from None
    return header, _HEADER_LENGTH.size + length


def decode_payload(payload: bytes | bytearray | memoryview,
                   limits: HeaderLimits = WIRE_LIMITS) -> tuple[Any, list[list[np.ndarray]]]:
    """Decode a whole payload into its header and, per tensor, its parts as zero-copy arrays.

    Every part's shape is checked against the payload's real length before numpy sees it: a part
    with no elements still names dimensions, and numpy refuses some (their product overflowing)
    with errors of its own.
    """
    header, offset = decode_header(payload, limits)
    view = memoryview(payload)
    tensors: list[list[np.ndarray]] = []
    for tensor in header.tensors:
        arrays = []
        for spec in tensor.parts:
            itemsize = np.dtype(spec.dtype).itemsize
            if math.prod(d for d in spec.shape if d) * itemsize > max(len(view), itemsize):
                raise ProtocolError(f"tensor {tensor.name!r} declares a part of shape {spec.shape}, which no "
                                    f"{len(view)}-byte payload can hold")
            offset = _aligned(offset, itemsize)
            end = offset + spec.nbytes
            if end > len(view):
                raise ProtocolError(
                    f"tensor {tensor.name!r} declares {spec.nbytes} bytes at offset {offset}, "
                    f"past the end of a {len(view)}-byte payload"
                )
            array = np.frombuffer(view, dtype=spec.dtype, count=math.prod(spec.shape), offset=offset)
            arrays.append(array.reshape(spec.shape))
            offset = end
        tensors.append(arrays)
    if offset != len(view):
        raise ProtocolError(f"payload has {len(view) - offset} bytes after its last tensor")
    return header, tensors


def _summarize(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'header'}: {err['msg']}" for err in exc.errors()[:5]
    )
