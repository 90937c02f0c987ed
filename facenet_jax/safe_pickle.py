"""A restricted unpickler for data files that are pickles (insightface's verification `.bin`).

A pickle is a program: `pickle.load` of a crafted file can call any importable function. Data
files from the internet are untrusted input, so `load_data_pickle` runs two independent guards:

1. Before anything is executed, every opcode of the stream is read with `pickletools.genops`
   (a parser, it runs nothing) and must be one that builds plain data: strings and bytes
   (Python 2's STRING opcodes included), ints, bools, None, lists and tuples, the memo, and
   GLOBAL/REDUCE/BUILD only for the few globals below. Anything else (INST, OBJ, NEWOBJ, EXT*,
   PERSID, dicts, out-of-band buffers...) is refused, naming the opcode and its byte offset.
2. While loading, `find_class` resolves only these globals, and to our own narrow stand-ins
   (which also refuse attribute writes from BUILD), never to the real objects:
   - `_codecs.encode(text, "latin1")` (how Python 3 writes bytes at protocol 2): latin-1 only;
   - numpy's array reconstruction (`_reconstruct`, `ndarray`, `dtype`, `_frombuffer`) for
     arrays of dtype bool only (is-same flags saved as a numpy array).

3. After loading, the structure's size counted with every shared reference expanded (what a
   walk over it, e.g. `np.asarray`, touches) must not exceed the stream's length in bytes:
   without shared references each item costs at least one byte of the stream, so only a
   crafted file (lists nested deep, each level referencing the one below twice through the
   memo: 2^depth items from a few hundred bytes), or one whose list contains itself, exceeds it.

Every refusal is a `pickle.UnpicklingError` that says what was found and why it is refused.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from collections.abc import Callable
from typing import Any

import numpy as np

# Opcodes that build plain data (plus the three the numpy stand-ins need: GLOBAL, STACK_GLOBAL,
# REDUCE, BUILD; the callables they can reach are only those of _ALLOWED_GLOBALS).
_ALLOWED_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1",
    "LONG4",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BYTEARRAY8",
    "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GET", "BINGET", "LONG_BINGET",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD",
})


class _StandIn:
    """What `find_class` hands the stream for an allowed global: calls `function` (None: not
    callable, a token), and refuses attribute writes, so BUILD cannot modify it."""

    __slots__ = ("_function", "_name")

    def __init__(self, name: str, function: Callable[..., Any] | None = None):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_function", function)

    def __setattr__(self, key: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"refused: the stream modifies {self._name}")

    def __call__(self, *args: Any) -> Any:
        if self._function is None:
            raise pickle.UnpicklingError(f"refused call of {self._name}")
        return self._function(*args)


_NDARRAY = _StandIn("numpy.ndarray")  # only ever an argument of _reconstruct


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as Python 3's protocol-2 pickles use it for bytes, and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"refused _codecs.encode({type(text).__name__}, {encoding!r}): only latin1 text "
            "(Python 3's way of pickling bytes) is allowed")
    return text.encode("latin1")


def _bool_dtype(code: Any, align: bool = False, copy: bool = True) -> np.dtype:
    del align, copy
    if code not in ("b1", b"b1", "?", b"?"):
        raise pickle.UnpicklingError(f"refused numpy dtype {code!r}: only bool arrays (b1) are "
                                     "allowed in these files")
    return np.dtype("b1", copy=True)  # a copy: BUILD's __setstate__ must not touch numpy's own


class _BoolArray(np.ndarray):
    """The only array a stream gets. BUILD's state names a dtype the stream built itself, and
    a stream can BUILD that dtype too (`np.dtype.__setstate__` sets its flags unchecked: a
    bool dtype flagged as holding objects, whose array's bytes numpy would then read as
    pointers). So BUILD's dtype is checked to be bool and replaced by numpy's own."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("refused array state: not numpy's (version, shape, "
                                         "dtype, fortran, data)")
        version, shape, dtype, fortran, raw = state
        if not (isinstance(dtype, np.dtype) and dtype.kind == "b" and dtype.itemsize == 1):
            raise pickle.UnpicklingError(f"refused array of dtype {dtype!r}: bool only")
        if not isinstance(raw, bytes):
            raise pickle.UnpicklingError("refused array data: bool arrays hold raw bytes")
        super().__setstate__((version, shape, np.dtype(bool), fortran, raw))


