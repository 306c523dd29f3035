"""Checks of user data at the public boundary, before any work starts."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "as_2d_float",
    "as_levels",
    "check_dtype_range",
    "check_dtype_resolution",
    "check_seed",
    "standardization",
]


def as_2d_float(data: Any, name: str, allow_1d: bool) -> tuple[np.ndarray, bool]:
    """Convert array-like ``data`` to a finite float64 array of shape (n, d).

    Parameters
    ----------
    data : array-like (NumPy, pandas, torch, nested lists)
    name : the argument's name, used in error messages
    allow_1d : accept shape (n,) as one column (targets); inputs must be 2-D

    Returns
    -------
    array of shape (n, d) and whether the input was 1-D.
    """
    if data is None:
        raise TypeError(f"{name} must be array-like, got None")
    if hasattr(data, "tocsr") or type(data).__module__.startswith("scipy.sparse"):
        raise TypeError(
            f"{name} is a sparse matrix, and sparse input is not supported: pass a dense "
            f"array ({name}.toarray())"
        )
    if hasattr(data, "detach"):  # torch tensors, without importing torch here
        data = data.detach().cpu().numpy()
    elif hasattr(data, "to_numpy"):  # pandas
        data = data.to_numpy()
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError) as err:
        raise TypeError(f"{name} could not be read as an array: {err}") from err
    if np.iscomplexobj(arr):
        raise ValueError(
            f"Complex data not supported: {name} must hold real numbers, got dtype {arr.dtype}"
        )
    if arr.dtype == object:
        # Object arrays (pandas frames of mixed columns) are fine when every cell is a number.
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{name} must hold numbers, but a cell is not one: {err}") from err
    if not (np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)):
        raise TypeError(f"{name} must hold numbers, got an array of dtype {arr.dtype}")
    was_1d = arr.ndim == 1
    if arr.ndim == 1 and allow_1d:
        arr = arr.reshape(-1, 1)
    if arr.ndim != 2:
        hint = (
            f". Reshape your data: for one feature use {name}.reshape(-1, 1)"
            if arr.ndim == 1
            else ""
        )
        raise ValueError(
            f"{name} must be {'1-D or ' if allow_1d else ''}2-D of shape (n_samples, "
            f"n_{'outputs' if allow_1d else 'features'}), got {arr.ndim}-D shape {arr.shape}{hint}"
        )
    if arr.shape[0] == 0:
        raise ValueError(
            f"{name} is empty: 0 sample(s) (shape={arr.shape}) while a minimum of 1 is required."
        )
    if arr.shape[1] == 0:
        raise ValueError(
            f"{name} is empty: 0 feature(s) (shape={arr.shape}) while a minimum of 1 is required."
        )
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN or infinite value(s), the first at row "
            f"{row}, column {col} ({arr[row, col]}): remove or impute them first"
        )
    return arr, was_1d


def _numpy_dtype(dtype: Any) -> np.dtype:
    """``np.dtype`` of a torch dtype, its name ("float32") or a NumPy dtype."""
    return np.dtype(str(dtype).removeprefix("torch."))


def check_dtype_range(arr: np.ndarray, name: str, dtype: Any) -> None:
    """Refuse values beyond the largest finite number of the model's ``dtype``.

    Such values are finite in float64 but become infinite in the model (say 1e39 in a
    float32 model), and the predictions or the fit built on them are wrong without a word.

    Parameters
    ----------
    arr : array of shape (n, d), float64
    name : the argument's name, used in error messages ("X", "y")
    dtype : the model's dtype (torch dtype, "float32" or "float64")

    Examples
    --------
    >>> check_dtype_range(np.array([[1.0, 1e39]]), "X", "float32")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: X column 1 holds 1e+39 (row 0), beyond the largest float32 (3.403e+38) ...
    """
    np_dtype = _numpy_dtype(dtype)
    limit = float(np.finfo(np_dtype).max)
    big = np.abs(arr) > limit
    if big.any():
        row, col = np.argwhere(big)[0]
        raise ValueError(
            f"{name} column {col} holds {arr[row, col]:.4g} (row {row}), beyond the largest "
            f"{np_dtype} ({limit:.4g}) that this model computes in; rescale {name}, or fit "
            "with dtype='float64'"
        )


def check_dtype_resolution(arr: np.ndarray, name: str, dtype: Any) -> None:
    """Refuse training columns whose spread the model's ``dtype`` cannot resolve.

    A column that varies by 1e-46, or by 1e-9 around 1, is a constant in float32: the
    model would standardize it by a scale no float32 difference of its values can show.
    The spread of the values rounded to ``dtype`` must be within 1 % of their spread in
    float64; constant columns pass (they are handled where they are used).

    Parameters
    ----------
    arr : array of shape (n, d), float64
    name : the argument's name, used in error messages
    dtype : the model's dtype
    """
    np_dtype = _numpy_dtype(dtype)
    if np_dtype == np.float64:
        return  # the data are float64 already
    _, exact = _column_stats(arr, ddof=0)
    _, rounded = _column_stats(arr.astype(np_dtype).astype(np.float64), ddof=0)
    lost = (exact > 0) & ~(np.abs(rounded - exact) <= 0.01 * exact)
    if lost.any():
        col = int(np.argmax(lost))
        raise ValueError(
            f"{name} column {col} varies by {exact[col]:.3g} (standard deviation) around "
            f"{arr[:, col].mean():.3g}, finer than {np_dtype} resolves (rounded to {np_dtype} "
            f"it varies by {rounded[col]:.3g}); rescale or center {name}, or fit with "
            "dtype='float64'"
        )


def _column_stats(arr: np.ndarray, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each column, without overflow: each column is
    divided by its largest magnitude first (squares of values near 1e200 overflow
    float64, sums of values near 1e308 too)."""
    peak = np.abs(arr).max(0)
    peak = np.where(peak > 0, peak, 1.0)
    unit = arr / peak
    return unit.mean(0) * peak, unit.std(0, ddof=ddof) * peak


