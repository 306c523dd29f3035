"""Save and load fitted :class:`~bayes_mdn.estimator.BayesianMDN` models without pickle.

A model file is a bayes_mdn archive (see ``bayes_mdn._archive``): a safetensors file whose
JSON header holds the estimator's constructor arguments, the fitted metadata, the library
version and a format version, and whose tensors are the state of the network, the
standardization buffers and the guide. Loading parses JSON and raw tensor bytes only, so a
file from a stranger can at worst be rejected, never run code.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from ._archive import ModelFileError, TensorSpec, read_archive
from ._utils import pyro_scope, resolve_device, seeded
from ._validation import is_count
from .config import FitHistory
from .estimator import MODEL_FILE_KIND, MODEL_FORMAT_VERSION, BayesianMDN
from .guides import EmpiricalGuide, EnsembleGuide
from .mcmc import NUTSConfig
from .model import MixtureDensityModel
from .posterior import Posterior
from .spec import ModelSpec, backbone_class, state_differences

__all__ = ["FORMAT_VERSION", "ModelFileError", "load", "save"]

# The file's kind and layout version live with the writer (BayesianMDN.save), so that data
# flows one way: this module reads what the estimator writes and imports it, never the
# reverse.
FORMAT_VERSION = MODEL_FORMAT_VERSION
_KIND = MODEL_FILE_KIND


def save(estimator: BayesianMDN, path: str | os.PathLike[str]) -> None:
    """Write a fitted estimator to ``path`` atomically: :meth:`BayesianMDN.save`.

    Parameters
    ----------
    estimator : a fitted BayesianMDN
    path : destination file (parent folders are created); an existing file is replaced
        only once the new one is completely written

    Raises
    ------
    TypeError
        When ``estimator`` is not a BayesianMDN, or ``path`` not a str or os.PathLike.
    NotFittedError
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
    if not isinstance(estimator, BayesianMDN):
        raise TypeError(f"estimator must be a BayesianMDN, got {type(estimator).__name__}")
    estimator.save(path)


