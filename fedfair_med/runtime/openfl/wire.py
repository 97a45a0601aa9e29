"""What crosses between our collaborators and aggregator on top of OpenFL 1.9: names and encodings.

* **A lossless, dtype-preserving codec.** OpenFL's default pipeline casts every tensor to float32;
  FlexFair's group sums, the evaluation summaries and BatchNorm counters would then differ from the
  simulation. :class:`LosslessPipeline` ships raw bytes with ``[dtype code, *shape]`` as metadata.
* **Names on the wire.** OpenFL moves, stores and aggregates every tensor separately (one gRPC
  call and several pandas look-ups per tensor and round; ~0.6 s per round for a 57-tensor UNet,
  measured), so the whole model travels as **one** uint8 tensor :data:`MODEL_BLOB`: the state's raw
  bytes in state-dict order, laid out by :class:`ModelLayout` (both sides build the same network,
  so no header is sent). The server state travels as one serialised tensor :data:`SERVER_STATE`
  beside it, so collaborators receive it with the model; collaborators answer with an empty
  placeholder under that name so OpenFL creates the next round's slot. Everything else a site
  sends in a task — method extras (``extra/<name>``), evaluation summaries (``summary/<attribute>``,
  fixed-size count/sum tables over a vocabulary fixed in the plan), secure aggregation's masked
  tensors — is packed into one self-describing tensor :data:`PACKED` (:func:`pack_arrays`), and the
  aggregator unpacks both before reading a round (:func:`expand_packed`).

Which tasks run in which OpenFL round is :mod:`~fedfair_med.runtime.openfl.schedule`'s business.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from openfl.pipelines.pipeline import TransformationPipeline, Transformer

SERVER_STATE = "__server_state__"
EXTRA_PREFIX = "extra/"
SUMMARY_PREFIX = "summary/"
NUM_SAMPLES = "extra/__num_samples__"
MODEL_TAG, TRAINED_TAG, EXTRA_TAG, SUMMARY_TAG = "model", "trained", "fedfair_extra", "fedfair_summary"
MODEL_BLOB = "fedfair.model"  # the model state, raw bytes in ModelLayout order
PACKED = "fedfair.packed"  # + ":<task>": everything else a site sends in a task (pack_arrays)
#: A site's Poisson-bootstrap tables, sent once with the final evaluation (fairness/bootstrap.py).
BOOTSTRAP_PREFIX = "bootstrap/"
#: The columns of a summary table row, in the order :func:`site_summary` accumulates them.
SUMMARY_FIELDS = ("n", "metric", "score", "n_pos", "score_pos", "metric_pos")

_DTYPES = ["float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "uint64"]  # uint64: secure aggregation's masked fixed-point tensors


class _RawBytes(Transformer):
    """numpy array ⇄ bytes, keeping dtype and shape exactly (lossless)."""

    def __init__(self) -> None:
        self.lossy = False

    def forward(self, data: Any, **kwargs: Any) -> tuple[bytes, dict[str, list[int]]]:
        array = np.array(data, copy=True, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        name = array.dtype.name
        if name not in _DTYPES:
            raise TypeError(f"cannot send a tensor of dtype {name}")
        return array.tobytes(order="C"), {"int_list": [_DTYPES.index(name), *array.shape]}

    def backward(self, data: bytes, metadata: Mapping[str, Any], **kwargs: Any) -> np.ndarray:
        code, *shape = list(metadata["int_list"])
        flat = np.frombuffer(data, dtype=np.dtype(_DTYPES[code]))
        return flat.reshape(tuple(shape)).copy()


class LosslessPipeline(TransformationPipeline):
    """The plan's ``compression_pipeline``: no compression, no float32 cast."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(transformers=[_RawBytes()], **kwargs)