def _reconstruct(cls: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    """numpy's `_reconstruct(ndarray, (0,), b'b')`: an empty array BUILD then fills (with
    numpy's own bool dtype, see `_BoolArray`)."""
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError(f"refused array reconstruction of {cls!r}")
    return np.ndarray((0,), dtype=bool).view(_BoolArray)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 `_frombuffer` for an in-band bool array."""
    if not isinstance(dtype, np.dtype) or dtype != np.dtype(bool):
        raise pickle.UnpicklingError(f"refused numpy buffer of dtype {dtype!r}: bool only")
    array = np.frombuffer(bytes(buffer), dtype=bool)
    return array.reshape(shape, order="F" if order == "F" else "C").copy().view(_BoolArray)


_ALLOWED_GLOBALS: dict[tuple[str, str], _StandIn] = {
    ("_codecs", "encode"): _StandIn("_codecs.encode", _latin1_encode),
    **{(module, "_reconstruct"): _StandIn(f"{module}._reconstruct", _reconstruct)
       for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _StandIn(f"{module}._frombuffer", _frombuffer)
       for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _StandIn("numpy.dtype", _bool_dtype),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a data file may only hold strings, bytes, "
                "numbers, lists, tuples and bool arrays; this one asks to import code "
                "(a malicious or foreign file)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id: not plain data")


def check_opcodes(data: bytes, source: str = "pickle") -> None:
    """Reads every opcode of the stream without executing any; UnpicklingError at the first
    one that does not build plain data (or at a GLOBAL outside the allowed few)."""
    try:
        for opcode, argument, position in pickletools.genops(data):
            if opcode.name not in _ALLOWED_OPCODES:
                raise pickle.UnpicklingError(
                    f"{source}: refused opcode {opcode.name} at byte {position}: this file "
                    "holds more than strings, lists, tuples and bools (it could run code)")
            if opcode.name == "GLOBAL":
                module, _, name = str(argument).partition(" ")
                if (module, name) not in _ALLOWED_GLOBALS:
                    raise pickle.UnpicklingError(
                        f"{source}: refused global {module}.{name} at byte {position}: a data "
                        "file must not import code (a malicious or foreign file)")
    except ValueError as error:  # genops' own complaints: truncated or corrupt stream
        raise pickle.UnpicklingError(f"{source}: not a readable pickle ({error})") from None


def check_expanded_size(value: Any, limit: int, source: str = "pickle") -> None:
    """UnpicklingError when the lists and tuples of `value` hold more than `limit` items once
    every shared reference is counted again, or contain themselves. O(distinct containers +
    their items): each container is sized once (children before parents), whatever its
    expanded size."""
    sizes: dict[int, int] = {}
    open_containers: set[int] = set()  # on the current path: reached again means a cycle
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, children_sized = stack.pop()
        if not isinstance(node, (list, tuple)) or (not children_sized and id(node) in sizes):
            continue
        if children_sized:
            size = 1 + sum(sizes[id(child)] if isinstance(child, (list, tuple)) else 1
                           for child in node)
            if size > limit:
                raise pickle.UnpicklingError(
                    f"{source}: refused: its lists hold over {limit} items once shared "
                    "references are expanded, more than a file of this size can hold item by "
                    "item (a crafted file: nested lists referencing each other)")
            sizes[id(node)] = size
            open_containers.discard(id(node))
            continue
        if id(node) in open_containers:
            raise pickle.UnpicklingError(f"{source}: refused: a list that contains itself")
        open_containers.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in node)


def load_data_pickle(data: bytes, source: str = "pickle", *, encoding: str = "bytes") -> Any:
    """Unpickles plain data (see the module docstring) from `data`; anything else is a
    `pickle.UnpicklingError` raised before it can run, and a structure larger than the stream
    once shared references are expanded is refused (`check_expanded_size`). `encoding="bytes"`
    reads Python 2 `str` as bytes (how insightface's files must be read). Bool arrays come back
    as `_BoolArray`, an ndarray subclass (np.asarray gives the plain array)."""
    check_opcodes(data, source)
    try:
        value = _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(f"{source}: {error}") from None
    except (EOFError, TypeError, ValueError, AttributeError) as error:
        raise pickle.UnpicklingError(f"{source}: not a readable data pickle ({error})") from None
    check_expanded_size(value, len(data), source)
    return value

