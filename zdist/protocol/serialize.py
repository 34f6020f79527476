"""Turning Python values into (blob, buffers) and back; no sockets here.

A value becomes a small pickle *blob* plus zero or more out-of-band *buffers*
(pickle protocol 5), so that a NumPy array's memory is never copied into the
blob: each buffer travels as its own frame. Plain ``bytes``/``bytearray``/
``memoryview`` values are sent as a buffer directly.

Functions, lambdas and closures go through cloudpickle. Plain data goes through
the (faster) standard pickle, falling back to cloudpickle for objects that the
standard pickle can only refer to by a name the receiver may not know
(anything defined in ``__main__``).

>>> import numpy as np
>>> s = serialize(np.arange(100_000))
>>> len(s.blob) < 200, [b.nbytes for b in s.buffers]
(True, [800000])
>>> deserialize(s.kind, s.blob, s.buffers).sum()
np.int64(4999950000)
"""
from __future__ import annotations

import importlib
import io
import pickle
import sys
import types
from collections import OrderedDict
from typing import Any, Sequence

import cloudpickle

#: Buffers smaller than this stay inside the pickle blob: copying them is
#: cheaper than the bookkeeping of an extra frame.
OUT_OF_BAND_THRESHOLD = 2**14

PICKLE = "p"  # standard pickle, protocol 5
CLOUDPICKLE = "c"  # cloudpickle (__main__ objects, lambdas inside containers)
FUNCTION = "f"  # cloudpickle of a function, cached on both sides
QUICK_PICKLE = "q"  # standard pickle of a type that vouches it unpickles quickly (see is_quick_to_load)
RAW = "b"  # a bytes-like value sent as its buffer: bytes
RAW_BYTEARRAY = "a"
RAW_MEMORYVIEW = "m"

_RAW_KINDS = {bytes: RAW, bytearray: RAW_BYTEARRAY, memoryview: RAW_MEMORYVIEW}


class Serialized:
    """A value already turned into a pickle blob and its out-of-band buffers.

    The message encoder sends these as they are, so a caller can serialize a
    value early (to catch an unpicklable result before replying) without
    paying for it twice.
    """

    __slots__ = ("kind", "blob", "buffers")

    def __init__(self, kind: str, blob: bytes, buffers: Sequence[memoryview]):
        self.kind = kind
        self.blob = blob
        self.buffers = buffers

    @property
    def nbytes(self) -> int:
        return len(self.blob) + sum(memoryview(b).nbytes for b in self.buffers)

    def __repr__(self) -> str:
        return f"<Serialized kind={self.kind!r} nbytes={self.nbytes}>"


def _buffer_callback(buffers: list):
    def callback(pickle_buffer: pickle.PickleBuffer) -> bool:
        view = pickle_buffer.raw()
        if view.nbytes < OUT_OF_BAND_THRESHOLD:
            return True  # keep small buffers in band
        buffers.append(view)
        return False

    return callback


_FUNCTION_CACHE: "OrderedDict[int, tuple[Any, bytes]]" = OrderedDict()
_FUNCTION_CACHE_SIZE = 512


def dumps_function(func: Any) -> bytes:
    """cloudpickle a function once; later calls with the same object are free.

    The cache holds the function itself so that its id cannot be reused by
    another object while the entry lives.
    """
    entry = _FUNCTION_CACHE.get(id(func))
    if entry is not None and entry[0] is func:
        return entry[1]
    blob = cloudpickle.dumps(func, protocol=5)
    _FUNCTION_CACHE[id(func)] = (func, blob)
    if len(_FUNCTION_CACHE) > _FUNCTION_CACHE_SIZE:
        _FUNCTION_CACHE.popitem(last=False)
    return blob


_LOADED_FUNCTIONS: "OrderedDict[bytes, Any]" = OrderedDict()

#: Modules seen fully imported, with all their parent packages: the fast path.
_IMPORTED: set[str] = set()


def _initializing(module: Any) -> bool:
    return getattr(getattr(module, "__spec__", None), "_initializing", False)


def _import_whole(module: str) -> None:
    """Import ``module`` and each package above it, waiting for any other thread importing one.

    Why: a worker unpickles in several threads at once. While one thread is
    inside ``import dask.array`` (which registers NumPy with dask's dispatch
    tables last), another can find ``dask.array.core`` already in
    ``sys.modules`` and call into it before that registration ran ("No dispatch
    for <class 'numpy.ndarray'>"). ``import_module`` of a package that is still
    initialising waits for the thread importing it.
    """
    if module in _IMPORTED:
        return
    parts = module.split(".")
    for end in range(1, len(parts) + 1):
        name = ".".join(parts[:end])
        loaded = sys.modules.get(name)
        if loaded is None or _initializing(loaded):
            importlib.import_module(name)
    _IMPORTED.add(module)


