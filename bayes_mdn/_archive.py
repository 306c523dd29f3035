"""A file format for nested state that never runs code when read.

An archive is a safetensors file: the tensors, plus a JSON header (kept in the safetensors
metadata) holding everything else, with each tensor replaced by a reference. Reading it
parses JSON and raw little-endian tensor bytes, nothing else: unlike pickle (even torch's
restricted ``weights_only`` unpickler) no object constructor is ever looked up. A SHA-256
digest over the header and every tensor's bytes catches corruption that keeps the layout
valid (a flipped bit inside a weight).

A file from a stranger is read within bounded memory: the layout safetensors declares is
checked against the file's real size before any tensor byte is read, the header's nesting
is bounded, and a reader's ``check`` can refuse the declared contents (say, a network far
larger than the tensors stored for it) before anything is built from them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as _st_save

from ._files import atomic_path

__all__ = ["ModelFileError", "TensorSpec", "pack", "read_archive", "unpack", "write_archive"]

_MAGIC = "bayes_mdn"
_TENSOR = "__tensor__"
_PAIRS = "__pairs__"
_TUPLE = "__tuple__"
_FLOAT = "__float__"
_MARKERS = {_TENSOR, _PAIRS, _TUPLE, _FLOAT}
# The safetensors header is an 8-byte length and that many bytes of JSON; anything larger
# than this is not a file we wrote, and reading it whole could exhaust memory.
_MAX_HEADER = 100 * 2**20
# Our headers nest a dozen levels at most (optimizer state in a checkpoint is the
# deepest); a deeper one is hostile, and unpacking it would exhaust the stack.
_MAX_DEPTH = 64


class ModelFileError(ValueError):
    """A file is not a readable bayes_mdn archive: wrong kind, wrong version, truncated,
    corrupted or incompatible. Nothing from such a file is executed."""


def pack(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace every tensor in nested dicts, lists and tuples by a reference.

    The tensors land in ``tensors`` (detached, contiguous, on the CPU); the returned
    structure is JSON-serializable when the leaves are str, int, float, bool or None.
    Dicts with non-string keys (optimizer state is keyed by int) become lists of pairs
    so that the keys keep their type; tuples stay tuples. JSON has no infinity, so an
    infinite float (an early-stopping score before the first epoch) is spelled out; a
    NaN raises ``ValueError``: it is never stored.
    """
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (_MARKERS & set(obj)):
            return {k: pack(v, tensors, prefix) for k, v in obj.items()}
        return {
            _PAIRS: [[pack(k, tensors, prefix), pack(v, tensors, prefix)] for k, v in obj.items()]
        }
    if isinstance(obj, tuple):
        return {_TUPLE: [pack(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [pack(v, tensors, prefix) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        if math.isnan(obj):
            raise ValueError("refusing to store a NaN number")
        return {_FLOAT: "inf" if obj > 0 else "-inf"}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store an object of type {type(obj).__name__} in an archive")


def unpack(obj: Any, tensors: Mapping[str, Any]) -> Any:
    """Inverse of :func:`pack`.

    Raises :class:`ModelFileError` for a structure :func:`pack` never makes: a reference
    to a missing tensor, a malformed marker, or nesting deeper than ``_MAX_DEPTH``.
    """
    return _unpack(obj, tensors, 0)


def _unpack(obj: Any, tensors: Mapping[str, Any], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ModelFileError(
            f"the header nests deeper than {_MAX_DEPTH} levels; bayes_mdn never writes that"
        )
    depth += 1
    if isinstance(obj, dict):
        if _TENSOR in obj:
            key = obj[_TENSOR]
            if not isinstance(key, str) or key not in tensors:
                raise ModelFileError(f"the header refers to a tensor {key!r} the file lacks")
            return tensors[key]
        if _PAIRS in obj:
            pairs = obj[_PAIRS]
            if not (isinstance(pairs, list) and all(_is_pair(p) for p in pairs)):
                raise ModelFileError("a list of key-value pairs in the header is malformed")
            return {
                _hashable(_unpack(k, tensors, depth)): _unpack(v, tensors, depth) for k, v in pairs
            }
        if _TUPLE in obj:
            if not isinstance(obj[_TUPLE], list):
                raise ModelFileError("a tuple in the header is malformed")
            return tuple(_unpack(v, tensors, depth) for v in obj[_TUPLE])
        if _FLOAT in obj:
            if obj[_FLOAT] not in ("inf", "-inf"):
                raise ModelFileError(f"unreadable number in the header: {obj[_FLOAT]!r}")
            return float(obj[_FLOAT])
        return {k: _unpack(v, tensors, depth) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors, depth) for v in obj]
    return obj


def _is_pair(item: Any) -> bool:
    return isinstance(item, list) and len(item) == 2


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, tuple, torch.Tensor, TensorSpec)):
        raise ModelFileError(f"a dictionary key in the header is not a scalar: {key!r}"[:300])
    return key


def _digest(header: str, items: Iterable[tuple[str, torch.dtype, tuple[int, ...], Any]]) -> str:
    """SHA-256 over the header text and each tensor's name, dtype, shape and bytes.

    ``items`` yields (name, dtype, shape, bytes-like), in any order.
    """
    h = hashlib.sha256(header.encode())
    for name, dtype, shape, data in sorted(items, key=lambda item: item[0]):
        h.update(f"\0{name}\0{dtype}\0{tuple(shape)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _tensor_items(
    tensors: Mapping[str, torch.Tensor],
) -> Iterator[tuple[str, torch.dtype, tuple[int, ...], bytes]]:
    for name, t in tensors.items():
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        yield name, t.dtype, tuple(t.shape), data


def write_archive(
    path: str | os.PathLike[str], kind: str, version: int, header: dict[str, Any]
) -> None:
    """Atomically write ``header`` (nested, may hold tensors) as an archive of ``kind``.

    Raises ``ValueError`` before writing anything when a floating tensor or a float in
    the header is NaN or infinite: a non-finite model is never saved.
    """
    tensors: dict[str, torch.Tensor] = {}
    try:
        packed = pack(header, tensors)
    except ValueError as err:
        raise ValueError(f"refusing to write {kind} to {os.fspath(path)!r}: {err}") from err
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"refusing to write {kind} to {os.fspath(path)!r}: tensor {name} holds NaN or "
                "infinite values"
            )
    text = json.dumps(packed, allow_nan=False)
    metadata = {
        "format": _MAGIC,
        "kind": kind,
        "version": str(version),
        "header": text,
        "sha256": _digest(text, _tensor_items(tensors)),
    }
    blob = _st_save(tensors, metadata=metadata)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())


