"""fastopt.distributed: data parallelism and ZeRO-1 over MPI.

The MPI tests launch ``mpiexec -n N python tests/mpi_scripts/<script>.py OUTDIR`` (N = 2 and 3 by
default; ``FASTOPT_MPI_WORLDS=2,3,4`` changes it) and assert on the files the ranks write; the
single-process references are computed here with the same model (``mpi_scripts/problem.py``).
They are skipped, with the reason, when mpi4py or mpiexec is missing or a 2-rank probe fails;
``FASTOPT_REQUIRE_MPI=1`` turns that skip into a failure (for CI). Works with MPICH (the
``mpich`` wheel: ``pip install fastopt[mpi]``) and Open MPI (``--oversubscribe``, and
``--allow-run-as-root`` when run as root).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fastopt as fo
from fastopt import distributed as dist

SCRIPTS = pathlib.Path(__file__).resolve().parent / "mpi_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import ckpt_save  # noqa: E402
import launch  # noqa: E402
import problem as P  # noqa: E402

WORLDS = [int(w) for w in os.environ.get("FASTOPT_MPI_WORLDS", "2,3").split(",") if w.strip()]


# --------------------------------------------------------------------------- launching


def _require_mpi():
    launcher, reason = launch.launcher()
    if launcher is None:
        if os.environ.get("FASTOPT_REQUIRE_MPI") == "1":
            pytest.fail(f"FASTOPT_REQUIRE_MPI=1 but: {reason}")
        pytest.skip(reason)


def mpirun(n, script, outdir, *args, cwd=None):
    """Run ``script`` on ``n`` ranks (``n=0``: plain ``python``, no mpiexec: a singleton MPI)."""
    if n:
        _require_mpi()
    elif importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'fastopt[mpi]')")
    argv = launch.argv(n, SCRIPTS / script, outdir, *args)
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=launch.TIMEOUT, env=launch.env(), cwd=cwd
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{' '.join(argv)} timed out after {launch.TIMEOUT} s\n{exc.stdout}\n{exc.stderr}"
        )
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


# --------------------------------------------------------------------------- references


def reference_train(cls, kw, dtype, clip, world, steps, per_rank_batch=4):
    """One process, global batch ``per_rank_batch * world``, started from rank 0's values."""
    X, Y = P.data(dtype)
    ps = P.init_params(dtype, seed=0)
    opt = cls(ps, max_grad_norm=clip, **kw)
    for step in range(steps):
        P.set_grad(ps, X, Y, P.batch(step, per_rank_batch * world, 0, 1))
        opt.step()
    return ps.flat.copy()


def tol(dtype):
    return {"rtol": 1e-10, "atol": 1e-12} if dtype == "float64" else {"rtol": 2e-5, "atol": 1e-6}


# --------------------------------------------------------------------------- without MPI


