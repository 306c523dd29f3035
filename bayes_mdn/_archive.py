"""A file format for nested state that never runs code when read.

An archive is a safetensors file: the tensors, plus a JSON header (kept in the safetensors
metadata) holding everything else, with each tensor replaced by a reference. Reading it
parses JSON and raw little-endian tensor bytes, nothing else: unlike pickle (even torch's
restricted ``weights_only`` unpickler) no object constructor is ever looked up. A SHA-256
digest over the header and every tensor's bytes catches corruption that keeps the layout
valid (a flipped bit inside a weight); safetensors itself catches truncation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from ._files import atomic_path

__all__ = ["ModelFileError", "pack", "read_archive", "unpack", "write_archive"]

_MAGIC = "bayes_mdn"
_TENSOR = "__tensor__"
_PAIRS = "__pairs__"
_TUPLE = "__tuple__"
_FLOAT = "__float__"
_MARKERS = {_TENSOR, _PAIRS, _TUPLE, _FLOAT}
# The safetensors header is an 8-byte length and that many bytes of JSON; anything larger
# than this is not a file we wrote, and reading it whole could exhaust memory.
_MAX_HEADER = 100 * 2**20


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


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack`."""
    if isinstance(obj, dict):
        if _TENSOR in obj:
            key = obj[_TENSOR]
            if key not in tensors:
                raise ModelFileError(f"the header refers to a tensor {key!r} the file lacks")
            return tensors[key]
        if _PAIRS in obj:
            return {_hashable(unpack(k, tensors)): unpack(v, tensors) for k, v in obj[_PAIRS]}
        if _TUPLE in obj:
            return tuple(unpack(v, tensors) for v in obj[_TUPLE])
        if _FLOAT in obj:
            if obj[_FLOAT] not in ("inf", "-inf"):
                raise ModelFileError(f"unreadable number in the header: {obj[_FLOAT]!r}")
            return float(obj[_FLOAT])
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, torch.Tensor)):
        raise ModelFileError(f"a dictionary key in the header is not a scalar: {key!r}")
    return key


def _digest(header: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(header.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
        "sha256": _digest(text, tensors),
    }
    blob = _st_save(tensors, metadata=metadata)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())


def read_archive(path: str | os.PathLike[str], kind: str, version: int) -> dict[str, Any]:
    """Read an archive written by :func:`write_archive` with the same ``kind``/``version``.

    Tensors come back on the CPU. Raises ``FileNotFoundError`` for a missing file and
    :class:`ModelFileError` for anything that is not such an archive.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {os.fspath(path)!r}")
    data = p.read_bytes()
    where = f"{os.fspath(path)!r}"
    if len(data) < 8:
        raise ModelFileError(f"{where} is not a bayes_mdn {kind} file: only {len(data)} bytes")
    n = int.from_bytes(data[:8], "little")
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ModelFileError(
            f"{where} is not a bayes_mdn {kind} file, or is truncated: its first bytes "
            "announce a header longer than the file"
        )
    try:
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
    except (ValueError, AttributeError) as err:
        raise ModelFileError(f"{where} is not a bayes_mdn {kind} file: unreadable header") from err
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
    try:
        tensors = _st_load(data)
    except SafetensorError as err:
        raise ModelFileError(f"{where} is truncated or corrupted: {err}") from err
    text = meta.get("header", "")
    if _digest(text, tensors) != meta.get("sha256"):
        raise ModelFileError(f"{where} is corrupted: its checksum does not match its contents")
    try:
        header = json.loads(text)
    except ValueError as err:
        raise ModelFileError(f"{where} is corrupted: unreadable JSON header") from err
    return unpack(header, tensors)


def _library_version(meta: dict[str, Any]) -> str:
    try:
        return str(json.loads(meta["header"]).get("library_version", "unknown"))
    except (KeyError, ValueError, AttributeError):
        return "unknown"