@dataclass(frozen=True)
class TensorSpec:
    """What the file declares about one stored tensor, before its bytes are read.

    :func:`read_archive` hands a header holding these in place of the tensors to its
    ``check``, so the declared contents can be judged before anything is allocated.
    """

    dtype: torch.dtype
    shape: tuple[int, ...]


# The tensor types safetensors defines that torch reads everywhere (the float8 types
# are left out: bayes_mdn never writes them).
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_archive(
    path: str | os.PathLike[str],
    kind: str,
    version: int,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Read an archive written by :func:`write_archive` with the same ``kind``/``version``.

    Memory stays bounded by what the file really holds: the layout is read and checked
    first (the header length against the file's size, every tensor's declared type,
    shape and byte range against the data that follows, with nothing left over), then
    the header is parsed, then ``check`` judges it, and only then are the tensor bytes
    read, once.

    Parameters
    ----------
    path : the archive
    kind, version : what the file must be
    check : called with the header as it will be returned, but with a
        :class:`TensorSpec` in place of each tensor, before any tensor byte is read; it
        raises to refuse the file (say, when the declared sizes do not match what the
        header describes)

    Returns
    -------
    The header, with tensors on the CPU.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    IsADirectoryError
        When ``path`` is a folder.
    ModelFileError
        For anything that is not such an archive (a device, a pipe, another file).
    """
    where = repr(os.fspath(path))
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        # Non-blocking, so that opening a named pipe does not wait for a writer.
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {where}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(f"{where} is a folder, not a bayes_mdn {kind} file")
        raise ModelFileError(
            f"{where} is not a regular file ({_file_type(info.st_mode)}), so not a "
            f"bayes_mdn {kind} file"
        )
    with open(fd, "rb", buffering=0) as fh:
        size = info.st_size
        layout, meta = _read_layout(fh, size, where, kind, version)
        text = meta.get("header", "")
        header = _parse_header(text, where)
        if check is not None:
            specs = {name: TensorSpec(e.dtype, e.shape) for name, e in layout.items()}
            check(_unpack_file(header, specs, where))
        start = size - sum(e.end - e.begin for e in layout.values())
        fh.seek(start)
        data = _read_exactly(fh, size - start, where)
    chunks = {name: memoryview(data)[e.begin : e.end] for name, e in layout.items()}
    items = ((name, e.dtype, e.shape, chunks[name]) for name, e in layout.items())
    if _digest(text, items) != meta.get("sha256"):
        raise ModelFileError(f"{where} is corrupted: its checksum does not match its contents")
    tensors = {name: _tensor(chunks[name], e) for name, e in layout.items()}
    return _unpack_file(header, tensors, where)


def _unpack_file(header: Any, tensors: Mapping[str, Any], where: str) -> Any:
    try:
        return unpack(header, tensors)
    except ModelFileError as err:
        raise ModelFileError(f"{where} is corrupted: {err}") from None


def _read_exactly(fh: Any, n: int, where: str) -> bytearray:
    """``n`` bytes from the raw file ``fh``; one read() returns at most about 2 GiB on
    Linux, and fewer than asked when the file shrank meanwhile."""
    data = bytearray(n)
    view = memoryview(data)
    done = 0
    while done < n:
        got = fh.readinto(view[done:])
        if not got:
            raise ModelFileError(f"{where} changed size while it was read")
        done += got
    return data


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def _read_layout(
    fh: Any, size: int, where: str, kind: str, version: int
) -> tuple[dict[str, _Entry], dict[str, str]]:
    """The safetensors layout (tensor entries by name) and metadata, checked against the
    file's size before the tensor bytes are touched."""
    prefix = fh.read(8) if size >= 8 else b""
    if len(prefix) < 8:
        raise ModelFileError(f"{where} is not a bayes_mdn {kind} file: only {size} bytes")
    n = int.from_bytes(prefix, "little")
    if n > min(_MAX_HEADER, size - 8):
        raise ModelFileError(
            f"{where} is not a bayes_mdn {kind} file, or is truncated: its first bytes "
            f"announce a header of {n} bytes, but the file holds {size - 8} after them"
        )
    raw = _read_exactly(fh, n, where)
    try:
        outer = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ModelFileError(f"{where} is not a bayes_mdn {kind} file: unreadable header") from err
    if not isinstance(outer, dict):
        raise ModelFileError(
            f"{where} is not a bayes_mdn {kind} file: its header is a "
            f"{type(outer).__name__}, not a JSON object"
        )
    meta = outer.get("__metadata__")
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ModelFileError(
            f"{where} is not a bayes_mdn {kind} file: its __metadata__ is not a mapping of "
            "names to strings"
        )
    if meta.get("format") != _MAGIC or meta.get("kind") != kind:
        raise ModelFileError(
            f"{where} is not a bayes_mdn {kind} file (format {meta.get('format')!r}, "
            f"kind {meta.get('kind')!r})"
        )
    if meta.get("version") != str(version):
        raise ModelFileError(
            f"{where} has {kind} format version {meta.get('version')!r}; this bayes_mdn "
            f"reads version {version}. Load it with the library version that wrote it "
            f"({_library_version(meta)})"
        )
    data_size = size - 8 - n
    layout = {
        name: _entry(name, spec, data_size, where)
        for name, spec in outer.items()
        if name != "__metadata__"
    }
    # The data must be the declared tensors back to back, nothing missing or left over,
    # as safetensors writes it (and requires when it reads).
    position = 0
    for name, e in sorted(layout.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != position:
            raise ModelFileError(
                f"{where} is truncated or corrupted: tensor {name!r} starts at byte {e.begin} "
                f"of the data, expected {position}"
            )
        position = e.end
    if position != data_size:
        raise ModelFileError(
            f"{where} is truncated or corrupted: its tensors declare {position} bytes of "
            f"data, the file holds {data_size}"
        )
    return layout, meta


def _entry(name: str, spec: Any, data_size: int, where: str) -> _Entry:
    def bad() -> ModelFileError:
        declared = repr(spec)
        if len(declared) > 200:
            declared = declared[:200] + "..."
        return ModelFileError(
            f"{where} is truncated or corrupted: tensor {name[:100]!r} is declared as {declared}"
        )

    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise bad()
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not (
        isinstance(dtype, str)
        and dtype in _DTYPES
        and isinstance(shape, list)
        and all(_is_count(s) for s in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(o) for o in offsets)
        and offsets[0] <= offsets[1] <= data_size
    ):
        raise bad()
    torch_dtype = _DTYPES[dtype]
    # Both sides are bounded by the file's size, so the product needs no overflow guard:
    # Python integers are exact, and a mismatch refuses the entry.
    expected = math.prod(shape) * torch_dtype.itemsize
    if expected != offsets[1] - offsets[0]:
        raise ModelFileError(
            f"{where} is truncated or corrupted: tensor {name!r} of shape {tuple(shape)} "
            f"and dtype {dtype} needs {expected} bytes, the file gives it "
            f"{offsets[1] - offsets[0]}"
        )
    return _Entry(torch_dtype, tuple(shape), offsets[0], offsets[1])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_header(text: str, where: str) -> Any:
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ModelFileError(f"{where} is corrupted: unreadable JSON header") from err
    if not isinstance(header, dict):
        raise ModelFileError(
            f"{where} is corrupted: its header is a {type(header).__name__}, not a JSON object"
        )
    return header


def _tensor(chunk: memoryview, entry: _Entry) -> torch.Tensor:
    if not len(chunk):
        return torch.empty(entry.shape, dtype=entry.dtype)
    # A copy, so that each tensor owns aligned memory whatever its offset in the file.
    t = torch.frombuffer(chunk, dtype=torch.uint8).clone()
    if sys.byteorder == "big":  # safetensors stores little-endian
        t = t.reshape(-1, entry.dtype.itemsize).flip(-1).reshape(-1)
    return t.view(entry.dtype).reshape(entry.shape)


def _library_version(meta: dict[str, Any]) -> str:
    try:
        return str(json.loads(meta["header"]).get("library_version", "unknown"))[:100]
    except (KeyError, ValueError, AttributeError, RecursionError):
        return "unknown"
