"""Data sources that stream (x, y) rows from disk or from a loader, and their running moments.

A source yields its rows in blocks, in the same order on every pass; :mod:`bayes_mdn.streaming`
cuts that stream into shuffle windows, held-out rows and mini-batches, so that memory stays
flat in the number of rows. Two kinds exist:

- :class:`ParquetSource`: columns of a Parquet file or folder, read through
  ``pyarrow.dataset`` (named like the CSV front end's ``--x`` and ``--y`` columns);
- :class:`LoaderSource`: a ``torch.utils.data.DataLoader`` or any re-iterable of
  ``(x, y)`` batches.

:class:`RunningMoments` merges per-block means and sums of squared deviations in float64
(Chan, Golub and LeVeque's pairwise update), so the standardization of a stream equals the
in-memory one to rounding whatever the number of rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["LoaderSource", "ParquetSource", "RunningMoments", "Source", "as_source"]

# Rows a Parquet source decodes at a time (pyarrow's batch size).
READ_ROWS = 65_536


class RunningMoments:
    """Column means and sample standard deviations of a stream of blocks, in float64.

    Examples
    --------
    >>> m = RunningMoments(2)
    >>> m.update(np.array([[1.0, 10.0], [2.0, 20.0]]))
    >>> m.update(np.array([[3.0, 30.0]]))
    >>> m.count, m.mean.tolist(), m.std().tolist()
    (3, [2.0, 20.0], [1.0, 10.0])
    """

    def __init__(self, d: int) -> None:
        self.count = 0
        self.mean = np.zeros(d)
        self._m2 = np.zeros(d)
        self.absmax = np.zeros(d)

    def update(self, block: np.ndarray) -> None:
        """Merge a block of shape (n, d)."""
        n = len(block)
        if n == 0:
            return
        block = np.asarray(block, dtype=np.float64)
        self.absmax = np.maximum(self.absmax, np.abs(block).max(0))
        mean = block.mean(0)
        m2 = ((block - mean) ** 2).sum(0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self._m2 = self._m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def std(self) -> np.ndarray:
        """Sample standard deviation (ddof=1) of each column, shape (d,)."""
        if self.count < 2:
            return np.zeros_like(self.mean)
        return np.sqrt(self._m2 / (self.count - 1))


class Source:
    """Rows of (x, y) read in blocks, in the same order on every pass.

    Subclasses set ``d_x``, ``d_y`` and ``x_names``/``y_names`` (or None) and implement
    :meth:`blocks`.
    """

    d_x: int
    d_y: int
    x_names: list[str] | None = None
    y_names: list[str] | None = None
    # Whether predictions come back as (n,) rather than (n, 1).
    y_1d: bool = False

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (x, y) blocks of shapes (b, d_x) and (b, d_y), float64, b >= 0."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


def _finite(block: np.ndarray, what: str, names: Sequence[str] | None, first_row: int) -> None:
    bad = ~np.isfinite(block)
    if bad.any():
        row, col = (int(i[0]) for i in np.nonzero(bad))
        column = names[col] if names is not None else f"column {col}"
        raise ValueError(
            f"{what} {column!s} holds {block[row, col]} at row {first_row + row}: streamed "
            "data must be finite (drop or impute those rows first)"
        )


def _open(path: str) -> Any:
    """The pyarrow dataset of ``path`` (a file or a folder): its files and their schema."""
    import pyarrow.dataset as ds

    return ds.dataset(path, format="parquet")


class ParquetSource(Source):
    """Columns of a Parquet file (or a folder of Parquet files) as (x, y) rows.

    Parameters
    ----------
    path : a ``.parquet`` file or a folder that ``pyarrow.dataset`` reads as one data set
    x : names of the input columns, in order
    y : names of the target column(s), in order
    read_rows : rows decoded at a time; memory is about ``read_rows`` times the number of
        columns times 8 bytes

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When a named column is missing, repeated or not numeric, or the file is not Parquet
        (checked from the schema, before any row is read).

    Examples
    --------
    >>> import tempfile, pyarrow as pa, pyarrow.parquet as pq
    >>> path = os.path.join(tempfile.mkdtemp(), "t.parquet")
    >>> pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "b": [0.5, 0.1, 0.2]}), path)
    >>> src = ParquetSource(path, x=["a"], y=["b"])
    >>> [x.shape for x, _ in src.blocks()]
    [(3, 1)]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        x: Sequence[str],
        y: Sequence[str],
        read_rows: int = READ_ROWS,
    ) -> None:
        try:
            import pyarrow as pa
        except ImportError as err:  # pragma: no cover - pyarrow is a dependency of [scale]
            raise ImportError(
                "reading Parquet needs pyarrow: pip install 'bayes-mdn[scale]'"
            ) from err
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"no such Parquet file or folder: {self.path!r}")
        for name, cols in (("x", x), ("y", y)):
            if isinstance(cols, (str, bytes)) or not len(cols):
                raise ValueError(f"{name} must be a non-empty list of column names, got {cols!r}")
        self.x_names, self.y_names = [str(c) for c in x], [str(c) for c in y]
        both = self.x_names + self.y_names
        repeated = sorted({c for c in both if both.count(c) > 1})
        if repeated:
            raise ValueError(f"columns named more than once in x and y: {repeated}")
        if not isinstance(read_rows, int) or isinstance(read_rows, bool) or read_rows < 1:
            raise ValueError(f"read_rows must be an integer >= 1, got {read_rows!r}")
        self.read_rows = read_rows
        try:
            self._dataset = _open(self.path)
            schema = self._dataset.schema
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"{self.path!r} is not a readable Parquet data set: {err}") from err
        missing = [c for c in both if c not in schema.names]
        if missing:
            shown = ", ".join(schema.names[:20]) + (" ..." if len(schema.names) > 20 else "")
            raise ValueError(f"columns {missing} are not in {self.path!r}; it has: {shown}")
        for c in both:
            kind = schema.field(c).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                raise ValueError(f"column {c!r} of {self.path!r} is {kind}, not numeric")
        self.d_x, self.d_y = len(self.x_names), len(self.y_names)
        self.y_1d = self.d_y == 1

    def __getstate__(self) -> dict:
        # pyarrow's dataset is reopened in each process rather than pickled.
        state = dict(self.__dict__)
        state.pop("_dataset", None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._dataset = _open(self.path)

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        first = 0
        cols = [*(self.x_names or ()), *(self.y_names or ())]
        for batch in self._batches(cols):
            if batch.num_rows == 0:
                continue
            arrays = []
            for c in cols:
                column = batch.column(c)
                if column.null_count:
                    row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
                    raise ValueError(
                        f"column {c!r} of {self.path!r} is missing a value at row {first + row}"
                    )
                arrays.append(column.to_numpy(zero_copy_only=False).astype(np.float64))
            table = np.stack(arrays, axis=1)
            x, y = table[:, : self.d_x], table[:, self.d_x :]
            _finite(x, "input", self.x_names, first)
            _finite(y, "target", self.y_names, first)
            first += len(table)
            yield x, y

    def _batches(self, cols: list[str]) -> Iterator[Any]:
        """Record batches of ``cols``, file by file, read as they are consumed. Not the
        dataset scanner, nor Parquet's default pre-buffering: both read ahead of a slow
        consumer (a training loop), and on a 10^7-row file memory grew with the rows read
        (by about 200 MB) where this stays at a few megabytes."""
        import pyarrow.parquet as pq

        for file in self._dataset.files:
            reader = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)
            try:
                # Decoded in this thread: Arrow's thread pool would compete with the
                # training for the cores, and threads make a forked worker unsafe.
                yield from reader.iter_batches(
                    batch_size=self.read_rows, columns=cols, use_threads=False
                )
            finally:
                reader.close()

    def describe(self) -> str:
        return f"Parquet {self.path!r}"


