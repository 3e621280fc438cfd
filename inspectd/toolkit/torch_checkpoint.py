"""Read a PyTorch `state_dict` checkpoint into numpy arrays, without PyTorch and without running its code.

A `.pth` file is a pickle, and unpickling runs whatever callables the file names (`os.system` is
one `GLOBAL` opcode away). So this reader never uses the stock unpickler: `_Unpickler.find_class`
hands out only the few names a plain state dict needs, each replaced by an inert stand-in:

- `collections.OrderedDict`: the state dict itself and its (empty) `backward_hooks`;
- `torch._utils._rebuild_tensor_v2`: replaced by `_TensorRef`, which records storage, offset,
  shape and strides and touches no data;
- `torch.<Type>Storage`: replaced by a `_StorageType` that only carries a numpy dtype (it is not
  callable, so a `REDUCE` on it fails).

Everything else (any other module or name, including `torch` objects such as `nn.Module`, whole
pickled models, `numpy` or `builtins` globals) raises `UnsafeCheckpoint` before it is looked up.
Persistent ids (how a tensor points to its storage) become `_Storage` records. The bytes are then
read as numpy arrays, bounds-checked against each storage's size.

Both of PyTorch's layouts are read: the legacy one (`torch.save(..., _use_new_zipfile_serialization=False)`,
used by PyTorch < 1.6: five pickles in a row, then each storage as an int64 element count followed
by its raw bytes) and the zip one (`<name>/data.pkl` plus one `<name>/data/<key>` file per storage).
"""

from __future__ import annotations

__all__ = ["UnsafeCheckpoint", "load_state_dict"]

import collections
import io
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np

from inspectd.errors import ModelFileError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> little-endian numpy dtype (the byte order is checked separately).
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class UnsafeCheckpoint(ModelFileError):
    """The checkpoint names something a plain state dict does not need (it could run code)."""


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: str):
        self.dtype = np.dtype(dtype)


class _Storage:
    __slots__ = ("key", "dtype", "numel", "data")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None  # read after the pickle


class _TensorRef:
    """What `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, [metadata])` would build."""

    __slots__ = ("storage", "offset", "shape", "strides")

    def __init__(self, storage, offset, shape, strides, *_ignored):
        if not isinstance(storage, _Storage):
            raise UnsafeCheckpoint("a tensor does not point to a storage")
        self.storage, self.offset, self.shape, self.strides = storage, int(offset), tuple(shape), tuple(strides)

    def array(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise ModelFileError(f"storage {self.storage.key} has no data in the checkpoint")
        if len(self.shape) != len(self.strides) or any(int(s) < 0 for s in self.shape + self.strides):
            raise ModelFileError(f"storage {self.storage.key}: bad shape {self.shape} / strides {self.strides}")
        if 0 in self.shape:
            return np.zeros(self.shape, data.dtype)
        if math.prod(self.shape) > data.size:  # stride-0 tricks must not make a tensor larger than its storage
            raise ModelFileError(f"storage {self.storage.key}: a {self.shape} tensor from {data.size} elements")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.strides))
        if self.offset < 0 or last >= data.size:
            raise ModelFileError(f"storage {self.storage.key}: tensor reaches element {last} of {data.size}")
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], self.shape, tuple(s * item for s in self.strides), writeable=False
        )
        return np.array(view, order="C")  # a C-contiguous copy that owns its memory


def _rebuild_tensor(*args) -> _TensorRef:
    return _TensorRef(*args)


