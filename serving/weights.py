"""A graph's large weights, read once, for several ONNX Runtime sessions to share.

Why: a worker can hold two sessions of one graph (serving/cores.py: one thread, and every core
for a call alone), and each session otherwise keeps its own copy of the weights. Given the same
arrays through `SessionOptions.add_initializer`, the second session of a graph of 34 MB of
weights grew a process by under 1 MB (tests/serving/test_runtime.py,
test_the_session_for_calls_alone_shares_the_weights).

The graph is read here, not with the `onnx` package: serving does not install it (its import
alone grows a worker by 12 MB), and three fields of ONNX's protobuf messages are needed (a
tensor's name, shape and raw bytes). What this reader does not understand (external data, typed
fields instead of raw bytes) it leaves in the graph, where ONNX Runtime loads it as before.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Tensors this large or larger are shared; the small ones (shapes, scales, biases) are left in
# the graph, where the optimizer and shape inference read them as constants.
SHARED_MIN_ELEMENTS = 1024
# ONNX TensorProto data types shared: float32 (1), float16 (10), the weights' types.
_DTYPES: dict[int, np.dtype] = {1: np.dtype("<f4"), 10: np.dtype("<f2")}
# Field numbers in onnx.proto: ModelProto.graph, GraphProto.initializer, TensorProto's fields.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_DIMS, _DATA_TYPE, _NAME, _RAW_DATA, _DATA_LOCATION = 1, 2, 8, 9, 14
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# ONNX Runtime's own alignment for tensors it allocates on the CPU (MLAS reads weights in 64-byte
# lines).
ALIGNMENT = 64


def large_weights(model: bytes) -> dict[str, np.ndarray]:
    """The float tensors of SHARED_MIN_ELEMENTS or more among the initializers of a serialized
    ONNX model, by name, each in its own aligned array."""
    found = {}
    view = memoryview(model)
    for field, graph in _fields(view):
        if field != _MODEL_GRAPH or not isinstance(graph, memoryview):
            continue
        for number, tensor in _fields(graph):
            if number == _GRAPH_INITIALIZER and isinstance(tensor, memoryview):
                named = _tensor(tensor)
                if named is not None:
                    found[named[0]] = named[1]
    return found


def _tensor(message: memoryview) -> tuple[str, np.ndarray] | None:
    dims: list[int] = []
    dtype_code, name, raw, external = 0, "", memoryview(b""), False
    for number, value in _fields(message):
        if isinstance(value, int):
            if number == _DIMS:
                dims.append(value)
            elif number == _DATA_TYPE:
                dtype_code = value
            elif number == _DATA_LOCATION:
                external = value == 1
        elif number == _DIMS:  # packed
            dims += _packed_varints(value)
        elif number == _NAME:
            name = bytes(value).decode()
        elif number == _RAW_DATA:
            raw = value
    dtype = _DTYPES.get(dtype_code)
    count = int(np.prod(dims)) if dims else 1
    if external or dtype is None or not name or count < SHARED_MIN_ELEMENTS \
            or len(raw) != count * dtype.itemsize:
        return None
    return name, aligned_copy(raw, dtype, tuple(dims))


def aligned_copy(raw: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """`raw` as an array of `shape` whose data starts on an ALIGNMENT boundary (numpy promises
    16 bytes)."""
    buffer = np.empty(len(raw) + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    target = buffer[start:start + len(raw)]
    target[:] = np.frombuffer(raw, np.uint8)
    return target.view(dtype).reshape(shape)


def _fields(message: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each field of a protobuf message: an int for varints and fixed
    widths, a view of the bytes for length-delimited fields."""
    position, end = 0, len(message)
    while position < end:
        key, position = _varint(message, position)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, position = _varint(message, position)
            yield number, value
        elif wire == _LEN:
            length, position = _varint(message, position)
            yield number, message[position:position + length]
            position += length
        elif wire in (_I64, _I32):
            width = 8 if wire == _I64 else 4
            yield number, int.from_bytes(message[position:position + width], "little")
            position += width
        else:
            raise ValueError(f"protobuf wire type {wire} is not one ONNX writes")


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _packed_varints(data: memoryview) -> list[int]:
    values, position = [], 0
    while position < len(data):
        value, position = _varint(data, position)
        values.append(value)
    return values