@pytest.mark.parametrize("n", [0, 1, 2, 5, 19, 20, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_sizes_cover_the_buffer(n, world):
    counts, displs = dist.shard_sizes(n, world)
    assert sum(counts) == n and len(counts) == world
    assert max(counts) - min(counts) <= 1 and counts[0] == max(counts)
    assert max(counts) == -(-n // world)
    for r in range(world):
        lo, hi = dist.shard_bounds(n, world, r)
        assert (lo, hi) == (displs[r], displs[r] + counts[r])
        if r:
            assert lo == dist.shard_bounds(n, world, r - 1)[1]


@pytest.mark.parametrize("n", [0, 1, 10, 48, 49])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_indices_partition(n, world):
    parts = [dist.shard_indices(n, 4, 7, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # same number of steps on every rank
    allidx = np.concatenate(parts)
    assert set(allidx.tolist()) == set(range(n))
    assert len(allidx) == -(-n // world) * world
    dropped = [dist.shard_indices(n, 4, 7, r, world, drop_last=True) for r in range(world)]
    assert all(len(p) == n // world for p in dropped)
    assert len(set(np.concatenate(dropped).tolist())) == (n // world) * world
    # the same on every call, different per epoch
    assert np.array_equal(parts[0], dist.shard_indices(n, 4, 7, 0, world))
    if n >= 10:
        assert not np.array_equal(parts[0], dist.shard_indices(n, 5, 7, 0, world))
    plain = dist.shard_indices(n, 4, 7, 0, 1, shuffle=False)
    assert np.array_equal(plain, np.arange(n))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shard_indices_batches_union_is_the_global_batch(world):
    """Batch k of size b on every rank together = batch k of size world*b on one process."""
    b, n = 4, 48
    one = dist.shard_indices(n, 2, 11, 0, 1)
    parts = [dist.shard_indices(n, 2, 11, r, world) for r in range(world)]
    for k in range(n // (b * world)):
        together = np.concatenate([p[k * b : (k + 1) * b] for p in parts])
        assert sorted(together) == sorted(one[k * b * world : (k + 1) * b * world])


def test_bad_sharding_arguments():
    with pytest.raises(ValueError):
        dist.shard_indices(10, 0, 0, 2, 2)
    with pytest.raises(ValueError):
        dist.shard_indices(-1, 0, 0, 0, 1)
    with pytest.raises(ValueError):
        dist.shard_sizes(10, 0)
    with pytest.raises(ValueError):
        dist.shard_bounds(10, 2, 2)


def test_without_mpi4py_imports_and_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    assert dist.available() is False
    assert len(dist.shard_indices(10, 0, 0, 0, 2)) == 5
    ps = fo.ParamSet({"w": np.zeros(3)})
    with pytest.raises(ImportError, match=r"fastopt\[mpi\]"):
        dist.DataParallel(ps, fo.SGD(ps, lr=0.1))


# --------------------------------------------------------------------------- MPI runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Lazily run each (script, world) once per module; returns the output directory."""
    done = {}

    def get(script, world):
        key = (script, world)
        if key not in done:
            out = tmp_path_factory.mktemp(f"{script.removesuffix('.py')}-{world}")
            mpirun(world, script, out)
            done[key] = out
        return done[key]

    return get


def _train(runs, world):
    out = runs("train.py", world)
    ranks = [dict(np.load(out / f"train_rank{r}.npz")) for r in range(world)]
    infos = [json.loads((out / f"train_rank{r}.json").read_text()) for r in range(world)]
    return ranks, infos


SCENARIOS = [
    (name, clip, dtype)
    for name in P.OPTIMIZERS
    for clip in (None, 0.5)
    for dtype in ("float64", "float32")
]


@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_holds_the_same_parameters(runs, world):
    ranks, infos = _train(runs, world)
    assert all(info["world"] == world for info in infos)
    for key in ranks[0]:
        for r in range(1, world):
            assert np.array_equal(ranks[0][key], ranks[r][key]), (key, r)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name,clip,dtype", SCENARIOS)
def test_data_parallel_equals_one_process_with_the_global_batch(runs, world, name, clip, dtype):
    ranks, _ = _train(runs, world)
    cls, kw = P.OPTIMIZERS[name]
    ref = reference_train(cls, kw, np.dtype(dtype), clip, world, steps=12)
    got = ranks[0][f"dp-{name}-{clip}-{dtype}"]
    assert got.dtype == ref.dtype
    np.testing.assert_allclose(got, ref, **tol(dtype))
    assert not np.allclose(ref, P.init_params(np.dtype(dtype)).flat)  # it did train


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name,clip,dtype", SCENARIOS)
def test_zero1_equals_data_parallel(runs, world, name, clip, dtype):
    ranks, _ = _train(runs, world)
    zero = ranks[0][f"zero-{name}-{clip}-{dtype}"]
    np.testing.assert_allclose(zero, ranks[0][f"dp-{name}-{clip}-{dtype}"], **tol(dtype))
    cls, kw = P.OPTIMIZERS[name]
    ref = reference_train(cls, kw, np.dtype(dtype), clip, world, steps=12)
    np.testing.assert_allclose(zero, ref, **tol(dtype))


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", sorted(P.all_optimizer_classes()))
def test_zero1_works_with_every_optimizer(runs, world, name):
    ranks, _ = _train(runs, world)
    zero, dp = ranks[0][f"all-zero-{name}"], ranks[0][f"all-dp-{name}"]
    np.testing.assert_allclose(zero, dp, rtol=1e-10, atol=1e-12)
    cls, kw = P.all_optimizer_classes()[name]
    ref = reference_train(cls, kw, np.float64, 0.5, world, steps=5)
    np.testing.assert_allclose(dp, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("world", WORLDS)
def test_zero1_state_is_sharded(runs, world):
    _, infos = _train(runs, world)
    n = P.init_params().size
    counts, displs = dist.shard_sizes(n, world)
    for name in P.OPTIMIZERS:
        key = f"zero-{name}-None-float64"
        total = 0
        for r, info in enumerate(infos):
            entry = info["scenarios"][key]
            assert entry["shard"] == [displs[r], displs[r] + counts[r]]
            assert entry["state_elements"] == entry["slots"] * counts[r]
            assert entry["state_elements"] <= entry["slots"] * -(-n // world)
            total += entry["state_elements"]
        assert total == infos[0]["scenarios"][key]["slots"] * n


@pytest.mark.parametrize("world", WORLDS)
def test_uneven_shards(world):
    n = P.init_params().size
    counts, _ = dist.shard_sizes(n, world)
    assert len(set(counts)) == 2, "the test model should give uneven shards"


@pytest.mark.parametrize("world", WORLDS)
def test_one_collective_per_step(runs, world):
    """DP: one Allreduce of the gradient buffer; ZeRO-1: one Reduce_scatter + one Allgatherv
    (+ one 16-byte Allreduce for the global norm when clipping)."""
    _, infos = _train(runs, world)
    steps, n = 12, P.init_params().size
    for dtype, item in (("float64", 8), ("float32", 4)):
        for name in P.OPTIMIZERS:
            for info in infos:
                sc = info["scenarios"]
                dp = sc[f"dp-{name}-None-{dtype}"]
                assert dp["calls"] == {"Allreduce": steps}
                assert dp["bytes"] == {"Allreduce": steps * n * item}
                z = sc[f"zero-{name}-None-{dtype}"]
                assert z["calls"] == {"Reduce_scatter": steps, "Allgatherv": steps}
                assert z["bytes"] == {
                    "Reduce_scatter": steps * n * item,
                    "Allgatherv": steps * n * item,
                }
                zc = sc[f"zero-{name}-0.5-{dtype}"]
                assert zc["calls"] == {
                    "Reduce_scatter": steps,
                    "Allreduce(norm)": steps,
                    "Allgatherv": steps,
                }
                assert zc["bytes"]["Allreduce(norm)"] == steps * 16
                assert sc[f"dp-{name}-0.5-{dtype}"]["calls"] == {"Allreduce": steps}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("clip", [None, 0.5])
def test_block_collectives_when_the_world_divides_the_size(runs, world, clip):
    """19 + 5 padding elements = 24: Reduce_scatter_block + Allgather, same parameters."""
    ranks, infos = _train(runs, world)
    steps, n = 12, P.init_params(pad=5).size
    assert n % world == 0
    zero, dp = ranks[0][f"even-zero-adam-{clip}"], ranks[0][f"even-dp-adam-{clip}"]
    np.testing.assert_allclose(zero, dp, rtol=1e-10, atol=1e-12)
    ref = reference_train(fo.Adam, P.OPTIMIZERS["adam"][1], np.float64, clip, world, steps)
    np.testing.assert_allclose(zero[: ref.size], ref, rtol=1e-10, atol=1e-12)
    assert np.all(zero[ref.size :] == 0)
    for info in infos:
        calls = info["scenarios"][f"even-zero-adam-{clip}"]["calls"]
        expected = {"Reduce_scatter_block": steps, "Allgather": steps}
        if clip:
            expected["Allreduce(norm)"] = steps
        assert calls == expected
        assert info["scenarios"][f"even-dp-adam-{clip}"]["calls"] == {"Allreduce": steps}


# --------------------------------------------------------------------------- robustness


def _robust(runs, world):
    out = runs("robustness.py", world)
    infos = [json.loads((out / f"robust_rank{r}.json").read_text()) for r in range(world)]
    arrays = [dict(np.load(out / f"robust_rank{r}.npz")) for r in range(world)]
    return infos, arrays


def reference_nonfinite(world):
    import robustness as R

    X, Y = P.data()
    ps = P.init_params()
    opt = fo.Adam(ps, lr=0.05, max_grad_norm=1.0, skip_nonfinite=True)
    taken = []
    for step in range(R.STEPS):
        P.set_grad(ps, X, Y, P.batch(step, R.PER_RANK_BATCH * world, 0, 1))
        if step in R.BAD:
            ps.grad_flat[R.BAD[step][1]] = R.BAD[step][2]
        opt.step()
        taken.append(opt.last_step_taken)
    return ps.flat.copy(), taken


@pytest.mark.parametrize("world", WORLDS)
def test_nonfinite_gradient_on_one_rank_skips_everywhere(runs, world):
    infos, arrays = _robust(runs, world)
    ref, ref_taken = reference_nonfinite(world)
    assert ref_taken == [True, True, False, True, True, False, True, True]
    for info, arr in zip(infos, arrays):
        for mode in ("dp", "zero"):
            assert info[mode]["taken"] == ref_taken, mode
            assert info[mode]["skipped_steps"] == 2
            assert info[mode]["state_step"] == 6
            assert np.all(np.isfinite(arr[mode]))
            np.testing.assert_allclose(arr[mode], ref, rtol=1e-10, atol=1e-12)
        assert np.array_equal(arr["dp"], arrays[0]["dp"])
        assert np.array_equal(arr["zero"], arrays[0]["zero"])


@pytest.mark.parametrize("world", WORLDS)
def test_debug_checksum_detects_a_drifted_rank(runs, world):
    infos, _ = _robust(runs, world)
    for info in infos:
        assert info["checksum_raised"] is True
        assert "differ across ranks" in info["checksum_message"]


@pytest.mark.parametrize("world", WORLDS)
def test_average_metrics_and_shards(runs, world):
    infos, _ = _robust(runs, world)
    weights = np.arange(1, world + 1)
    expected_loss = float((weights * weights).sum() / weights.sum())
    for r, info in enumerate(infos):
        assert info["metrics"]["acc"] == pytest.approx(0.5)
        assert info["metrics"]["loss"] == pytest.approx(expected_loss)
        assert info["shard_indices"] == dist.shard_indices(10, 3, 42, r, world).tolist()


@pytest.mark.parametrize("world", WORLDS)
def test_fewer_elements_than_ranks(runs, world):
    infos, arrays = _robust(runs, world)
    tiny = fo.ParamSet({"t": np.array([1.0, -2.0])})
    opt = fo.Adam(tiny, lr=0.1, max_grad_norm=1.0)
    for step in range(3):
        tiny.grad_flat[...] = [0.5 * (step + 1), -1.5]
        opt.step()
    ref_m = opt.state_dict()["state"][0]["exp_avg"]
    for r, (info, arr) in enumerate(zip(infos, arrays)):
        assert info["tiny_shard"] == list(dist.shard_bounds(2, world, r))
        np.testing.assert_allclose(arr["tiny"], tiny.flat, rtol=1e-12)
        np.testing.assert_allclose(arr["tiny_exp_avg"], ref_m, rtol=1e-12)


@pytest.mark.parametrize("world", WORLDS)
def test_refusals_raise_on_every_rank(runs, world):
    infos, _ = _robust(runs, world)
    for info in infos:
        assert info["bad_algorithm_raised"] is True
        assert info["state_unchanged"] is True
        assert info["save_lambda_raised"] is True


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoint written by ZeRO-1 on 2 ranks, then loaded on 3 ranks, 1 rank (mpiexec -n 1)
    and one process without mpiexec."""
    out = tmp_path_factory.mktemp("ckpt")
    mpirun(2, "ckpt_save.py", out)
    return out


LOADS = [("w3", 3), ("w1", 1), ("single", 0)]


@pytest.mark.parametrize("tag,world", LOADS, ids=[t for t, _ in LOADS])
def test_sharded_checkpoint_loads_with_another_world_size(saved, tag, world):
    mpirun(world, "ckpt_load.py", saved, tag)
    ckpt = fo.load(saved / "ckpt.fo")
    assert ckpt.algorithm == "NAdam"
    assert ckpt.extra == {"step": ckpt_save.SAVE_AT}
    file_state = ckpt.optimizer_state["state"][0]
    gathered = dict(np.load(saved / "saved_state.npz"))
    loaded = dict(np.load(saved / f"loaded_{tag}.npz"))
    assert set(loaded) == set(gathered) == set(file_state) == {
        "exp_avg", "exp_avg_sq", "mu_product", "step",
    }  # fmt: skip
    for k in gathered:
        assert np.array_equal(loaded[k], gathered[k]), k  # identical state, bit for bit
        assert np.array_equal(np.asarray(file_state[k]), gathered[k]), k
    assert file_state["exp_avg"].shape == (P.init_params().size,)

    final = np.load(saved / "uninterrupted_rank0.npz")["flat"]
    assert np.array_equal(final, np.load(saved / "uninterrupted_rank1.npz")["flat"])
    for r in range(max(world, 1)):
        res = np.load(saved / f"resumed_{tag}_rank{r}.npz")
        np.testing.assert_allclose(res["zero"], final, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(res["dp"], final, rtol=1e-10, atol=1e-12)


def test_sharded_checkpoint_loads_into_a_plain_optimizer(saved):
    """No MPI at all: fastopt.load(...).restore(...) into fo.NAdam(ps) and train on."""
    ps = P.init_params(seed=5)
    opt = fo.NAdam(ps, **ckpt_save.KW)
    ckpt = fo.load(saved / "ckpt.fo")
    ckpt.restore(params=ps, optimizer=opt)
    X, Y = P.data()
    for step in range(ckpt.extra["step"], ckpt_save.STEPS):
        P.set_grad(ps, X, Y, P.batch(step, ckpt_save.GLOBAL_BATCH, 0, 1))
        opt.step()
    final = np.load(saved / "uninterrupted_rank0.npz")["flat"]
    np.testing.assert_allclose(ps.flat, final, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- README example


@pytest.mark.parametrize("world", WORLDS)
def test_readme_example(tmp_path, world):
    """mpi_scripts/readme_example.py is the README's distributed example, run as documented."""
    proc = mpirun(world, "readme_example.py", tmp_path, cwd=tmp_path)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 20 and lines[0].startswith("epoch 0: mse")  # rank 0 prints, once
    assert float(lines[-1].split()[-1]) < 0.02  # noise variance 0.01
    ckpt = fo.load(tmp_path / "model.ckpt")
    assert ckpt.algorithm == "Adam" and ckpt.optimizer_state["state"][0]["exp_avg"].shape == (9,)
