"""Checks of user data at the public boundary, before any work starts."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_2d_float"]


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
