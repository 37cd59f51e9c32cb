"""Feature pickles in and out, safely and without holding their arrays in memory.

A pickle is a program: `pickle.load` calls whatever globals the file names, so a feature file
from a download can run code. `load` admits only what a feature pickle needs — numpy arrays,
dtypes and scalars, builtin containers and scalars — and refuses anything else with one line
naming the offending global, before it is called (every global goes through `find_class`).

It is built on the pure-Python `pickle._Unpickler` so that the large byte strings holding
array data can be skipped instead of read: their file offset is recorded and the array
comes back as a `FileArray`, a description of where its bytes lie in the pickle file itself.
A MOSEI-sized `unaligned_50.pkl` (several GB of float32) therefore loads in well under a
second and a few MB. `FileArray.blocks` / `rows` read rows on demand through a short-lived
memory map, deliberately not one `np.memmap` over the whole array: pages of a mapping that
stays open count in the process's RSS once touched (measured: one pass over a 512 MB
memmap shows RssFile 524 MB until the map is dropped), so a full pass would show the whole
array as resident.

Protocol-2 pickles (MulT's, and any written for Python 2) carry array data as text: Python 3
writes it as `_codecs.encode(<latin-1 text>, 'latin1')`, the text stored as UTF-8 (bytes above
127 take two), Python 2 as a plain byte string. Neither is read whole either: a Python 2 string
stays in the file like protocol 3's bytes, and the UTF-8 text is decoded a block at a time into a
temporary file (in the system temp folder, removed at exit), which the array then reads from.

`dump` is the mirror image: a protocol-4 pickle that standard `pickle.load` (and so MMSA's
loader) reads, whose arrays may be any object with `shape`, `dtype` and `blocks()` (a
`FileArray`, a generated array, padded rows streamed from a Parquet table), written block by
block, so exporting or generating a MOSEI-sized pickle needs one block of memory. Array
reconstruction is written as `numpy.core.multiarray._reconstruct`, the name every numpy
version (1.x, and 2.x through its compatibility alias) can load.

Bottom layer: imports numpy and pipeline.errors.
"""
from __future__ import annotations

import _compat_pickle
import atexit
import builtins
import codecs
import io
import os
import pickle
import struct
import tempfile
from dataclasses import dataclass

import numpy as np

from ..errors import UserError

LAZY_BYTES = 1 << 20  # array payloads at least this large stay in the file (FileArray)
BLOCK_BYTES = 32 << 20  # rows read or written per block, about this many bytes
SPILL_BYTES = 1 << 18  # protocol-2 array text decoded this many bytes at a time


class UnsafePickle(UserError):
    """The pickle names a global outside the allowed set, or is not a readable pickle."""


# --------------------------------------------------------------------------- arrays left in the file

