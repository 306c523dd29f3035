"""A user's own network in front of the mixture head: ``backbone=``."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch import nn

from bayes_mdn import BayesianMDN, load
from bayes_mdn.io import ModelFileError
from bayes_mdn.model import MixtureDensityModel, latent_parameters
from bayes_mdn.nets import MixtureDensityNetwork


def conv_backbone() -> nn.Module:
    """8 x 8 images passed as 64 columns, reshaped and convolved."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 3, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 36, 6),
        nn.Tanh(),
    )


def test_network_names_and_shapes():
    torch.manual_seed(0)
    net = MixtureDensityNetwork(
        d_x=64, d_y=2, n_components=3, hidden=(4,), backbone=conv_backbone(), n_features=6
    )
    names = [n for n, _ in net.named_parameters()]
    assert names[:4] == [
        "backbone.1.weight",
        "backbone.1.bias",
        "backbone.4.weight",
        "backbone.4.bias",
    ]
    p = net(torch.randn(5, 64))
    assert p.logits.shape == (5, 3) and p.loc.shape == (5, 3, 2)
    assert latent_parameters(net, "all")[:4] == names[:4]
    assert latent_parameters(net, "last") == ["head.weight", "head.bias"]
    assert latent_parameters(net, ["backbone.4.*"]) == ["backbone.4.weight", "backbone.4.bias"]
    with pytest.raises(ValueError, match="match no parameter"):
        latent_parameters(net, ["encoder.*"])
    with pytest.raises(ValueError, match="needs n_features"):
        MixtureDensityNetwork(d_x=64, d_y=1, n_components=2, backbone=conv_backbone())
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        MixtureDensityNetwork(d_x=64, d_y=1, n_components=2, backbone="conv", n_features=6)


def test_batched_backbone_weights_equal_one_network_per_draw():
    torch.manual_seed(0)
    net = MixtureDensityNetwork(
        d_x=64,
        d_y=1,
        n_components=3,
        hidden=(),
        backbone=conv_backbone(),
        n_features=6,
        prior_function=0.5,
    ).double()
    x = torch.randn(7, 64, dtype=torch.float64)
    params = dict(net.named_parameters())
    draws = {
        n: p.detach() + 0.1 * torch.randn(4, *p.shape, dtype=p.dtype) for n, p in params.items()
    }
    batched = net.raw(x, draws)
    assert batched.shape == (4, 7, net.n_outputs)
    for b in range(4):
        one = net.raw(x, {n: w[b] for n, w in draws.items()})
        torch.testing.assert_close(batched[b], one)
    # One batch of rows per draw, as a stacked ensemble trains its members.
    xs = torch.randn(4, 7, 64, dtype=torch.float64)
    paired = net.raw(xs, draws)
    for b in range(4):
        torch.testing.assert_close(paired[b], net.raw(xs[b], {n: w[b] for n, w in draws.items()}))
    # The prior function has a backbone of its own, with fresh weights, never trained.
    assert not any(p.requires_grad for n, p in net.named_parameters() if n.startswith("prior"))
    assert not torch.equal(net.prior_backbone[1].weight, net.backbone[1].weight)


def _images(n: int = 240, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 64))
    y = X[:, :8].mean(1) + 0.2 * rng.normal(size=n)
    return X, y


def test_estimator_fits_saves_and_loads_a_backbone(tmp_path):
    X, y = _images()
    backbone = conv_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    mdn = BayesianMDN(
        backbone=backbone, hidden=(), n_members=2, epochs=20, bayesian="all", progress=False
    ).fit(X, y)
    # The user's module is copied, not trained in place.
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert any(n.startswith("backbone.") for n in mdn.model_.latent_names)
    assert np.isfinite(mdn.score(X, y))
    path = tmp_path / "m.safetensors"
    mdn.save(path)
    again = load(path, device="cpu", backbone=conv_backbone())
    np.testing.assert_allclose(again.predict(X[:10]), mdn.predict(X[:10]), rtol=1e-6)
    with pytest.raises(ModelFileError, match="fitted with a backbone of class"):
        load(path, device="cpu")
    with pytest.raises(ModelFileError, match="does not match the tensors"):
        load(path, device="cpu", backbone=nn.Sequential(nn.Flatten(), nn.Linear(64, 6)))


def test_a_backbone_learns_what_the_table_needs():
    # y = sin(2 x_0) + noise of sd 0.1: everything the head sees passes through the backbone.
    # The best NLL is 0.5 + log(0.1 sqrt(2 pi)) = -0.88 nats, the marginal's about 1.09;
    # measured -0.60 and -0.55 on two seeds. A backbone that learned nothing would score
    # near the marginal, so "below it by 1.2" cannot pass by accident.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 4))
    y = np.sin(2 * X[:, 0]) + 0.1 * rng.normal(size=1000)
    backbone = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
    mdn = BayesianMDN(backbone=backbone, hidden=(8,), n_members=1, progress=False)
    mdn.fit(X[:800], y[:800])
    marginal = 0.5 + np.log(y[:800].std() * np.sqrt(2 * np.pi))
    assert -mdn.score(X[800:], y[800:]) < marginal - 1.2


def test_backbone_errors_before_any_work():
    X, y = _images(50)
    with pytest.raises(TypeError, match=r"backbone must be a torch\.nn\.Module"):
        BayesianMDN(backbone="resnet", progress=False).fit(X, y)
    with pytest.raises(ValueError, match=r"features of shape \(n, F\)"):
        BayesianMDN(backbone=nn.Unflatten(1, (1, 8, 8)), progress=False).fit(X, y)
    with pytest.raises(ValueError, match="match no parameter"):
        BayesianMDN(backbone=conv_backbone(), bayesian=["encoder.*"], progress=False).fit(X, y)


def test_clone_copies_the_backbone_setting():
    mdn = BayesianMDN(backbone=conv_backbone(), bayesian=["head.*", "backbone.4.*"])
    twin = clone(mdn)
    assert isinstance(twin.backbone, nn.Sequential) and twin.backbone is not mdn.backbone
    assert twin.bayesian == ["head.*", "backbone.4.*"]


def test_model_with_backbone_standardizes_rows():
    net = MixtureDensityNetwork(
        d_x=64, d_y=1, n_components=2, hidden=(), backbone=conv_backbone(), n_features=6
    )
    model = MixtureDensityModel(
        net,
        x_loc=torch.full((64,), 3.0),
        x_scale=torch.full((64,), 2.0),
        y_loc=torch.zeros(1),
        y_scale=torch.ones(1),
    )
    x = torch.randn(5, 64)
    torch.testing.assert_close(model.raw(3.0 + 2.0 * x), net.raw(x))