def standardization(
    x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Location and scale of each column of x (n, d_x) and y (n, d_y), in float64.

    Computed here in float64, each column divided by its largest magnitude first, rather
    than in the model's dtype: in float32 the sum of squares of values near 1e19
    overflows (on CUDA, which accumulates in float32), and the scale would be infinite. Scales are sample standard deviations (ddof=1, as ``Tensor.std``);
    a constant input column gets scale 1.

    Returns
    -------
    x_loc, x_scale of shape (d_x,); y_loc, y_scale of shape (d_y,)
    """
    x_loc, x_scale = _column_stats(x, ddof=1)
    y_loc, y_scale = _column_stats(y, ddof=1)
    return x_loc, np.where(x_scale > 0, x_scale, 1.0), y_loc, y_scale


def is_count(value: Any) -> bool:
    """True for an int >= 1 (bools are not counts).

    Examples
    --------
    >>> is_count(3), is_count(0), is_count(True), is_count(2.0)
    (True, False, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_count(name: str, value: Any) -> int:
    """``value`` when it is an int >= 1, else a ``ValueError`` naming ``name``.

    Examples
    --------
    >>> check_count("num_draws", 5)
    5
    >>> check_count("num_draws", 0)
    Traceback (most recent call last):
    ...
    ValueError: num_draws must be an integer >= 1, got 0
    """
    if not is_count(value):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_seed(seed: Any, name: str = "seed", also: str = "") -> int | None:
    """``seed`` as an int in [0, 2**63), or None; anything else raises naming ``name``.

    ``also`` names further accepted values for the message (say ``"'default'"``). NumPy
    integers are accepted; bools, floats and strings are not (an int() of them would
    silently pick a seed).

    Examples
    --------
    >>> check_seed(3), check_seed(None)
    (3, None)
    >>> check_seed("x")
    Traceback (most recent call last):
    ...
    TypeError: seed must be an integer in [0, 2**63) or None, got 'x'
    """
    accepted = f"an integer in [0, 2**63) or None{', or ' + also if also else ''}"
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be {accepted}, got {seed!r}"[:300])
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"{name} must be {accepted}, got {seed!r}")
    return int(seed)


def as_levels(q: Any, name: str = "q") -> np.ndarray:
    """Probability levels as a 1-D float64 array of shape (m,): a number or a 1-D
    sequence, each strictly between 0 and 1.

    Examples
    --------
    >>> as_levels(0.5).tolist(), as_levels([0.1, 0.9]).tolist()
    ([0.5], [0.1, 0.9])
    """
    try:
        arr = np.asarray(q, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a number or a 1-D sequence of numbers in (0, 1), got {q!r}"[:300]
        ) from err
    if arr.ndim > 1:
        raise ValueError(
            f"{name} must be a number or a 1-D sequence of levels, got an array of shape "
            f"{arr.shape}; flatten it first if one list of levels is meant"
        )
    arr = np.atleast_1d(arr)
    if arr.size == 0 or not ((arr > 0) & (arr < 1)).all():
        raise ValueError(
            f"quantile levels {name} must lie strictly between 0 and 1, got {arr.tolist()}"
        )
    return arr
