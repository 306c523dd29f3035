"""A reference posterior by NUTS: :func:`fit_nuts` samples the latent weights of a
:class:`~bayes_mdn.model.MixtureDensityModel` with Pyro's ``MCMC``, chain after chain in
this process, against which the variational fits of :mod:`bayes_mdn.fit` can be checked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ._utils import pyro_scope, seeded
from ._validation import check_count
from .model import MixtureDensityModel

__all__ = ["NUTSConfig", "fit_nuts"]


# Pyro's MCMC diagnostics (split R-hat, read for the divergence counts) halve each chain
# twice; with fewer draws they fail with a bare AssertionError after all the sampling.
MIN_NUTS_SAMPLES = 4


@dataclass(frozen=True)
class NUTSConfig:
    """Settings of the NUTS run of ``BayesianMDN(method="nuts")``, checked when built.

    Parameters
    ----------
    num_chains : int
        Independent chains, run one after another (two or more for R-hat).
    warmup_steps : int
        Adaptation steps per chain.
    num_samples : int
        Kept draws per chain.
    max_tree_depth : int
        NUTS tree depth cap; 5 keeps a step under 32 gradient evaluations.

    See :func:`fit_nuts` for what they cost.

    Examples
    --------
    >>> NUTSConfig(num_chains=1, num_samples=50)
    NUTSConfig(num_chains=1, warmup_steps=200, num_samples=50, max_tree_depth=5)
    >>> NUTSConfig(max_tree_depth=0)
    Traceback (most recent call last):
    ...
    ValueError: max_tree_depth must be an integer >= 1, got 0
    """

    num_chains: int = 2
    warmup_steps: int = 200
    num_samples: int = 200
    max_tree_depth: int = 5

    def __post_init__(self) -> None:
        for name in ("num_chains", "warmup_steps", "num_samples", "max_tree_depth"):
            check_count(name, getattr(self, name))
        if self.num_samples < MIN_NUTS_SAMPLES:
            raise ValueError(
                f"num_samples must be at least {MIN_NUTS_SAMPLES} draws per chain (the chain "
                f"diagnostics split each chain), got {self.num_samples}"
            )


def fit_nuts(
    model: MixtureDensityModel,
    x: Tensor,
    y: Tensor,
    num_samples: int = 200,
    warmup_steps: int = 200,
    num_chains: int = 2,
    max_tree_depth: int = 5,
    seed: int | None = 0,
    init_values: dict[str, Tensor] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, object]]:
    """A reference posterior of the latent weights by NUTS (Pyro's ``MCMC``).

    The model's point-estimated parameters stay as they are (fit them first, e.g. by
    :func:`~bayes_mdn.fit.fit_svi`); only the latent sites are sampled. Chains run one
    after another in this process, each seeded ``seed + chain``: forked or spawned worker
    processes are fragile with module-local Pyro parameters and gain nothing on a 2-core
    machine.

    Cost: every NUTS step evaluates the full-data gradient up to ``2**max_tree_depth``
    times, through Pyro's tracing (milliseconds per evaluation even for tiny nets), so
    a depth of 10 costs about 30 times a depth of 5 (measured times:
    docs/notes.md). Cost grows with data size times tree size,
    and multimodal mixture posteriors mix slowly (a K = 2 fit on the inverse-sine problem
    had a bulk ESS of 7 in 300 draws), so beyond a few hundred latent weights or a few
    thousand points NUTS stops being practical here: use SVI and check it with the PSIS
    k-hat of :func:`bayes_mdn.diagnostics.variational_khat`.

    Parameters
    ----------
    model : MixtureDensityModel with at least one latent site
    x : Tensor of shape (n, d_x)
    y : Tensor of shape (n, d_y)
    num_samples, warmup_steps : kept draws and adaptation steps per chain
    num_chains : independent chains (needed for R-hat)
    max_tree_depth : NUTS tree depth cap; 5 keeps a step under 32 gradient evaluations
    seed : seed of chain 0; None for fresh randomness
    init_values : starting point of every chain, {site: Tensor (*site_shape)}; default
        the network's initialization (or pass a fitted guide's median)
    progress : show Pyro's progress bar

    Returns
    -------
    samples : dict from site name to Tensor of shape (num_chains, num_samples, *site_shape)
    info : dict with "divergences" (per chain), "seconds" and the settings used
    """
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide import init_to_value

    if not model.latent_shapes:
        raise ValueError("NUTS needs latent weights: the model has bayesian='none'")
    # The settings' checks are NUTSConfig's own.
    NUTSConfig(
        num_chains=num_chains,
        warmup_steps=warmup_steps,
        num_samples=num_samples,
        max_tree_depth=max_tree_depth,
    )
    if x.dim() != 2 or y.dim() != 2 or len(x) != len(y):
        raise ValueError(
            f"x and y must be (n, d_x) and (n, d_y) with the same n, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    init = model.initial_values() if init_values is None else dict(init_values)
    start = time.perf_counter()
    chains: list[dict[str, Tensor]] = []
    divergences: list[int] = []
    for chain in range(num_chains):
        chain_seed = None if seed is None else seed + chain
        with pyro_scope(), seeded(chain_seed, x.device):
            kernel = NUTS(
                model,
                max_tree_depth=max_tree_depth,
                jit_compile=False,
                init_strategy=init_to_value(values=init),
            )
            mcmc = MCMC(
                kernel,
                num_samples=num_samples,
                warmup_steps=warmup_steps,
                num_chains=1,
                disable_progbar=not progress,
            )
            mcmc.run(x, y)
        chains.append({k: v.detach() for k, v in mcmc.get_samples().items()})
        divergences.append(len(mcmc.diagnostics().get("divergences", {}).get("chain 0", [])))
    samples = {name: torch.stack([c[name] for c in chains]) for name in model.latent_shapes}
    info: dict[str, object] = {
        "divergences": divergences,
        "seconds": time.perf_counter() - start,
        "num_chains": num_chains,
        "num_samples": num_samples,
        "warmup_steps": warmup_steps,
        "max_tree_depth": max_tree_depth,
    }
    return samples, info
