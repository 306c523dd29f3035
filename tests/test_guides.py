import pytest
import torch

from bayes_mdn._utils import pyro_scope
from bayes_mdn.guides import PointGuide, draw_latents, is_deterministic, make_guide
from tests.helpers import small_data, small_model


@pytest.mark.parametrize("name", ["delta", "normal", "lowrank"])
def test_draws_have_the_site_shapes(name):
    model = small_model("all")
    guide = make_guide(model, name)
    x, y = small_data(8)
    with pyro_scope():
        guide(x, y)
        draws = draw_latents(guide, 7)
    assert set(draws) == set(model.latent_names)
    for site, shape in model.latent_shapes.items():
        assert draws[site].shape == (7, *shape)
    assert is_deterministic(guide) == (name == "delta")
    if name == "delta":
        assert torch.equal(draws["head.weight"][0], draws["head.weight"][6])
    else:
        assert not torch.equal(draws["head.weight"][0], draws["head.weight"][6])


@pytest.mark.parametrize("name", ["delta", "normal", "lowrank"])
def test_guides_start_at_the_network_initialization(name):
    model = small_model("last")
    guide = make_guide(model, name, init_scale=1e-6)
    x, y = small_data(8)
    with pyro_scope():
        guide(x, y)
        draws = draw_latents(guide, 2)
    torch.testing.assert_close(draws["head.weight"][0], model.net.head.weight, atol=1e-4, rtol=0)


def test_point_guide_for_models_without_latents():
    model = small_model("none")
    guide = make_guide(model, "delta")
    assert isinstance(guide, PointGuide)
    assert draw_latents(guide, 3) == {}
    with pytest.raises(ValueError, match="bayesian='none'"):
        make_guide(model, "normal")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"name": "foo"}, "guide"), ({"init_scale": 0.0}, "init_scale"), ({"rank": 0}, "rank")],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_guide(small_model("last"), **({"name": "lowrank"} | kwargs))
