"""Bayesian mixture density networks in Pyro."""

from .datasets import (
    inverse_sine_log_density,
    load_dataset,
    make_inverse_sine,
    make_noisy_ring,
    noisy_ring_log_density,
)
from .distributions import GaussianMixture
from .estimator import BayesianMDN
from .fit import FitConfig, FitHistory, fit_nuts, fit_svi
from .guides import make_guide
from .io import ModelFileError, load
from .model import MixtureDensityModel
from .nets import MixtureDensityNetwork, MixtureParams
from .sources import LoaderSource, ParquetSource

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
    "ParquetSource",
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