class _Unpickler(pickle.Unpickler):
    """Restricted unpickler: see the module docstring for what it allows and why."""

    def __init__(self, file, storages: dict[str, _Storage] | None):
        super().__init__(file)
        self.storages = storages  # None: this pickle may not reference storages (the plain headers)

    def find_class(self, module: str, name: str):
        if self.storages is not None:
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return _rebuild_tensor  # a function, not the class: a pickle cannot build one bypassing __init__
            if module == "torch" and name in _STORAGE_DTYPES:
                return _StorageType(_STORAGE_DTYPES[name])
        raise UnsafeCheckpoint(f"checkpoint refers to {module}.{name}: not part of a plain state dict, refused")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata]); view_metadata is legacy only.
        if self.storages is None or not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise UnsafeCheckpoint(f"unexpected persistent id {str(pid)[:80]}")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise UnsafeCheckpoint(f"bad storage reference {str(pid)[:80]}")
        if len(pid) == 6 and pid[5] is not None:
            raise ModelFileError("storage views (PyTorch < 0.4 checkpoints) are not supported")
        storage = self.storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if storage.dtype != storage_type.dtype or storage.numel != numel:
            raise ModelFileError(f"storage {key} is declared twice with different types or sizes")
        return storage


def _load_pickle(data, storages=None):
    try:
        return _Unpickler(data, storages).load()
    except (UnsafeCheckpoint, ModelFileError):
        raise
    except Exception as exc:  # truncated or garbled file: pickle raises many types
        raise ModelFileError(f"not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def _tensors(obj, storages: dict[str, _Storage]) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ModelFileError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    out = {}
    for name, value in obj.items():
        if isinstance(value, _TensorRef):
            try:
                out[str(name)] = value.array()
            except ModelFileError:
                raise
            except Exception as exc:  # numpy on a garbled tensor record: one clear error, not a traceback
                raise ModelFileError(f"tensor {name!s:.60}: unreadable ({type(exc).__name__}: {exc})") from None
    if not out:
        raise ModelFileError("checkpoint holds no tensors")
    return out


def _read_legacy(buf: io.BytesIO) -> dict[str, np.ndarray]:
    if _load_pickle(buf) != _LEGACY_MAGIC:
        raise ModelFileError("not a PyTorch checkpoint (bad magic number)")
    if _load_pickle(buf) != _LEGACY_PROTOCOL:
        raise ModelFileError("unsupported PyTorch legacy checkpoint protocol")
    sys_info = _load_pickle(buf)
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise ModelFileError("big-endian PyTorch checkpoints are not supported")
    storages: dict[str, _Storage] = {}
    obj = _load_pickle(buf, storages)
    keys = _load_pickle(buf)
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise ModelFileError("checkpoint's storage list does not match its tensors")
    raw = buf.getbuffer()
    pos = buf.tell()
    for key in map(str, keys):
        s = storages[key]
        if pos + 8 > len(raw):
            raise ModelFileError("checkpoint is truncated")
        count = int(np.frombuffer(raw, "<i8", 1, pos)[0])
        pos += 8
        if count != s.numel or pos + count * s.dtype.itemsize > len(raw):
            raise ModelFileError(f"storage {key}: {count} elements recorded, {s.numel} expected, or truncated")
        s.data = np.frombuffer(raw, s.dtype, count, pos)
        pos += count * s.dtype.itemsize
    return _tensors(obj, storages)


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ModelFileError(f"{path}: a zip file, but not a PyTorch checkpoint (no single data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() != b"little":
            raise ModelFileError("big-endian PyTorch checkpoints are not supported")
        storages: dict[str, _Storage] = {}
        obj = _load_pickle(io.BytesIO(zf.read(pkl[0])), storages)
        for key, s in storages.items():
            try:
                raw = zf.read(f"{prefix}data/{key}")
            except KeyError:
                raise ModelFileError(f"storage {key} missing from the checkpoint") from None
            if len(raw) < s.numel * s.dtype.itemsize:
                raise ModelFileError(f"storage {key} is truncated")
            s.data = np.frombuffer(raw, s.dtype, s.numel)
    return _tensors(obj, storages)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a PyTorch state-dict checkpoint, by name, as numpy arrays (PyTorch's NCHW layout kept)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    return _read_legacy(io.BytesIO(path.read_bytes()))
