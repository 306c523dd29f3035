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
        ({"prior_function": -1.0}, "prior_function"),
        ({"prior_function": float("nan")}, "prior_function"),
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
def test_sample_follows_the_mixture(covariance, d_y):
    # Each coordinate's draws against the exact marginal CDF of the mixture (KS distance),
    # and for full covariance the sample covariance against the exact one.
    torch.manual_seed(0)
    net = MixtureDensityNetwork(2, d_y, 4, (5,), covariance=covariance).double()
    with torch.no_grad():
        net.head.weight.mul_(20)  # distinct, unequal components per row
    x = torch.randn(3, 2, dtype=torch.float64)
    n = 20_000
    y = net.sample(x, num_draws=n, max_elements=500)  # several chunks of x
    assert y.shape == (n, 3, d_y)
    with torch.no_grad():
        params = net(x)
    pit = params.distribution().cdf(y).sort(0).values  # (n, 3, d)
    grid = torch.arange(1, n + 1, dtype=torch.float64)[:, None, None] / n
    ks = (pit - grid).abs().amax(0)
    assert float(ks.max()) < 1.8 / n**0.5  # KS critical value at about 0.3% per test
    if covariance == "full":
        for row in range(3):
            sample_cov = torch.cov(y[:, row].T)
            exact = params.distribution().covariance_matrix[row]
            torch.testing.assert_close(
                sample_cov, exact, atol=0.05 * float(exact.abs().max()), rtol=0
            )


@pytest.mark.parametrize("layers", ["head", "all"])
def test_sample_uses_each_draw_of_the_weights(layers):
    # Draw b of y comes from weights b: shifting one draw's location bias shifts only it.
    torch.manual_seed(1)
    net = MixtureDensityNetwork(1, 1, 3, (6,)).double()
    params = dict(net.named_parameters())
    names = [n for n in params if layers == "all" or n.startswith("head")]
    weights = {n: params[n].detach().expand(4, *params[n].shape).clone() for n in names}
    weights["head.bias"][2, 3:6] += 100.0  # the location block of draw 2
    x = torch.randn(5, 1, dtype=torch.float64)
    y = torch.stack([net.sample(x, weights) for _ in range(200)])  # (200, 4, 5, 1)
    assert y.shape == (200, 4, 5, 1)
    shift = y.mean(0) - y.mean(0)[0]
    assert float(shift[2].min()) > 90
    assert float(shift[[1, 3]].abs().max()) < 5


def test_sample_without_weights_or_rows():
    net = MixtureDensityNetwork(2, 2, 3, (4,))
    assert net.sample(torch.randn(6, 2)).shape == (6, 2)
    assert net.sample(torch.zeros(0, 2), num_draws=5).shape == (5, 0, 2)


@pytest.mark.parametrize("d_in", [3, 1])
@pytest.mark.parametrize(
    ("x_shape", "w_batch"), [((7,), 4), ((4, 7), 4), ((1, 7), 4), ((4, 7), 1)]
)
def test_batched_linear_matches_per_draw_linear(x_shape, w_batch, d_in):
    """Every broadcast of inputs against weights, by batched GEMM and, for one input
    feature, by the outer-product path."""
    from bayes_mdn.nets import _linear

    x = torch.randn(*x_shape, d_in)
    weight, bias = torch.randn(w_batch, 5, d_in), torch.randn(w_batch, 5)
    out = _linear(x, weight, bias)
    assert out.shape == (4, 7, 5)
    for i in range(4):
        xi = x if x.dim() == 2 else x[i % len(x)]
        j = i % w_batch
        torch.testing.assert_close(out[i], torch.nn.functional.linear(xi, weight[j], bias[j]))


def test_batched_linear_refuses_batches_that_do_not_broadcast():
    from bayes_mdn.nets import _linear

    with pytest.raises(RuntimeError, match="3 batches of inputs do not broadcast with 4"):
        _linear(torch.randn(3, 7, 2), torch.randn(4, 5, 2), torch.randn(4, 5))


