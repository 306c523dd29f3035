import matplotlib
import pyro
import pytest
import torch

matplotlib.use("Agg")


def pytest_configure(config: pytest.Config) -> None:
    # Two cores: one torch thread per test process keeps timings stable and leaves room.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_clear() -> None:
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