@dataclass(frozen=True)
class FileArray:
    """An array whose bytes lie in a file at `offset` (C or Fortran order); read by rows on demand."""
    path: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as an ordinary C-order array (a copy; the mapping is closed again)."""
        start, stop = max(0, start), min(stop, self.shape[0])
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        if self.fortran:  # rows are strided through the whole file region
            mapped = np.memmap(self.path, self.dtype, "r", self.offset, self.shape, order="F")
            return np.ascontiguousarray(mapped[start:stop])
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        mapped = np.memmap(self.path, self.dtype, "r", self.offset + start * row_bytes, (stop - start, *self.shape[1:]))
        return np.array(mapped)

    def blocks(self):
        yield from row_blocks(self)

    def __array__(self, dtype=None, copy=None):
        whole = self.rows(0, self.shape[0]) if self.shape else np.array(self.rows(0, 1))
        return whole if dtype is None else whole.astype(dtype)


def block_rows(array) -> int:
    """How many leading-axis rows make about BLOCK_BYTES."""
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * np.dtype(array.dtype).itemsize)
    return max(1, BLOCK_BYTES // row_bytes)


def row_blocks(array):
    """C-order blocks of rows of an ndarray or FileArray, about BLOCK_BYTES each."""
    step = block_rows(array)
    for start in range(0, max(len(array), 0), step):
        yield array.rows(start, start + step) if isinstance(array, FileArray) else \
            np.ascontiguousarray(array[start:start + step])


# --------------------------------------------------------------------------- loading

@dataclass(frozen=True)
class _Span:
    """A byte string left in a file: `length` bytes at `offset` of the pickle (path None) or of a spill file."""
    offset: int
    length: int
    path: str | None = None
    text: bool = False    # a Python 2 string: latin-1 text where it turns out not to be an array's data

    def read(self, pickle_path: str):
        with open(self.path or pickle_path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        return data.decode("latin1") if self.text else data


_SPILLED: list[str] = []  # temp files holding protocol-2 array data, removed at exit


@atexit.register
def _remove_spilled() -> None:
    while _SPILLED:
        try:
            os.unlink(_SPILLED.pop())
        except OSError:
            pass


class _PendingArray:
    """What `_reconstruct` returns; BUILD replaces it by the array its state describes."""


def _reconstruct(subtype, shape, typecode):
    if subtype is not np.ndarray:
        raise UnsafePickle(f"array subclass {subtype!r} is not allowed")
    return _PendingArray()


def _latin1_encode(text, encoding="utf-8"):
    """`_codecs.encode` as protocol-2 pickles use it for bytes: latin-1 only (a spilled span is that already)."""
    if encoding != "latin1" or not isinstance(text, (str, _Span)):
        raise UnsafePickle(f"_codecs.encode({encoding!r}) is not allowed (latin1 only)")
    return text if isinstance(text, _Span) else text.encode("latin1")


_SCALAR = np.float32(0).__reduce__()[0]  # numpy's scalar reconstructor, whatever module holds it
_ALLOWED = {  # (module, name) -> what find_class returns
    **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): "frombuffer" for m in ("numpy.core.numeric", "numpy._core.numeric")},
    **{(m, "scalar"): _SCALAR for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): dict,
    **{("builtins", name): getattr(builtins, name) for name in (
        "set", "frozenset", "bytearray", "bytes", "complex", "list", "dict", "tuple", "str", "int", "float", "bool")},
}
_ALLOWED_WORDS = "numpy arrays, dtypes and scalars, builtin containers and scalars"


class _RestrictedUnpickler(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: str):
        super().__init__(file, encoding="latin1")  # latin1: python-2 numpy pickles, as numpy documents
        self._file, self._path = file, path
        self._size = os.fstat(file.fileno()).st_size

    def find_class(self, module, name):
        if self.proto < 3:  # python-2 names (__builtin__.set, ...), as the standard unpickler maps them
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        target = _ALLOWED.get((module, name))
        if target is None:
            hint = " (a torch tensor: save numpy arrays instead, e.g. MMSA-FET return_type='np')" \
                if module.startswith("torch") else ""
            raise UnsafePickle(f"{self._path}: refers to the global {module}.{name}, which a feature pickle may not "
                               f"use (allowed: {_ALLOWED_WORDS}){hint}; nothing was run")
        if target == "frombuffer":
            return self._frombuffer
        return target

    # large byte strings: remember where they are instead of reading them
    def _bytes(self, length: int, mutable: bool = False):
        if length < LAZY_BYTES or self._in_frame():
            data = self.read(length)
            if len(data) < length:
                raise UnsafePickle(f"{self._path}: truncated (a byte string runs past the end of the file)")
            return bytearray(data) if mutable else data
        offset = self._file.tell()
        if offset + length > self._size:
            raise UnsafePickle(f"{self._path}: truncated (an array of {length} bytes runs past the end of the file)")
        self._file.seek(length, io.SEEK_CUR)
        return _Span(offset, length)

    def _in_frame(self) -> bool:
        frame = self._unframer.current_frame
        return frame is not None and frame.tell() < len(frame.getbuffer())

    def load_binunicode(self):
        """Text; the large latin-1 text a protocol-2 array's data is (an argument of _codecs.encode) is spilled."""
        length = struct.unpack("<I", self.read(4))[0]
        if length >= LAZY_BYTES and not self._in_frame() and self.stack and self.stack[-1] is _latin1_encode:
            self.append(self._spill(length))
            return
        data = self.read(length)
        if len(data) < length:
            raise UnsafePickle(f"{self._path}: truncated (a string runs past the end of the file)")
        self.append(str(data, "utf-8", "surrogatepass"))
    dispatch[pickle.BINUNICODE[0]] = load_binunicode

    def load_binstring(self):
        """A Python 2 string: a large one (an array's data) stays in the file."""
        length = struct.unpack("<i", self.read(4))[0]
        if length < 0:
            raise UnsafePickle(f"{self._path}: a string of negative length")
        if length < LAZY_BYTES or self._in_frame():
            data = self.read(length)
            if len(data) < length:
                raise UnsafePickle(f"{self._path}: truncated (a string runs past the end of the file)")
            self.append(self._decode_string(data))
            return
        offset = self._file.tell()
        if offset + length > self._size:
            raise UnsafePickle(f"{self._path}: truncated (an array of {length} bytes runs past the end of the file)")
        self._file.seek(length, io.SEEK_CUR)
        self.append(_Span(offset, length, text=True))
    dispatch[pickle.BINSTRING[0]] = load_binstring

    def _spill(self, length: int) -> _Span:
        """UTF-8 text of latin-1 characters (protocol-2 array data) -> their bytes in a temp file, a block at a time."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        fd, path = tempfile.mkstemp(prefix="msa-pickle-", suffix=".bin")
        _SPILLED.append(path)
        written, left = 0, length
        with os.fdopen(fd, "wb") as out:
            while left:
                chunk = self._file.read(min(left, SPILL_BYTES))
                if not chunk:
                    raise UnsafePickle(f"{self._path}: truncated (an array's text runs past the end of the file)")
                left -= len(chunk)
                try:
                    data = decoder.decode(chunk, final=not left).encode("latin1")
                except (UnicodeDecodeError, UnicodeEncodeError):
                    raise UnsafePickle(f"{self._path}: _codecs.encode of text that is not latin-1") from None
                out.write(data)
                written += len(data)
        return _Span(0, written, path)

    def load_binbytes(self):
        self.append(self._bytes(struct.unpack("<I", self.read(4))[0]))
    dispatch[pickle.BINBYTES[0]] = load_binbytes

    def load_binbytes8(self):
        self.append(self._bytes(struct.unpack("<Q", self.read(8))[0]))
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8

    def load_bytearray8(self):
        self.append(self._bytes(struct.unpack("<Q", self.read(8))[0], mutable=True))
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

    def load_build(self):
        if not isinstance(self.stack[-2], _PendingArray):
            return super().load_build()
        state = self.stack.pop()
        pending = self.stack[-1]
        shape, dtype, fortran, raw = state[-4:]  # (version,) shape, dtype, is_fortran, data
        array = self._array(raw, np.dtype(dtype), tuple(shape), bool(fortran))
        self.stack[-1] = array
        for key, value in self.memo.items():  # a later reference to this array gets the array
            if value is pending:
                self.memo[key] = array
    dispatch[pickle.BUILD[0]] = load_build

    def _frombuffer(self, buffer, dtype, shape, order):
        """Protocol 5's array reconstruction."""
        return self._array(buffer, np.dtype(dtype), tuple(shape), order == "F")

    def _array(self, raw, dtype: np.dtype, shape: tuple, fortran: bool):
        if isinstance(raw, _Span):
            if dtype.hasobject:
                raise UnsafePickle(f"{self._path}: an object array stored as raw bytes")
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if raw.length != expected:
                raise UnsafePickle(f"{self._path}: array of shape {shape} {dtype} holds {raw.length} bytes, "
                                   f"expected {expected}")
            return FileArray(raw.path or self._path, raw.offset, dtype, shape, fortran)
        if isinstance(raw, (bytes, bytearray)) and not dtype.hasobject:
            flat = np.frombuffer(raw, dtype, count=int(np.prod(shape, dtype=np.int64)))
            return flat.reshape(shape, order="F" if fortran else "C").copy()
        array = np.ndarray.__new__(np.ndarray, (0,), "b")  # object arrays: numpy's own state setter
        array.__setstate__((1, shape, dtype, fortran, raw))
        return array


