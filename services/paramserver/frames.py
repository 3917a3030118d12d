"""Answers that carry a shard's tensors, and the buffer that lets them go out without a copy.

A Pull or PushPull answer is its own fields (version, incarnation, the push's result) followed by every tensor
of the shard as a ``NamedTensor``. Framing it the usual way (:func:`frame_answer`) copies every tensor into
the new message once, under the shard's lock, and for a 4 MiB tensor on a busy 2-core machine that copy and
its fresh memory cost more than gRPC's whole transport of it.

A shard whose tensors are all float32 on the wire keeps its parameters in an :class:`AnswerBuffer` instead:
the bytes of such an answer, laid out once, with ``HEAD_BYTES`` reserved in front for the answer's own fields
and the ``padding`` field that fills the rest (field 15 of ``PullResponse`` and ``PushPullResponse``, ignored
by readers), then one ``NamedTensor`` frame per tensor whose data is the parameter itself. The optimizer steps
the parameters where they lie; an answer writes its fields into the reserved bytes and is the buffer's
``bytes``, as they are. While gRPC still holds an answered buffer (it copies the bytes into its own buffers
when it sends them), the parameters move to a fresh buffer (one copy) before they are written again, so no
byte of an answer is ever changed after it was handed out (``native.buffers``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from guardmesh import wire
from guardmesh.v1 import common_pb2
from native.buffers import MessageBuffer

#: Bytes reserved in front of the tensors for an answer's own fields (at most ``HEAD_BYTES - 2`` encoded, or
#: exactly ``HEAD_BYTES``) and the padding field after them.
HEAD_BYTES = 128
_PADDING_TAG = 15 << 3 | wire.LEN


def frame_answer(head: bytes, number: int, items: Sequence[tuple[str, Any, np.ndarray]]) -> bytes:
    """``head`` (the answer's encoded fields) and each ``(name, meta, values)`` as a ``NamedTensor`` of field
    ``number``, data aligned: one copy of every tensor (the answer for a shard without an answer buffer)."""
    frames = wire.Frames(head)
    for name, meta, values in items:
        frames.named_tensor(number, name, meta.dtype, meta.shape, values)
    return frames.join()


def _lay_out(
    tensors: Sequence[tuple[str, tuple[int, ...], int]],
) -> tuple[list[tuple[int, bytes]], list[tuple[str, int, int]], int]:
    """Frame heads (offset, bytes), data (name, offset, elements) and total size of an answer's tensors."""
    heads: list[tuple[int, bytes]] = []
    data: list[tuple[str, int, int]] = []
    at = HEAD_BYTES
    for name, shape, size in tensors:
        head = wire.named_tensor_head(3, name, common_pb2.D_TYPE_FLOAT32, shape, 4 * size, at)
        heads.append((at, head))
        data.append((name, at + len(head), size))
        at += len(head) + 4 * size
    return heads, data, at


class AnswerBuffer:
    """The float32 parameters of a shard, stored as the tensors of an encoded answer (see the module docstring).

    ``arrays`` are the parameters (writable views of the current buffer, in ``tensors`` order). Not
    thread-safe: the shard's lock orders every call and every write to ``arrays``.
    """

    def __init__(self, tensors: Sequence[tuple[str, tuple[int, ...], int]]) -> None:
        """Lay out ``(name, shape, elements)`` tensors in this order; every parameter starts at zero."""
        self._heads, self._data, self.size = _lay_out(tensors)
        #: How many times the parameters moved to a fresh buffer because an answer was still held.
        self.moves = 0
        self.buffer, self.arrays = self._allocate()

    @staticmethod
    def answer_size(tensors: Sequence[tuple[str, tuple[int, ...], int]]) -> int:
        """Bytes of the answer that carries these tensors (what an AnswerBuffer of them takes)."""
        return _lay_out(tensors)[2]

    def _allocate(self) -> tuple[MessageBuffer, dict[str, np.ndarray]]:
        buffer = MessageBuffer(self.size)
        view = memoryview(buffer)
        raw = np.frombuffer(view, np.uint8)
        for at, head in self._heads:
            raw[at : at + len(head)] = np.frombuffer(head, np.uint8)
        arrays = {name: np.frombuffer(view, np.float32, size, offset) for name, offset, size in self._data}
        return buffer, arrays

    def writable(self) -> bool:
        """Make ``arrays`` safe to write: if the buffer was answered and is still held, move the parameters
        into a fresh one (one copy) and return True (``arrays`` are then new views, and the old ones are made
        read-only: nothing can write an answer through a view kept from before); else False."""
        if not self.buffer.shared:
            return False
        buffer, arrays = self._allocate()
        for name, values in arrays.items():
            np.copyto(values, self.arrays[name])
            self.arrays[name].flags.writeable = False
        self.buffer, self.arrays = buffer, arrays
        self.moves += 1
        return True

    def answer(self, number: int, head: bytes) -> bytes | None:
        """The encoded answer: ``head`` (its fields before the tensors, encoded), padding, and every tensor as
        field ``number`` (1 to 15), without a copy; None when the buffer is still held by an earlier answer
        or ``head`` does not fit in ``HEAD_BYTES`` (the caller frames the answer with :func:`frame_answer`)."""
        if not 1 <= number <= 15:
            raise ValueError(f"number must be 1 to 15 (one-byte tags): got {number}")
        rest = HEAD_BYTES - len(head)
        if self.buffer.shared or rest < 0 or rest == 1:
            return None
        raw = np.frombuffer(memoryview(self.buffer), np.uint8)
        raw[: len(head)] = np.frombuffer(head, np.uint8)
        if rest:  # tag, one-byte length (rest - 2 <= 126), zeros
            raw[len(head)] = _PADDING_TAG
            raw[len(head) + 1] = rest - 2
            raw[len(head) + 2 : HEAD_BYTES] = 0
        tag = number << 3 | wire.LEN  # the frames were laid out as field 3: only their one-byte tag differs
        for at, _ in self._heads:
            raw[at] = tag
        return self.buffer.data
