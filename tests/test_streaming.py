"""Streamed data (Parquet, DataLoader) and data-parallel fits on several processes."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bayes_mdn import BayesianMDN, LoaderSource, ParquetSource, streaming
from bayes_mdn.config import cxx_available
from bayes_mdn.datasets import make_inverse_sine
from bayes_mdn.sources import ArraySource, RunningMoments
from bayes_mdn.streaming import scan
from tests.helpers import CrashingSource

# Small and quick: a few hundred steps of a narrow network, in float64 so that fits that
# must agree "to rounding" can be held to 1e-10.
SMALL = dict(
    n_components=3,
    hidden=(16,),
    n_members=2,
    epochs=3,
    batch_size=200,
    dtype="float64",
    progress=False,
)


@pytest.fixture(scope="module")
def rows():
    X, y = make_inverse_sine(1200, seed=3)
    return X, y


@pytest.fixture(scope="module")
def parquet_file(rows, tmp_path_factory):
    X, y = rows
    path = tmp_path_factory.mktemp("stream") / "rows.parquet"
    # Row groups of 250 rows: the reader's batches never line up with the windows.
    pq.write_table(
        pa.table({"x": X[:, 0], "noise": np.zeros(len(X)), "y": y}), path, row_group_size=250
    )
    return path


def _params(mdn):
    return [p.detach().clone() for p in mdn.guide_.parameters()] + [
        t.detach().clone() for t in mdn.model_.state_dict().values()
    ]


def _max_diff(a, b):
    assert len(a) == len(b)
    return max((u - v).abs().max().item() for u, v in zip(a, b))


def test_running_moments_match_numpy_far_from_zero():
    rng = np.random.default_rng(0)
    data = 1e9 + rng.normal(size=(10_000, 3)) * [1.0, 1e-3, 1e3]
    m = RunningMoments(3)
    for block in np.array_split(data, [1, 7, 4000, 4001, 9000]):
        m.update(block)
    assert m.count == len(data)
    # A handful of float64 roundings of values near 1e9.
    np.testing.assert_allclose(m.mean, data.mean(0), rtol=1e-13)
    # Subtracting 1e9 is exact here, so the centred two-pass spread is the reference. The
    # merge of block moments keeps it to about 1e-7 relative even in the 1e-3 column,
    # whose sum of squares (1e18 per row) float64 cannot resolve at all.
    np.testing.assert_allclose(m.std(), (data - 1e9).std(0, ddof=1), rtol=1e-6)


def test_scan_does_not_depend_on_how_the_rows_are_chunked(rows, parquet_file):
    X, y = rows
    a = scan(ParquetSource(parquet_file, x=["x"], y=["y"], read_rows=97), 5, 0.1, window_rows=300)
    b = scan(ArraySource(X, y[:, None], read_rows=1000), 5, 0.1, window_rows=300)
    assert a.n_rows == b.n_rows == len(X)
    assert a.n_val == b.n_val == round(0.1 * len(X))
    np.testing.assert_array_equal(a.x_val, b.x_val)
    np.testing.assert_allclose([a.x_loc, a.x_scale], [b.x_loc, b.x_scale], rtol=1e-13)
    np.testing.assert_allclose(a.x_loc, X.mean(0), rtol=1e-13)
    np.testing.assert_allclose(a.y_scale, y.std(ddof=1), rtol=1e-13)


def test_max_val_rows_caps_the_held_out_rows(rows):
    X, y = rows
    plan = scan(ArraySource(X, y[:, None]), 0, 0.5, max_val_rows=50, window_rows=128)
    assert plan.n_val == 50 and plan.n_train == len(X) - 50


def test_parquet_fit_equals_the_fit_of_the_same_rows_from_memory(rows, parquet_file):
    X, y = rows
    from_disk = BayesianMDN(**SMALL).fit(ParquetSource(parquet_file, x=["x"], y=["y"]))
    from_memory = BayesianMDN(**SMALL).fit(ArraySource(X, y[:, None], y_1d=True))
    assert _max_diff(_params(from_disk), _params(from_memory)) == 0
    assert from_disk.history_.val_nll == from_memory.history_.val_nll
    assert not hasattr(from_disk, "feature_names_in_")
    assert from_disk.n_rows_ == len(X)
    assert from_disk.predict(X[:3]).shape == (3,)


def test_a_dataloader_streams_like_the_arrays_it_holds(rows):
    X, y = rows
    loader = DataLoader(TensorDataset(torch.as_tensor(X), torch.as_tensor(y)), batch_size=77)
    from_loader = BayesianMDN(**SMALL).fit(loader)
    from_arrays = BayesianMDN(**SMALL).fit(ArraySource(X, y[:, None], y_1d=True))
    assert _max_diff(_params(from_loader), _params(from_arrays)) == 0
    assert from_loader.predict(X[:2]).shape == (2,)


def test_streamed_fit_predicts_about_as_well_as_the_in_memory_fit(rows):
    X, y = rows
    X_test, y_test = make_inverse_sine(4000, seed=4)
    options = dict(SMALL, epochs="auto", dtype="float32")
    streamed = BayesianMDN(**options).fit(ArraySource(X, y[:, None], y_1d=True))
    in_memory = BayesianMDN(**options).fit(X, y)
    # Two fits of one model that differ only in their held-out rows and shuffles: their
    # test NLLs differ by seed-to-seed noise, measured at about 0.01-0.03 nats for this
    # size; 0.1 is several times that, and a broken stream (wrong scaling, no shuffling,
    # held-out rows trained on) costs far more.
    assert abs(streamed.score(X_test, y_test) - in_memory.score(X_test, y_test)) < 0.1


@pytest.mark.slow
def test_two_processes_give_the_parameters_of_one_fed_the_same_global_batches(rows):
    X, y = rows
    source = ArraySource(X, y[:, None], y_1d=True)
    one = BayesianMDN(**SMALL).fit(source)
    two = BayesianMDN(devices=2, **SMALL).fit(source)
    # The same objective (see bayes_mdn.streaming): only the order of two partial sums
    # differs, a few ulps per step in float64.
    assert _max_diff(_params(one), _params(two)) < 1e-10
    assert one.n_steps_ == two.n_steps_
    np.testing.assert_allclose(one.history_.val_nll, two.history_.val_nll, rtol=1e-10)


@pytest.mark.slow
def test_spawned_workers_give_the_parameters_of_forked_ones(rows, monkeypatch):
    # Forked workers are the default on Linux CPUs; spawned ones (GPUs, other systems,
    # several threads a process) start fresh interpreters and must train the same model.
    X, y = rows
    source = ArraySource(X, y[:, None], y_1d=True)
    forked = BayesianMDN(devices=2, **SMALL).fit(source)
    monkeypatch.setattr(streaming, "_strategy", lambda *args: "ddp_spawn")
    spawned = BayesianMDN(devices=2, **SMALL).fit(source)
    assert _max_diff(_params(forked), _params(spawned)) == 0


def test_workers_are_forked_only_where_that_is_safe(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("sys.platform", "linux")
    assert streaming._strategy(cpu, 1) == "ddp_fork"
    assert streaming._strategy(cpu, 1, compiles=True) == "ddp_spawn"
    assert streaming._strategy(cpu, 2) == "ddp_spawn"
    assert streaming._strategy(cpu, None) == "ddp_spawn"
    assert streaming._strategy(torch.device("cuda", 0), 1) == "ddp_spawn"
    monkeypatch.setattr("torch.cuda.is_initialized", lambda: True)
    assert streaming._strategy(cpu, 1) == "ddp_spawn"
    monkeypatch.setattr("torch.cuda.is_initialized", lambda: False)
    monkeypatch.setattr("sys.platform", "darwin")
    assert streaming._strategy(cpu, 1) == "ddp_spawn"


@pytest.mark.slow
def test_two_processes_from_parquet_in_float32(rows, parquet_file):
    X, _ = rows
    # The default network and 5 members: a result larger than a pipe's buffer (64 KiB)
    # comes back from the workers too.
    options = dict(epochs=2, batch_size=200, progress=False)
    source = ParquetSource(parquet_file, x=["x", "noise"], y=["y"])
    one = BayesianMDN(**options).fit(source)
    two = BayesianMDN(devices=2, **options).fit(source)
    # float32 rounding of two partial sums, carried through a few hundred Adam steps.
    assert _max_diff(_params(one), _params(two)) < 1e-3
    assert two.predict(np.c_[X[:2], np.zeros(2)]).shape == (2,)


def _backbone() -> nn.Module:
    torch.manual_seed(0)  # the module's own initialization, the same in every fit
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh())


def test_a_backbone_streams_like_the_same_rows_from_memory(rows, parquet_file):
    X, y = rows
    options = dict(SMALL, hidden=())
    source = ParquetSource(parquet_file, x=["x"], y=["y"])
    from_disk = BayesianMDN(backbone=_backbone(), **options).fit(source)
    from_memory = BayesianMDN(backbone=_backbone(), **options).fit(
        ArraySource(X, y[:, None], y_1d=True)
    )
    assert any(n.startswith("backbone.") for n, _ in from_disk.model_.net.named_parameters())
    assert _max_diff(_params(from_disk), _params(from_memory)) == 0


@pytest.mark.slow
def test_two_processes_train_a_backbone_as_one(rows):
    X, y = rows
    source = ArraySource(X, y[:, None], y_1d=True)
    options = dict(SMALL, hidden=(), bayesian="all")
    one = BayesianMDN(backbone=_backbone(), **options).fit(source)
    two = BayesianMDN(backbone=_backbone(), devices=2, **options).fit(source)
    assert _max_diff(_params(one), _params(two)) < 1e-10


@pytest.mark.slow
def test_an_error_in_the_workers_reaches_the_caller_as_itself(rows):
    X, y = rows
    loader = DataLoader(
        TensorDataset(torch.as_tensor(X), torch.as_tensor(y)), batch_size=100, shuffle=True
    )
    # Each worker's first training pass finds other rows than the scan did.
    with pytest.raises(ValueError, match="the data changed between passes"):
        BayesianMDN(devices=2, **SMALL).fit(loader)


@pytest.mark.slow
def test_a_checkpoint_written_by_two_processes_resumes_on_one(rows, tmp_path):
    X, y = rows
    path = tmp_path / "fit.ckpt"
    source = ArraySource(X, y[:, None], y_1d=True)
    # 54 steps an epoch, validation rounds (and checkpoints) every 25 steps.
    options = dict(SMALL, epochs=4, batch_size=20, val_draws=2)
    # Pass 1 is the scan, in this process; a worker's copy of the source then starts
    # epoch 0 on pass 2 and crashes as epoch 1 starts (pass 3), after the round that
    # ended at step 50: the resume starts inside epoch 0.
    with pytest.raises(RuntimeError, match="simulated crash"):
        BayesianMDN(devices=2, **options).fit(
            CrashingSource(source, 3), checkpoint=path, checkpoint_every=1
        )
    assert path.exists()
    resumed = BayesianMDN(**options).fit(source, checkpoint=path, checkpoint_every=1, resume=True)
    uninterrupted = BayesianMDN(**options).fit(source)
    assert _max_diff(_params(resumed), _params(uninterrupted)) < 1e-10
    assert resumed.n_steps_ == uninterrupted.n_steps_


def test_checkpoint_resume_in_one_process_is_exact(rows, tmp_path):
    X, y = rows
    path = tmp_path / "fit.ckpt"
    source = ArraySource(X, y[:, None], y_1d=True)
    options = dict(SMALL, epochs=4, batch_size=20, val_draws=2)
    # Crashes as epoch 2 starts (step 108), after the round that ended at step 100.
    with pytest.raises(RuntimeError, match="simulated crash"):
        BayesianMDN(**options).fit(CrashingSource(source, 4), checkpoint=path, checkpoint_every=1)
    assert path.exists()
    resumed = BayesianMDN(**options).fit(source, checkpoint=path, checkpoint_every=1, resume=True)
    uninterrupted = BayesianMDN(**options).fit(source)
    assert _max_diff(_params(resumed), _params(uninterrupted)) == 0


def test_a_shuffling_loader_is_refused(rows):
    X, y = rows
    loader = DataLoader(
        TensorDataset(torch.as_tensor(X), torch.as_tensor(y)), batch_size=100, shuffle=True
    )
    with pytest.raises(ValueError, match="the data changed between passes"):
        BayesianMDN(**SMALL).fit(loader)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda p: ParquetSource(p, x=["nope"], y=["y"]), ValueError, r"\['nope'\] are not in"),
        (lambda p: ParquetSource(p, x=["x"], y=["x"]), ValueError, "more than once"),
        (lambda p: ParquetSource(p, x=[], y=["y"]), ValueError, "non-empty list"),
        (lambda p: ParquetSource(p, x="x", y=["y"]), ValueError, "non-empty list"),
        (
            lambda p: ParquetSource(p.parent / "missing.parquet", x=["x"], y=["y"]),
            FileNotFoundError,
            "missing.parquet",
        ),
    ],
)
def test_bad_parquet_arguments_fail_before_reading(parquet_file, make, error, match):
    with pytest.raises(error, match=match):
        make(parquet_file)


def test_hostile_parquet_contents_are_named(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0], "s": ["a", "b", "c"]}), path)
    with pytest.raises(ValueError, match=r"column 's' .* not numeric"):
        ParquetSource(path, x=["x"], y=["s"])
    pq.write_table(pa.table({"x": [1.0, None, 3.0], "y": [1.0, 2.0, 3.0]}), path)
    with pytest.raises(ValueError, match=r"column 'x' .* missing a value at row 1"):
        BayesianMDN(**SMALL).fit(ParquetSource(path, x=["x"], y=["y"]))
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0], "y": [1.0, np.inf, 3.0]}), path)
    with pytest.raises(ValueError, match="target y holds inf at row 1"):
        BayesianMDN(**SMALL).fit(ParquetSource(path, x=["x"], y=["y"]))
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0], "y": [1.0, 1e39, 3.0]}), path)
    with pytest.raises(ValueError, match="beyond the float32 range"):
        BayesianMDN(**dict(SMALL, dtype="float32")).fit(ParquetSource(path, x=["x"], y=["y"]))
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="not a readable Parquet"):
        ParquetSource(path, x=["x"], y=["y"])


def test_misuse_of_streamed_fits_is_named(rows, parquet_file):
    X, y = rows
    source = ParquetSource(parquet_file, x=["x"], y=["y"])
    with pytest.raises(TypeError, match="ParquetSource"):
        BayesianMDN(**SMALL).fit(str(parquet_file))
    with pytest.raises(ValueError, match="y=None"):
        BayesianMDN(**SMALL).fit(source, y)
    with pytest.raises(ValueError, match="guide='lowrank' is fitted on in-memory data"):
        BayesianMDN(**dict(SMALL, guide="lowrank")).fit(source)
    with pytest.raises(ValueError, match="method='nuts' needs the data in memory"):
        BayesianMDN(**dict(SMALL, method="nuts")).fit(source)
    with pytest.raises(TypeError, match="one-shot iterator"):
        BayesianMDN(**SMALL).fit(iter([(X, y)]))
    with pytest.raises(TypeError, match="not an \\(x, y\\) pair"):
        LoaderSource([X])
    for devices in (0, 1.5, True):
        with pytest.raises(ValueError, match="devices must be an integer >= 1"):
            BayesianMDN(devices=devices).fit(X, y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_fit_on_a_gpu(rows, parquet_file):
    options = dict(SMALL, device="cuda")
    source = ParquetSource(parquet_file, x=["x"], y=["y"])
    on_gpu = BayesianMDN(**options).fit(source)
    on_cpu = BayesianMDN(**SMALL).fit(source)
    assert on_gpu.model_.x_loc.device.type == "cuda"
    # Other kernels, same model: float64 rounding differences through a few hundred steps.
    assert _max_diff([p.cpu() for p in _params(on_gpu)], _params(on_cpu)) < 1e-6


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL)")
def test_two_gpus_give_the_parameters_of_one(rows, parquet_file):
    options = dict(SMALL, device="cuda")
    source = ParquetSource(parquet_file, x=["x"], y=["y"])
    one = BayesianMDN(**options).fit(source)
    two = BayesianMDN(devices=2, **options).fit(source)
    assert _max_diff(_params(one), _params(two)) < 1e-8


@pytest.mark.slow
@pytest.mark.skipif(
    not cxx_available(),
    reason="torch.compile on the CPU needs a C++ compiler",
)
@pytest.mark.parametrize("devices", [1, 2])
def test_a_compiled_streamed_fit_gives_the_eager_numbers(rows, devices):
    # With two processes the compiled module runs inside DDP, in spawned workers.
    X, y = rows
    source = ArraySource(X, y[:, None], y_1d=True)
    eager = BayesianMDN(compile=False, devices=devices, **SMALL).fit(source)
    compiled = BayesianMDN(compile=True, devices=devices, **SMALL).fit(source)
    assert _max_diff(_params(eager), _params(compiled)) < 1e-9