def load(path: str | os.PathLike):
    """The object in a feature pickle; arrays of 1 MiB and more come back as FileArray."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return _resolve(_RestrictedUnpickler(f, path).load(), path)
    except UnsafePickle:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error, IndexError, KeyError) as err:
        raise UnsafePickle(f"{path}: not a readable feature pickle ({type(err).__name__}: {err})") from None


def _resolve(obj, path: str):
    """A large string left in the file that turned out not to be an array's data: read it after all."""
    if isinstance(obj, _Span):
        return obj.read(path)
    if isinstance(obj, dict):
        return {k: _resolve(v, path) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, path) for v in obj)
    return obj


# --------------------------------------------------------------------------- writing

class _Global:
    """A global written by name (callable, as save_reduce requires of a reduce function)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise TypeError("a name to write, not to call")


_RECONSTRUCT = _Global("numpy.core.multiarray", "_reconstruct")


class _Payload:
    """An array's bytes, written block by block."""

    def __init__(self, array):
        self.array = array


def _is_array(obj) -> bool:
    return (isinstance(obj, (np.ndarray, FileArray)) or hasattr(obj, "blocks")) and not np.dtype(obj.dtype).hasobject


class _StreamingPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def reducer_override(self, obj):
        if isinstance(obj, (np.generic, _Global, _Payload)) or not _is_array(obj):
            return NotImplemented
        state = (1, tuple(int(s) for s in obj.shape), np.dtype(obj.dtype), False, _Payload(obj))
        return _RECONSTRUCT, (np.ndarray, (0,), b"b"), state

    def save_global_name(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    dispatch[_Global] = save_global_name

    def save_payload(self, payload):
        array = payload.array
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
        header = pickle.BINBYTES8 + struct.pack("<Q", nbytes) if nbytes > 0xFFFFFFFF else \
            pickle.BINBYTES + struct.pack("<I", nbytes)
        self.framer.write_large_bytes(header, b"")  # ends the current frame; the payload goes outside frames
        written = 0
        blocks = array.blocks() if hasattr(array, "blocks") else row_blocks(array)
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=array.dtype)
            self.framer.file_write(memoryview(block).cast("B"))
            written += block.nbytes
        if written != nbytes:
            raise ValueError(f"array of shape {array.shape} produced {written} bytes, expected {nbytes}")
    dispatch[_Payload] = save_payload


def dump(obj, path: str | os.PathLike) -> None:
    """Write `obj` (dicts, lists, str, numbers, arrays or lazy arrays) as a protocol-4 pickle, atomically."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            _StreamingPickler(f, protocol=4).dump(obj)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)  # no half-written pickle left behind (a full disk)
        if isinstance(err, OSError) and err.errno and err.filename in (None, tmp):
            raise type(err)(err.errno, err.strerror, path) from None  # name the file meant
        raise