class _Unpickler(pickle.Unpickler):
    """The standard unpickler, but a global's module (and its packages) are imported whole first."""

    def find_class(self, module: str, name: str) -> Any:
        _import_whole(module)
        return super().find_class(module, name)


def loads(blob: Any, buffers: Sequence[Any] = ()) -> Any:
    """``pickle.loads`` that is safe while other threads import the same packages.

    >>> loads(pickle.dumps({"a": [1, 2]}))
    {'a': [1, 2]}
    """
    if isinstance(blob, (bytes, bytearray)) and _STACK_GLOBAL not in blob:
        return pickle.loads(blob, buffers=buffers)  # no global to look up: nothing to import
    return _Unpickler(io.BytesIO(blob), buffers=buffers).load()


_STACK_GLOBAL = pickle.STACK_GLOBAL  # protocol 4 and 5 name every global this way


def loads_function(blob: bytes) -> Any:
    """Unpickle a function, caching by its pickle so a worker loads it once."""
    blob = bytes(blob)
    func = _LOADED_FUNCTIONS.get(blob)
    if func is None:
        func = loads(blob)  # cloudpickle's output is a standard pickle
        _LOADED_FUNCTIONS[blob] = func
        if len(_LOADED_FUNCTIONS) > _FUNCTION_CACHE_SIZE:
            _LOADED_FUNCTIONS.popitem(last=False)
    return func


def is_quick_to_load(kind: str, blob: Any) -> bool:
    """Whether :func:`deserialize` of this payload can neither import a module nor run a reduce function.

    Such a payload is safe to load on an event loop: raw bytes, a function
    this process has loaded before, a pickle of plain data (protocol 5 names
    every global it needs with ``STACK_GLOBAL``; a pickle without one calls
    nothing), or a value whose type says so with a true
    ``zdist_quick_to_load`` class attribute (a container that unpickles its
    contents later, in the thread that uses them, as
    :class:`zdist.dask.tasks.TaskBatch` does; its ``__reduce__`` must name
    only globals that a worker can import, never ``__main__``). Anything
    else may take seconds (the first unpickling of a class whose module
    imports a large package): a worker loads it off its event loop, so that
    its heartbeats go on meanwhile.

    >>> is_quick_to_load(PICKLE, pickle.dumps({"a": [1, 2.5]}, protocol=5))
    True
    >>> is_quick_to_load(PICKLE, pickle.dumps(OrderedDict(), protocol=5))
    False
    """
    if kind == PICKLE:
        return _STACK_GLOBAL not in blob
    if kind == FUNCTION:
        return bytes(blob) in _LOADED_FUNCTIONS
    return kind in (QUICK_PICKLE, RAW, RAW_BYTEARRAY, RAW_MEMORYVIEW)


def serialize(obj: Any) -> Serialized:
    """Serialize one value into a blob and out-of-band buffers.

    Raises ``pickle.PicklingError`` (or whatever pickling raised) when the
    value cannot be serialized at all.
    """
    if isinstance(obj, Serialized):
        return obj
    raw_kind = _RAW_KINDS.get(type(obj))
    if raw_kind is not None:
        return Serialized(raw_kind, b"", [memoryview(obj)])
    if isinstance(obj, (types.FunctionType, types.MethodType, types.LambdaType)):
        return Serialized(FUNCTION, dumps_function(obj), ())
    buffers: list = []
    if getattr(type(obj), "zdist_quick_to_load", False) is True:
        blob = pickle.dumps(obj, protocol=5, buffer_callback=_buffer_callback(buffers))
        return Serialized(QUICK_PICKLE, blob, buffers)
    try:
        blob = pickle.dumps(obj, protocol=5, buffer_callback=_buffer_callback(buffers))
    except Exception:
        blob = None
    if blob is None or b"__main__" in blob:
        # The standard pickle refers to __main__ objects by name (useless on
        # another process) and cannot pickle lambdas inside containers.
        buffers = []
        blob = cloudpickle.dumps(obj, protocol=5, buffer_callback=_buffer_callback(buffers))
        return Serialized(CLOUDPICKLE, blob, buffers)
    return Serialized(PICKLE, blob, buffers)


def deserialize(kind: str, blob: bytes, buffers: Sequence[Any] = ()) -> Any:
    """Inverse of :func:`serialize`; arrays are built on ``buffers`` without a copy."""
    if kind == PICKLE or kind == QUICK_PICKLE:
        return loads(blob, buffers)
    if kind == FUNCTION:
        return loads_function(blob)
    if kind == CLOUDPICKLE:
        return loads(blob, buffers)
    if kind == RAW:
        return bytes(buffers[0])
    if kind == RAW_BYTEARRAY:
        return bytearray(buffers[0])
    if kind == RAW_MEMORYVIEW:
        return memoryview(buffers[0])
    raise ValueError(f"unknown serialization kind {kind!r}")