_END = object()


class LoaderSource(Source):
    """A ``DataLoader`` or any re-iterable of ``(x, y)`` batches as a stream of rows.

    Each pass iterates ``loader`` again, and must yield the same rows in the same order
    (``shuffle=False``): the fit shuffles within windows itself and holds rows out by
    their position. A pass that yields other rows is detected (row count and a
    position-weighted checksum) and raises ``ValueError``.

    Parameters
    ----------
    loader : iterable of pairs (x, y): tensors or arrays of shapes (b, d_x) or (b,) and
        (b, d_y) or (b,). A one-shot iterator (a generator) cannot be read twice and is
        refused.
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        if iter(loader) is loader:
            raise TypeError(
                "fit streams the data several times, but got a one-shot iterator "
                f"({type(loader).__name__}); pass a DataLoader or another re-iterable"
            )
        self.loader = loader
        first = next(iter(self._pairs()), None)
        if first is None:
            raise ValueError("the loader yielded no batch")
        self.d_x, self.d_y = first[0].shape[1], first[1].shape[1]
        self.y_1d = self._first_y_1d

    def _items(self) -> Iterator[Any]:
        # A DataLoader draws its base seed from torch's global generator on every iter():
        # read the loader outside the fit's random stream, so that the stream's draws
        # (weights, input noise) do not depend on where the data come from.
        with torch.random.fork_rng(devices=[]):
            it = iter(self.loader)
        while True:
            with torch.random.fork_rng(devices=[]):
                item = next(it, _END)
            if item is _END:
                return
            yield item

    def _pairs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i, item in enumerate(self._items()):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(
                    f"batch {i} of the loader is a {type(item).__name__}, not an (x, y) pair"
                )
            arrays = []
            for name, part in zip(("x", "y"), item):
                if isinstance(part, torch.Tensor):
                    part = part.detach().cpu().numpy()
                arr = np.asarray(part, dtype=np.float64)
                if i == 0 and name == "y":
                    self._first_y_1d = arr.ndim == 1
                if arr.ndim == 1:
                    arr = arr[:, None]
                if arr.ndim != 2:
                    raise ValueError(
                        f"batch {i}: {name} must have shape (b, d) or (b,), got {arr.shape}"
                    )
                arrays.append(arr)
            if len(arrays[0]) != len(arrays[1]):
                raise ValueError(
                    f"batch {i}: x and y have {len(arrays[0])} and {len(arrays[1])} rows"
                )
            yield arrays[0], arrays[1]

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        first = 0
        for i, (x, y) in enumerate(self._pairs()):
            if x.shape[1] != self.d_x or y.shape[1] != self.d_y:
                raise ValueError(
                    f"batch {i} has {x.shape[1]} input and {y.shape[1]} target columns; "
                    f"the first had {self.d_x} and {self.d_y}"
                )
            _finite(x, "input", None, first)
            _finite(y, "target", None, first)
            first += len(x)
            yield x, y


class ArraySource(Source):
    """In-memory arrays as a stream (what ``devices > 1`` trains on for array input)."""

    def __init__(
        self, x: np.ndarray, y: np.ndarray, y_1d: bool = False, read_rows: int = READ_ROWS
    ) -> None:
        self.x, self.y = x, y
        self.d_x, self.d_y = x.shape[1], y.shape[1]
        self.y_1d = y_1d
        self.read_rows = read_rows

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, len(self.x), self.read_rows):
            sl = slice(i, i + self.read_rows)
            yield np.asarray(self.x[sl], np.float64), np.asarray(self.y[sl], np.float64)


def as_source(data: Any) -> Source | None:
    """``data`` as a :class:`Source` when it is one, a DataLoader or a re-iterable of
    batches that is not an array or table; None for array-like input."""
    if isinstance(data, Source):
        return data
    if isinstance(data, torch.utils.data.DataLoader):
        return LoaderSource(data)
    if isinstance(data, (np.ndarray, torch.Tensor, list, tuple, str, bytes, os.PathLike)):
        return None
    if hasattr(data, "__array__") or hasattr(data, "columns") or hasattr(data, "shape"):
        return None
    if isinstance(data, Iterable):
        return LoaderSource(data)
    return None
