"""Save and load fitted :class:`~bayes_mdn.estimator.BayesianMDN` models without pickle.

A model file is a bayes_mdn archive (see ``bayes_mdn._archive``): a safetensors file whose
JSON header holds the estimator's constructor arguments, the fitted metadata, the library
version and a format version, and whose tensors are the state of the network, the
standardization buffers and the guide. Loading parses JSON and raw tensor bytes only, so a
file from a stranger can at worst be rejected, never run code.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ._archive import ModelFileError, read_archive, write_archive
from ._utils import pyro_scope, resolve_device, seeded
from .estimator import DTYPES, BayesianMDN
from .fit import FitHistory

__all__ = ["FORMAT_VERSION", "ModelFileError", "load", "save"]

#: Version of the model file layout; bumped whenever a file of the old layout
#: could not be read correctly by the new code.
FORMAT_VERSION = 1
_KIND = "model"


def save(estimator: BayesianMDN, path: str | os.PathLike[str]) -> None:
    """Write a fitted estimator to ``path`` atomically.

    Parameters
    ----------
    estimator : a fitted BayesianMDN
    path : destination file (parent folders are created); an existing file is replaced
        only once the new one is completely written

    Raises
    ------
    RuntimeError
        When the estimator is not fitted.
    ValueError
        When a parameter holds NaN or infinite values (nothing is written).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from bayes_mdn import BayesianMDN, load
    >>> from bayes_mdn.datasets import make_inverse_sine
    >>> X, y = make_inverse_sine(200, seed=0)
    >>> mdn = BayesianMDN(n_components=3, hidden=(8,), epochs=2, progress=False).fit(X, y)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "mdn.safetensors"
    >>> mdn.save(path)
    >>> bool((load(path, device="cpu").predict(X[:5]) == mdn.predict(X[:5])).all())
    True
    """
    from . import __version__

    if not isinstance(estimator, BayesianMDN):
        raise TypeError(f"estimator must be a BayesianMDN, got {type(estimator).__name__}")
    estimator._check_fitted()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    params = estimator.get_params()
    if params.get("checkpoint") is not None:
        params["checkpoint"] = os.fspath(params["checkpoint"])
    header = {
        "library_version": __version__,
        "params": params,
        "fitted": {
            "n_features_in_": estimator.n_features_in_,
            "n_outputs_": estimator.n_outputs_,
            "y_1d": bool(estimator._y_1d),
            "history": estimator.history_.to_dict(),
        },
        "model": dict(estimator.model_.state_dict()),
        "guide": dict(estimator.guide_.state_dict()),
    }
    write_archive(path, _KIND, FORMAT_VERSION, header)


def load(path: str | os.PathLike[str], device: str | torch.device = "auto") -> BayesianMDN:
    """Read a model written by :func:`save` (or :meth:`BayesianMDN.save`).

    Parameters
    ----------
    path : the model file
    device : where to put the model: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
        A model saved on a GPU loads on a CPU-only machine. The returned estimator's
        ``device`` parameter is set to this value, so a later ``fit`` trains there too.

    Returns
    -------
    BayesianMDN, fitted: seeded predictions equal those of the saved estimator.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ModelFileError
        (a ``ValueError``) for a file that is not a bayes_mdn model, has another format
        version, is truncated or corrupted, or does not match the network it describes.
        Nothing in the file is executed, whatever it holds.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    target = resolve_device(device)
    header = read_archive(path, _KIND, FORMAT_VERSION)
    try:
        return _rebuild(header, target, str(device))
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise ModelFileError(
            f"{os.fspath(path)!r} does not describe a model this bayes_mdn can rebuild "
            f"(written by version {header.get('library_version', 'unknown')!r}): {err}"
        ) from err


def _rebuild(header: dict[str, Any], device: torch.device, device_name: str) -> BayesianMDN:
    params = dict(header["params"])
    valid = set(BayesianMDN._param_names())
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ModelFileError(
            f"the file sets parameters this bayes_mdn does not know: {unknown} "
            f"(written by version {header.get('library_version', 'unknown')!r})"
        )
    est = BayesianMDN(**params)
    est.device = device_name
    est._check_options()
    fitted = header["fitted"]
    d_x, d_y = int(fitted["n_features_in_"]), int(fitted["n_outputs_"])
    dtype = DTYPES[est.dtype]
    # Building the network draws an initialization that load_state_dict overwrites; the
    # fork keeps the caller's random stream untouched by loading.
    with seeded(0, device):
        # load_state_dict replaces the placeholder standardization below.
        placeholders = (
            torch.zeros(d_x, device=device, dtype=dtype),
            torch.ones(d_x, device=device, dtype=dtype),
            torch.zeros(d_y, device=device, dtype=dtype),
            torch.ones(d_y, device=device, dtype=dtype),
        )
        model, guide = est._build_model(d_x, d_y, placeholders, init_seed=0)
        model.load_state_dict(header["model"])
        # Autoguides create their parameters on the first call: run one on a dummy batch
        # so that the saved values have somewhere to go.
        with pyro_scope():
            guide(
                torch.zeros(2, d_x, device=device, dtype=dtype),
                torch.zeros(2, d_y, device=device, dtype=dtype),
            )
        guide.load_state_dict(header["guide"])
    est.model_ = model
    est.guide_ = guide
    est.history_ = FitHistory(**fitted["history"])
    est.n_features_in_ = d_x
    est.n_outputs_ = d_y
    est._y_1d = bool(fitted["y_1d"])
    return est