# ---- the model ⇄ one uint8 tensor --------------------------------------------------------------
class ModelLayout:
    """Names, dtypes and shapes of a state dict, in order: the model's wire format, no header."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.entries = [(name, np.dtype(str(t.dtype).removeprefix("torch.")), tuple(t.shape))
                        for name, t in state.items()]
        self.names = [name for name, _, _ in self.entries]
        self.nbytes = sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                          for _, dtype, shape in self.entries)

    def pack(self, state: Mapping[str, Any]) -> np.ndarray:
        out = np.empty(self.nbytes, dtype=np.uint8)
        offset = 0
        for name, dtype, shape in self.entries:
            value = state[name]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if array.dtype != dtype or tuple(array.shape) != shape:
                raise ValueError(f"model tensor {name!r} is {array.dtype}{list(array.shape)}, the "
                                 f"federation's network has {dtype}{list(shape)}")
            raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            out[offset:offset + raw.size] = raw
            offset += raw.size
        return out

    def unpack(self, blob: np.ndarray) -> dict[str, np.ndarray]:
        data = np.asarray(blob, dtype=np.uint8).reshape(-1)
        if data.size != self.nbytes:
            raise ValueError(f"received a model of {data.size} bytes; this federation's network "
                             f"has {self.nbytes} (different network or task options?)")
        out, offset = {}, 0
        for name, dtype, shape in self.entries:
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            out[name] = data[offset:offset + size].view(dtype).reshape(shape).copy()
            offset += size
        return out


# ---- a task's other tensors ⇄ one uint8 tensor --------------------------------------------------
def pack_arrays(arrays: Mapping[tuple[str, str], np.ndarray]) -> np.ndarray:
    """``{(name, tag): array}`` → one uint8 array: an 8-byte header length, a JSON header of
    ``[name, tag, dtype, shape]`` per entry, then the raw bytes in that order."""
    entries, chunks = [], []
    for (name, tag), value in arrays.items():
        array = np.array(value, copy=True, order="C")  # (ascontiguousarray would make 0-d 1-d)
        if array.dtype.name not in _DTYPES:
            raise TypeError(f"cannot send {name!r} of dtype {array.dtype.name}")
        entries.append([name, tag, array.dtype.name, list(array.shape)])
        chunks.append(array.reshape(-1).view(np.uint8))
    header = json.dumps(entries, separators=(",", ":")).encode()
    return np.concatenate([np.frombuffer(len(header).to_bytes(8, "little"), dtype=np.uint8),
                           np.frombuffer(header, dtype=np.uint8), *chunks])


def unpack_arrays(blob: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    data = np.asarray(blob, dtype=np.uint8).reshape(-1)
    if data.size == 0:
        return {}
    length = int.from_bytes(data[:8].tobytes(), "little")
    entries = json.loads(data[8:8 + length].tobytes())
    out, offset = {}, 8 + length
    for name, tag, dtype_name, shape in entries:
        dtype = np.dtype(dtype_name)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out[(name, tag)] = data[offset:offset + size].view(dtype).reshape(shape).copy()
        offset += size
    if offset != data.size:
        raise ValueError(f"packed tensor has {data.size - offset} trailing bytes")
    return out


def expand_packed(rows: Mapping[tuple[str, frozenset], np.ndarray], layout: ModelLayout
                  ) -> dict[tuple[str, frozenset], np.ndarray]:
    """A round's rows with :data:`MODEL_BLOB` and :data:`PACKED` replaced by what they carry.

    A row's tags other than its wire tag (the sending site, for a site's row) stay on every
    tensor unpacked from it; empty placeholders carry nothing.
    """
    out: dict[tuple[str, frozenset], np.ndarray] = {}
    for (name, tags), value in rows.items():
        if name == MODEL_BLOB:
            if np.asarray(value).size:
                out.update({(k, tags): v for k, v in layout.unpack(value).items()})
        elif name.startswith(PACKED):
            wire_tag = {EXTRA_TAG}
            for (inner, tag), array in unpack_arrays(value).items():
                out[(inner, frozenset((tags - wire_tag) | {tag}))] = array
        else:
            out[(name, tags)] = value
    return out


# ---- server state ⇄ one uint8 tensor --------------------------------------------------------
def pack_state(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Serialise a dict of tensors (the method's server state) into one uint8 array."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()


def unpack_state(array: np.ndarray) -> dict[str, torch.Tensor]:
    if array.size == 0:
        return {}
    return torch.load(io.BytesIO(np.asarray(array, dtype=np.uint8).tobytes()), weights_only=True)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().copy()


def to_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))


# ---- evaluation summaries ⇄ fixed-size tables ------------------------------------------------
def summary_to_tables(summary: Mapping[str, Any], vocabularies: Mapping[str, Sequence[str]]
                      ) -> dict[str, np.ndarray]:
    """A :func:`site_summary` as float64 tables: ``overall`` [F] and one [V, F] per attribute
    (F = len(SUMMARY_FIELDS)).

    Groups outside an attribute's vocabulary are refused: the vocabulary is part of the plan so
    every table has the same shape at every site (no value, only counts and sums, travels).
    """
    tables = {"overall": np.array([float(summary["overall"][f]) for f in SUMMARY_FIELDS])}
    for attribute, vocabulary in vocabularies.items():
        table = np.zeros((len(vocabulary), len(SUMMARY_FIELDS)), dtype=np.float64)
        for value, acc in summary["groups"].get(attribute, {}).items():
            if value not in vocabulary:
                raise ValueError(f"attribute {attribute!r} has value {value!r}, which is not in the "
                                 f"federation's vocabulary {list(vocabulary)}")
            table[list(vocabulary).index(value)] = [float(acc[f]) for f in SUMMARY_FIELDS]
        tables[attribute] = table
    return tables


def tables_to_summary(tables: Mapping[str, np.ndarray], vocabularies: Mapping[str, Sequence[str]]
                      ) -> dict[str, Any]:
    """Inverse of :func:`summary_to_tables` (groups with n = 0 were absent and stay absent)."""
    overall = dict(zip(SUMMARY_FIELDS, (float(v) for v in tables["overall"])))
    groups: dict[str, dict[str, dict[str, float]]] = {}
    for attribute, vocabulary in vocabularies.items():
        table = tables.get(attribute)
        if table is None:
            continue
        rows = {value: dict(zip(SUMMARY_FIELDS, (float(v) for v in table[i])))
                for i, value in enumerate(vocabulary) if table[i][0] > 0}
        if rows:
            groups[attribute] = rows
    return {"overall": overall, "groups": groups}
