# cython: language_level=3
"""Bytes objects written in place until they are handed out.

The parameter server keeps a shard's float32 parameters inside the encoded answer that carries them
(``services.paramserver.frames``): the optimizer steps the parameters where they lie in the message, and a
Pull or PushPull answers the message's ``bytes`` as they are, without copying the tensors into a new one.
gRPC's Python layer takes only ``bytes`` for a message and copies it into its own buffers when it sends, so
the bytes object is the one place the answer can be built without a copy.

A ``bytes`` object is immutable to Python code. A :class:`MessageBuffer` owns one and lets its owner write it
through the buffer protocol, and only while nothing else refers to it: :attr:`MessageBuffer.shared` is True
while anybody besides the buffer holds the bytes (gRPC does, from the answer until its send completes), and
the owner must not write then. The owner checks it under the lock that orders its writes and answers; the
count can only fall meanwhile (nothing takes a new reference except through the owner), so a False is final
until the owner hands the bytes out again.

The reference count proves that nothing else holds the bytes only where the GIL orders every change to it:
on a free-threaded build (``python3.13t``) :data:`SAFE` is False and the owner must not use this module.
"""

import sys

from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport PyObject, _Py_REFCNT
from libc.string cimport memset


#: Whether ``shared`` is a proof (False on a free-threaded interpreter, where reference counts are not ordered).
SAFE = bool(getattr(sys, "_is_gil_enabled", lambda: True)())


cdef class MessageBuffer:
    """A zero-filled ``bytes`` object of ``size`` bytes, writable through this object's buffer while
    ``shared`` is False (``np.frombuffer(buf, ...)`` gives writable views)."""

    cdef readonly bytes data

    def __cinit__(self, Py_ssize_t size):
        if size < 0:
            raise ValueError(f"size must be >= 0 (got {size})")
        self.data = PyBytes_FromStringAndSize(NULL, size)
        memset(PyBytes_AS_STRING(self.data), 0, size)

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, <void *>PyBytes_AS_STRING(self.data), len(self.data), 0, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    @property
    def shared(self) -> bool:
        """Whether anything besides this buffer refers to its bytes (then they must not be written)."""
        return _Py_REFCNT(<PyObject *>self.data) > 1

    def __len__(self) -> int:
        return len(self.data)