def load(
    path: str | os.PathLike[str],
    device: str | torch.device = "auto",
    backbone: torch.nn.Module | None = None,
) -> BayesianMDN:
    """Read a model written by :func:`save` (or :meth:`BayesianMDN.save`).

    Parameters
    ----------
    path : the model file
    device : where to put the model: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
        A model saved on a GPU loads on a CPU-only machine. The returned estimator's
        ``device`` parameter is set to this value, so a later ``fit`` trains there too.
    backbone : for a model fitted with ``BayesianMDN(backbone=...)``, a module built the
        same way (its weights are overwritten by the saved ones). The file names the
        backbone's class, and its stored tensors must match the module's parameters and
        buffers, names, shapes and dtypes, or the file is refused.

    Returns
    -------
    BayesianMDN, fitted: seeded predictions equal those of the saved estimator.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    IsADirectoryError
        When ``path`` is a folder.
    ModelFileError
        (a ``ValueError``) for a file that is not a bayes_mdn model, has another format
        version, is truncated or corrupted, or does not match the network it describes.
        Nothing in the file is executed, whatever it holds, and memory stays bounded by
        the file's size: the network the header describes is compared with the tensors
        the file stores (names, shapes, dtypes) before any of it is built.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> bad = pathlib.Path(tempfile.mkdtemp()) / "bad.safetensors"
    >>> _ = bad.write_bytes(b"\\x10" + bytes(7) + b'{"__metadata__": "x"}')
    >>> try:
    ...     load(bad, device="cpu")
    ... except ModelFileError as err:
    ...     print("refused")
    refused
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if backbone is not None and not isinstance(backbone, torch.nn.Module):
        raise TypeError(
            f"backbone must be a torch.nn.Module or None, got {type(backbone).__name__}"
        )
    target = resolve_device(device)
    where = repr(os.fspath(path))
    try:
        header = read_archive(
            path, _KIND, FORMAT_VERSION, check=lambda h: _check_declared(h, backbone)
        )
        return _rebuild(header, target, str(device), backbone)
    except ModelFileError as err:
        if str(err).startswith(where):
            raise
        raise ModelFileError(
            f"{where} does not describe a model this bayes_mdn can rebuild: {err}"
        ) from err
    except _REBUILD_ERRORS as err:
        raise ModelFileError(
            f"{where} does not describe a model this bayes_mdn can rebuild: {_short(err)}"
        ) from err


# What a well-formed but inconsistent header makes the rebuild raise (a wrong type where a
# number belongs, a key missing, sizes torch cannot represent).
_REBUILD_ERRORS = (
    KeyError,
    TypeError,
    ValueError,
    RuntimeError,
    AttributeError,
    OverflowError,
    RecursionError,
)


def _short(err: BaseException, limit: int = 500) -> str:
    text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."


def _settings(
    header: dict[str, Any], device_name: str, backbone: torch.nn.Module | None
) -> tuple[dict[str, Any], ModelSpec, NUTSConfig | None, int, int, int]:
    """The estimator's parameters the header holds, checked as ``fit`` checks them; the
    model they describe; the NUTS run that made its draws (``method="nuts"``); and the
    fitted (n_features, n_outputs, n_components)."""
    for section in ("params", "fitted", "model", "guide"):
        if not isinstance(header.get(section), dict):
            raise ModelFileError(f"the header's {section!r} section is missing or not a mapping")
    params = dict(header["params"])
    # Files written before ensembles (version 0.1) hold one fit and no n_members.
    params.setdefault("n_members", 1)
    # Files written before randomized prior functions hold networks without one.
    params.setdefault("prior_function", 0.0)
    params["backbone"] = _backbone(params.get("backbone"), backbone)
    params["device"] = device_name
    valid = set(BayesianMDN().get_params())
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ModelFileError(
            f"the file sets parameters this bayes_mdn does not know: {unknown} "
            f"(written by version {header.get('library_version', 'unknown')!r})"
        )
    est = BayesianMDN(**params)
    spec, _ = est.check_params()
    nuts = est.nuts_config() if params.get("method") == "nuts" else None
    fitted = header["fitted"]
    d_x, d_y = fitted["n_features_in_"], fitted["n_outputs_"]
    # Files written before n_components="auto" hold the K they used in n_components.
    declared = params.get("n_components")
    k = fitted.get("n_components_", declared)
    if declared != "auto" and declared != k:
        raise ModelFileError(
            f"the network its header describes does not match the tensors it stores: "
            f"n_components is {declared!r}, but the model was fitted with n_components_ = {k!r}"
        )
    for name, value in (("n_features_in_", d_x), ("n_outputs_", d_y), ("n_components_", k)):
        if not is_count(value):
            raise ModelFileError(f"the header's {name} must be an integer >= 1, got {value!r}")
    return params, spec, nuts, d_x, d_y, k


def _backbone(declared: object, given: torch.nn.Module | None) -> torch.nn.Module | None:
    """The backbone for a file that declares ``declared`` (None, or the class of the one it
    was fitted with), given ``given`` by the caller of :func:`load`."""
    if declared is None:
        if given is not None:
            raise ModelFileError(
                "the model was fitted without a backbone, but load was given one; "
                "call load(path) without backbone="
            )
        return None
    name = declared.get("class") if isinstance(declared, dict) else None
    if not isinstance(name, str):
        raise ModelFileError(f"the header's backbone entry is malformed: {declared!r}")
    if given is None:
        raise ModelFileError(
            f"the model was fitted with a backbone of class {name}: pass load(path, "
            "backbone=...) a module built the same way; its weights come from the file"
        )
    given_name = backbone_class(given)
    if given_name != name:
        raise ModelFileError(
            f"the model was fitted with a backbone of class {name}, but load was given a "
            f"{given_name}"
        )
    return given


def _check_declared(header: dict[str, Any], backbone: torch.nn.Module | None = None) -> None:
    """Refuse a header whose network differs from the tensors the file stores.

    Called with :class:`TensorSpec` in place of each tensor, before any tensor is read.
    The model and guide the header describes are built on the ``meta`` device, which
    allocates no memory whatever the sizes; their state must then have exactly the
    stored tensors' names, shapes and dtypes. So a header announcing a network of
    10**9 hidden units over a few stored weights is refused for the cost of its
    description, and everything the rebuild later allocates is as large as what the
    file really holds.
    """
    params, spec, nuts, d_x, d_y, k = _settings(header, "cpu", backbone)
    stored = {
        section: {k: v for k, v in header[section].items()} for section in ("model", "guide")
    }
    for section, entries in stored.items():
        odd = [k for k, v in entries.items() if not isinstance(v, TensorSpec)]
        if odd:
            raise ModelFileError(
                f"the {section} state holds values that are not tensors: {odd[:5]}"
            )
    # One weight matrix and one bias a layer, each a stored tensor: more layers than
    # stored tensors cannot match, and would only cost time to describe.
    if len(spec.hidden) >= len(stored["model"]):
        raise ModelFileError(
            f"the header describes {len(spec.hidden)} hidden layers, but the file stores "
            f"only {len(stored['model'])} model tensors"
        )
    # Each ensemble member stores at least one guide or model tensor of its own.
    if _n_members(params) > len(stored["guide"]) + 1:
        raise ModelFileError(
            f"the header describes {_n_members(params)} ensemble members, but the file stores "
            f"only {len(stored['guide'])} guide tensors"
        )
    model, guide = _build(spec, _n_members(params), d_x, d_y, k, torch.device("meta"), nuts)
    problems = []
    for section, module in (("model", model), ("guide", guide)):
        expected, found = module.state_dict(), stored[section]
        missing, extra, wrong = state_differences(expected, found)
        if missing:
            problems.append(f"{section} tensors missing from the file: {missing[:5]}")
        if extra:
            problems.append(f"{section} tensors the described network lacks: {extra[:5]}")
        for k in wrong[:5]:
            need, have = expected[k], found[k]
            problems.append(
                f"{section} tensor {k!r}: the header's settings need {need.dtype} "
                f"{tuple(need.shape)}, the file stores {have.dtype} {have.shape}"
            )
    if problems:
        raise ModelFileError(
            "the network its header describes does not match the tensors it stores ("
            + "; ".join(problems)
            + ")"
        )


def _n_members(params: dict[str, Any]) -> int:
    """The members a file stores: method="nuts" keeps one SVI member (see
    :meth:`BayesianMDN.fit`)."""
    return 1 if params.get("method") == "nuts" else int(params["n_members"])


def _build(
    spec: ModelSpec,
    n_members: int,
    d_x: int,
    d_y: int,
    n_components: int,
    device: torch.device,
    nuts: NUTSConfig | None,
    model_state: dict[str, torch.Tensor] | None = None,
) -> tuple[MixtureDensityModel, torch.nn.Module]:
    """The model and guide ``spec`` describes, the model holding ``model_state`` when
    given, the guide's parameters created (to be overwritten by a saved state); for a
    NUTS fit (``nuts``) the guide holds draws of the run's shape."""
    dtype = spec.torch_dtype
    # Building the network draws an initialization that load_state_dict overwrites; the
    # fork keeps the caller's random stream untouched by loading. On the meta device
    # nothing is drawn or allocated; its factory functions need the device as default.
    meta = device.type == "meta"
    on_meta = torch.device(device) if meta else contextlib.nullcontext()
    with seeded(None if meta else 0, device), on_meta:
        # load_state_dict replaces the placeholder standardization below.
        placeholders = (
            torch.zeros(d_x, device=device, dtype=dtype),
            torch.ones(d_x, device=device, dtype=dtype),
            torch.zeros(d_y, device=device, dtype=dtype),
            torch.ones(d_y, device=device, dtype=dtype),
        )
        members = []
        for _ in range(n_members):
            model, guide = spec.build(
                d_x, d_y, n_components, placeholders, init_seed=None if meta else 0
            )
            # Autoguides create their parameters on the first call: run one on a dummy
            # batch so that the saved values have somewhere to go.
            with pyro_scope():
                guide(
                    torch.zeros(2, d_x, device=device, dtype=dtype),
                    torch.zeros(2, d_y, device=device, dtype=dtype),
                )
            members.append((model, guide))
        model = members[0][0]
        if model_state is not None:
            model.load_state_dict(model_state)
        if nuts is not None:
            draws = (nuts.num_chains, nuts.num_samples)
            placeholder = {
                name: torch.zeros(*draws, *shape, device=device, dtype=dtype)
                for name, shape in model.latent_shapes.items()
            }
            return model, EmpiricalGuide(placeholder)
    if len(members) == 1:
        return members[0]
    return model, EnsembleGuide([m for m, _ in members], [g for _, g in members])


def _rebuild(
    header: dict[str, Any],
    device: torch.device,
    device_name: str,
    backbone: torch.nn.Module | None = None,
) -> BayesianMDN:
    params, spec, nuts, d_x, d_y, k = _settings(header, device_name, backbone)
    fitted = header["fitted"]
    model, guide = _build(spec, _n_members(params), d_x, d_y, k, device, nuts, header["model"])
    guide.load_state_dict(header["guide"])
    histories = [FitHistory(**h) for h in fitted.get("histories", [fitted["history"]])]
    return BayesianMDN.from_posterior(
        Posterior(model, guide, params["num_draws"]),
        histories,
        y_1d=bool(fitted["y_1d"]),
        feature_names_in=fitted.get("feature_names_in_") or None,
        **params,
    )