def test_one_feature_linear_has_the_gradients_of_batched_gemm():
    from bayes_mdn.nets import _linear

    x = torch.randn(4, 7, 1, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 5, 1, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    out = _linear(x, weight, bias)
    ref = torch.baddbmm(bias.unsqueeze(-2), x, weight.mT)
    grads = torch.autograd.grad(out.square().sum(), (x, weight, bias))
    expected = torch.autograd.grad(ref.square().sum(), (x, weight, bias))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("hidden", [(), (8, 4)])
def test_prior_function_moves_only_the_means_and_is_never_trained(hidden):
    torch.manual_seed(0)
    plain = MixtureDensityNetwork(2, 2, 3, hidden)
    torch.manual_seed(0)
    net = MixtureDensityNetwork(2, 2, 3, hidden, prior_function=0.7)
    # The trained network is drawn first, so the same seed gives the same one.
    shared = dict(plain.named_parameters())
    for name, param in net.named_parameters():
        if name.startswith("prior."):
            assert not param.requires_grad
        else:
            torch.testing.assert_close(param, shared[name])
    x = torch.randn(6, 2)
    a, b = plain(x), net(x)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.scale, b.scale)
    # The means move by 0.7 times the fixed network's output.
    h = x
    for i, layer in enumerate(net.prior):
        h = layer(h)
        if i < len(net.prior) - 1:
            h = torch.relu(h)
    torch.testing.assert_close(b.loc - a.loc, 0.7 * h.reshape(6, 3, 2))
    assert (b.loc - a.loc).abs().max() > 0.01


def test_prior_function_is_the_same_on_every_evaluation_path():
    """raw (the losses), head_by_rows (densities, sampling) and batched weights agree."""
    torch.manual_seed(1)
    net = MixtureDensityNetwork(1, 1, 3, (6, 5), prior_function=0.5)
    x, z = torch.randn(9, 1), torch.randn(9, 1)
    draws = {
        name: p.detach() + 0.1 * torch.randn(4, *p.shape) for name, p in net.named_parameters()
    }
    p = net(x, draws)
    comp = torch.distributions.Normal(p.loc[..., 0], p.scale[..., 0]).log_prob(z)
    expected = torch.logsumexp(torch.log_softmax(p.logits, -1) + comp, -1)
    rows = torch.cat([lp for _, lp in net.log_prob_by_rows(x, z, draws, max_elements=40)], -1)
    torch.testing.assert_close(rows, expected)
    for s in range(4):
        single = net(x, {k: v[s] for k, v in draws.items()})
        torch.testing.assert_close(single.loc, p.loc[s])


def test_head_by_rows_bounds_the_hidden_layers_of_drawn_networks_too():
    # An ensemble's draws replace every weight, so each hidden layer's output is
    # (draws, rows, width): chunking must count that tensor, not only the head's.
    torch.manual_seed(0)
    net = MixtureDensityNetwork(1, 1, 3, hidden=(64, 16))
    draws, max_elements = 40, 20_000
    weights = {
        name: p.detach() + 0.1 * torch.randn(draws, *p.shape) for name, p in net.named_parameters()
    }
    x = torch.randn(1000, 1)
    largest = []
    original = net.features

    def features(rows, w):
        h = original(rows, w)
        largest.append(h.shape[-2] * draws * 64)  # the first layer's output, the widest
        return h

    net.features = features
    chunks = list(net.head_by_rows(x, weights, max_elements))
    assert sum(r.stop - r.start for r, _ in chunks) == len(x)
    assert max(largest) <= max_elements
    whole = net.raw(x, weights)  # (draws, rows, outputs), in one pass
    by_rows = torch.cat([head for _, head in chunks], -1)
    torch.testing.assert_close(by_rows, whole.mT)
