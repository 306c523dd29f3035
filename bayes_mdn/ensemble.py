"""Fitting the members of an ensemble on in-memory data.

:func:`fit_members` builds every member from a seed and fits them the fastest way their guides
allow: as one stacked network (:mod:`bayes_mdn.stacked`) for the guides it supports, else
one by one, in this process or in worker processes (joblib), each by
:func:`~bayes_mdn.fit.fit_svi`. Workers give the numbers of an in-process fit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from ._utils import pyro_scope
from .config import FitConfig, FitHistory
from .fit import fit_svi
from .model import MixtureDensityModel
from .stacked import can_stack, fit_stacked

__all__ = ["fit_members", "member_checkpoint", "n_workers"]

#: ``build(stats, seed) -> (model, guide)``: one member, not fitted, initialized from
#: ``seed``; stats is (x_loc, x_scale, y_loc, y_scale). ``functools.partial`` of
#: :meth:`~bayes_mdn.spec.ModelSpec.build` is one.
Build = Callable[
    [tuple[Tensor, Tensor, Tensor, Tensor], int | None], tuple[MixtureDensityModel, nn.Module]
]


def n_workers(n_jobs: int | None) -> int:
    """Processes for ``n_jobs`` as scikit-learn reads it: None is 1, -1 every core.

    Examples
    --------
    >>> n_workers(None), n_workers(3)
    (1, 3)
    """
    if n_jobs is None:
        return 1
    if n_jobs < 0:
        return max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return n_jobs


def member_checkpoint(
    checkpoint: str | os.PathLike[str] | None, member: int, n_members: int
) -> str | None:
    """The checkpoint file of member ``member`` fitted on its own: the path itself for one
    member, ``<path>.member<m>`` for several (each member's loop resumes on its own).

    Examples
    --------
    >>> member_checkpoint("fit.ckpt", 1, 3), member_checkpoint("fit.ckpt", 0, 1)
    ('fit.ckpt.member1', 'fit.ckpt')
    """
    if checkpoint is None:
        return None
    path = os.fspath(checkpoint)
    return path if n_members == 1 else f"{path}.member{member}"


def fit_members(
    build: Build,
    x: Tensor,
    y: Tensor,
    stats: tuple[Tensor, Tensor, Tensor, Tensor],
    config: FitConfig,
    seeds: Sequence[int | None],
    *,
    n_jobs: int = 1,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    identity: Mapping[str, object] | None = None,
) -> tuple[list[MixtureDensityModel], list[nn.Module], list[FitHistory]]:
    """Build one member per seed and fit them all to (x, y).

    Parameters
    ----------
    build : ``build(stats, seed) -> (model, guide)``
    x : Tensor of shape (n, d_x)
    y : Tensor of shape (n, d_y)
    stats : (x_loc, x_scale, y_loc, y_scale), the standardization every member shares
    config : the loop's settings; member m runs with ``seed=seeds[m]``
    seeds : one per member: its initialization, held-out rows and mini-batches
    n_jobs : worker processes for members fitted one by one (stacked members ignore it)
    checkpoint, checkpoint_every, resume, identity : as :func:`~bayes_mdn.fit.fit_svi`
        takes them. Stacked members share the one file; members fitted one by one write
        :func:`member_checkpoint` each.

    Returns
    -------
    models, guides, histories : one each per member, fitted
    """
    members = [build(stats, seed) for seed in seeds]
    models = [model for model, _ in members]
    guides = [guide for _, guide in members]
    if len(members) > 1 and can_stack(guides):
        histories = fit_stacked(
            models,
            guides,
            x,
            y,
            config,
            list(seeds),
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            resume=resume,
            identity=identity,
        )
        return models, guides, histories
    loop = dict(checkpoint_every=checkpoint_every, resume=resume, identity=identity)
    jobs = [(seed, member_checkpoint(checkpoint, m, len(seeds))) for m, seed in enumerate(seeds)]
    workers = min(n_workers(n_jobs), len(members))
    if workers == 1:
        histories = [
            fit_svi(model, guide, x, y, replace(config, seed=seed), checkpoint=path, **loop)
            for (model, guide), (seed, path) in zip(members, jobs)
        ]
        return models, guides, histories
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=workers)(
        delayed(_fit_in_worker)(build, x, y, stats, config, seed, path, loop)
        for seed, path in jobs
    )
    histories = []
    for (model, guide), (model_state, guide_state, history) in zip(members, results):
        # Tensors travel back, not modules: copy each fitted state into this process's
        # twin of the member.
        model.load_state_dict(model_state)
        if guide_state:
            # Autoguides create their parameters on the first call.
            with pyro_scope(), torch.no_grad():
                guide(x[:2], y[:2])
            guide.load_state_dict(guide_state)
        histories.append(history)
    return models, guides, histories


def _fit_in_worker(
    build: Build,
    x: Tensor,
    y: Tensor,
    stats: tuple[Tensor, Tensor, Tensor, Tensor],
    config: FitConfig,
    seed: int | None,
    checkpoint: str | None,
    loop: dict,
) -> tuple[dict[str, Tensor], dict[str, Tensor], FitHistory]:
    # The member is built here, as the parent builds its twin: an autoguide does not
    # travel between processes (it keeps its model out of its pickled state).
    model, guide = build(stats, seed)
    history = fit_svi(
        model, guide, x, y, replace(config, seed=seed), checkpoint=checkpoint, **loop
    )
    return dict(model.state_dict()), dict(guide.state_dict()), history
