import pytest
import torch

from bayes_mdn.nets import MixtureDensityNetwork, MixtureParams


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
@pytest.mark.parametrize("d_y", [1, 3])
@pytest.mark.parametrize("hidden", [(), (8,), (8, 4)])
def test_output_shapes(covariance, d_y, hidden):
    net = MixtureDensityNetwork(2, d_y, 5, hidden, covariance=covariance)
    p = net(torch.randn(7, 2))
    assert p.logits.shape == (7, 5)
    assert p.loc.shape == (7, 5, d_y)
    expected = (7, 5, d_y, d_y) if covariance == "full" else (7, 5, d_y)
    assert p.scale.shape == expected
    assert p.covariance == covariance
    diag = p.scale.diagonal(dim1=-2, dim2=-1) if covariance == "full" else p.scale
    assert bool((diag >= net.min_scale).all())
    if covariance == "full":
        assert torch.equal(p.scale, p.scale.tril())


def test_batched_weights_match_one_network_per_draw():
    net = MixtureDensityNetwork(1, 1, 3, (6, 5))
    x = torch.randn(4, 1)
    draws = {
        name: p.detach() + 0.1 * torch.randn(3, *p.shape) for name, p in net.named_parameters()
    }
    batched = net(x, draws)
    assert batched.logits.shape == (3, 4, 3)
    for s in range(3):
        single = net(x, {k: v[s] for k, v in draws.items()})
        torch.testing.assert_close(batched.logits[s], single.logits)
        torch.testing.assert_close(batched.scale[s], single.scale)


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_gradients_reach_every_parameter(covariance):
    net = MixtureDensityNetwork(2, 2, 3, (8,), covariance=covariance)
    p = net(torch.randn(5, 2))
    (p.logits.sum() + p.loc.sum() + p.scale.sum()).backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_components": 0}, "n_components"),
        ({"d_x": 0}, "d_x"),
        ({"hidden": (4, 0)}, "hidden"),
        ({"activation": "sigmoidish"}, "activation"),
        ({"covariance": "banded"}, "covariance"),
        ({"min_scale": 0.0}, "min_scale"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"d_x": 1, "d_y": 1, "n_components": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        MixtureDensityNetwork(**args)


def test_mixture_params_map():
    p = MixtureParams(torch.zeros(2, 3), torch.zeros(2, 3, 1), torch.ones(2, 3, 1))
    q = p.map(lambda t: t[:1])
    assert q.logits.shape == (1, 3) and q.n_components == 3 and q.event_dim == 1


def test_batched_last_layer_only():
    net = MixtureDensityNetwork(1, 2, 3, (6,))
    x = torch.randn(4, 1)
    w = net.head.weight.detach().expand(5, *net.head.weight.shape)
    p = net(x, {"head.weight": w})
    assert p.loc.shape == (5, 4, 3, 2)
    torch.testing.assert_close(p.loc[2], net(x).loc)


@pytest.mark.parametrize(("covariance", "d_y"), [("diagonal", 1), ("diagonal", 2), ("full", 3)])
def test_select_keeps_one_component(covariance, d_y):
    # select + split(n_components=1) gives exactly the chosen component's parameters.
    net = MixtureDensityNetwork(2, d_y, 4, (5,), covariance=covariance)
    out = net.raw(torch.randn(6, 2))
    assert out.shape == (6, net.n_outputs)
    full = net.split(out)
    component = torch.tensor([0, 3, 1, 2, 3, 0])
    one = net.split(net.select(out, component), n_components=1)
    rows = torch.arange(6)
    torch.testing.assert_close(one.logits[:, 0], full.logits[rows, component])
    torch.testing.assert_close(one.loc[:, 0], full.loc[rows, component])
    torch.testing.assert_close(one.scale[:, 0], full.scale[rows, component])


@pytest.mark.parametrize(
    ("x_shape", "w_batch"), [((7, 3), 4), ((4, 7, 3), 4), ((1, 7, 3), 4), ((4, 7, 3), 1)]
)
def test_batched_linear_matches_per_draw_linear(x_shape, w_batch):
    from bayes_mdn.nets import _linear

    x = torch.randn(x_shape)
    weight, bias = torch.randn(w_batch, 5, 3), torch.randn(w_batch, 5)
    out = _linear(x, weight, bias)
    assert out.shape == (4, 7, 5)
    for i in range(4):
        xi = x if x.dim() == 2 else x[i % len(x)]
        j = i % w_batch
        torch.testing.assert_close(out[i], torch.nn.functional.linear(xi, weight[j], bias[j]))
