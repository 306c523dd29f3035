"""Bayesian mixture density networks in Pyro."""

from .config import FitConfig, FitHistory
from .datasets import (
    inverse_sine_log_density,
    load_dataset,
    make_inverse_sine,
    make_noisy_ring,
    noisy_ring_log_density,
)
from .distributions import GaussianMixture
from .estimator import BayesianMDN
from .fit import fit_svi
from .guides import make_guide
from .io import ModelFileError, load
from .mcmc import NUTSConfig, fit_nuts
from .model import MixtureDensityModel
from .nets import MixtureDensityNetwork, MixtureParams
from .posterior import Posterior
from .sources import LoaderSource, ParquetSource
from .spec import ModelSpec

__version__ = "0.1.0"

__all__ = [
    "BayesianMDN",
    "FitConfig",
    "FitHistory",
    "GaussianMixture",
    "LoaderSource",
    "MixtureDensityModel",
    "MixtureDensityNetwork",
    "MixtureParams",
    "ModelFileError",
    "ModelSpec",
    "NUTSConfig",
    "ParquetSource",
    "Posterior",
    "__version__",
    "fit_nuts",
    "fit_svi",
    "inverse_sine_log_density",
    "load",
    "load_dataset",
    "make_guide",
    "make_inverse_sine",
    "make_noisy_ring",
    "noisy_ring_log_density",
]
