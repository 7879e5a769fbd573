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
from fastopt.distributed.sharding import block_shard_sizes

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


@pytest.mark.parametrize("n", [0, 1, 255, 256, 5681, 70000])
@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_block_shards_start_on_block_boundaries(n, world):
    """8-bit state shards: contiguous, covering the buffer, every start a multiple of 256, block
    counts differing by at most one (larger first), the partial block last."""
    counts, displs = block_shard_sizes(n, world, 256)
    assert sum(counts) == n and len(counts) == world == len(displs)
    blocks = [-(-c // 256) for c in counts]
    assert sum(blocks) == -(-n // 256) and max(blocks) - min(blocks) <= 1
    assert blocks == sorted(blocks, reverse=True)
    for r in range(world):
        assert displs[r] % 256 == 0 or counts[r] == 0
        assert displs[r] == sum(counts[:r])
        if r < world - 1 and counts[r + 1]:
            assert counts[r] % 256 == 0
    assert block_shard_sizes(5681, 2, 256) == ([3072, 2609], [0, 3072])


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


@pytest.mark.parametrize(
    "sizes,world,counts",
    [
        ([15, 3, 1], 2, [15, 4]),
        ([15, 3, 1], 3, [15, 3, 1]),  # the nearest cut would leave rank 0 empty
        ([1] * 10, 3, [3, 4, 3]),
        ([5, 5, 5, 5], 4, [5, 5, 5, 5]),
        ([1000, 1], 4, [1000, 1, 0, 0]),  # ranks without a tensor are the last ones
        ([4, 0, 4], 2, [4, 4]),
        ([], 2, [0, 0]),
    ],
)
def test_segment_shards_deal_whole_tensors(sizes, world, counts):
    got, displs, bounds = dist.sharding.segment_shards(sizes, world)
    assert got == counts
    assert bounds[0] == 0 and bounds[-1] == len(sizes) and bounds == sorted(bounds)
    for r in range(world):  # each rank's elements are exactly its whole tensors
        assert displs[r] == sum(sizes[: bounds[r]])
        assert counts[r] == sum(sizes[bounds[r] : bounds[r + 1]])
    assert dist.sharding.segment_shards(list(sizes), world) == (got, displs, bounds)


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
    """Every optimizer shards under ZeRO-1 and equals data parallelism, the per-tensor ones
    (LAMB, LARS, NovoGrad, Adafactor, Muon) on tensor boundaries."""
    ranks, _ = _train(runs, world)
    cls, kw = P.all_optimizer_classes()[name]
    dp = ranks[0][f"all-dp-{name}"]
    np.testing.assert_allclose(ranks[0][f"all-zero-{name}"], dp, rtol=1e-10, atol=1e-12)
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
                # what the communicator saw (debug=True's checksum uses the lowercase allgather)
                assert dp["comm_calls"] == {"Allreduce": steps}
                assert sc[f"zero-{name}-None-{dtype}"]["comm_calls"] == {
                    "Reduce_scatter": steps, "Allgatherv": steps,
                }  # fmt: skip
                assert sc[f"zero-{name}-0.5-{dtype}"]["comm_calls"] == {
                    "Reduce_scatter": steps, "Allreduce": steps, "Allgatherv": steps,
                }  # fmt: skip
                assert sc[f"dp-{name}-0.5-{dtype}"]["comm_calls"] == {"Allreduce": steps}
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
        at_comm = {"Allreduce" if k.startswith("Allreduce") else k: v for k, v in expected.items()}
        assert info["scenarios"][f"even-zero-adam-{clip}"]["comm_calls"] == at_comm
        assert info["scenarios"][f"even-dp-adam-{clip}"]["calls"] == {"Allreduce": steps}
        assert info["scenarios"][f"even-dp-adam-{clip}"]["comm_calls"] == {"Allreduce": steps}


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


@pytest.mark.parametrize("world", WORLDS)
def test_one_ranks_different_arguments_raise_on_every_rank(runs, world):
    """The last rank passes another argument (``mpi_scripts/agreement.py``): at construction
    every rank raises a ValueError naming the argument, instead of the others hanging in the
    parameter Bcast; with ``debug=True`` a step's bad or different arguments raise on every rank
    before the Reduce_scatter, with parameters, gradients and state unchanged everywhere."""
    out = runs("agreement.py", world)
    infos = [json.loads((out / f"agree_rank{r}.json").read_text()) for r in range(world)]
    named = {
        "other_lr": "optimizer['param_groups'][0]['initial_lr']",
        "other_layout": "params",
        "not_a_paramset": "params",
        "other_class": "optimizer_class",
        "other_clip": "max_grad_norm",
        "bool_as_int": "skip_nonfinite",  # 1 == True, but not the same argument
        "seed_as_float": "options['seed']",
    }
    for r, info in enumerate(infos):
        for case, argument in named.items():
            raised = info[case]
            assert raised is not None, (r, case)
            assert raised["type"] == "ValueError", (r, case, raised)
            assert f"the ranks passed different {argument} (" in raised["message"], (r, case)
            assert f"rank {world - 1}: " in raised["message"], (r, case)
        assert f"rank {world - 1}: 0.2)" in info["other_lr"]["message"]  # the values compared
        refused = info["optimizer_of_another_paramset"]  # a per-rank check, agreed on
        assert refused["type"] == "ValueError", refused
        if r == world - 1:
            assert "must be built over the ParamSet itself" in refused["message"]
        else:
            assert f"refused on rank {world - 1}" in refused["message"]
        for case, words in (("philox_rng", "Philox"), ("ema_of_one_tensor", "ema refused")):
            got = info[f"ckpt_{case}"]
            assert got["unchanged"] is True, (r, case)
            assert got["raised"]["type"] == "CheckpointError", (r, case, got)
            assert words in got["raised"]["message"], (r, case, got)
        assert info["bad_everywhere"]["type"] == "ValueError"
        assert "lr" in info["bad_everywhere"]["message"]
        for mode in ("dp", "zero"):
            for case in ("grad_scale", "short_grad", "lr_changed"):
                got = info[f"{mode}_{case}"]
                assert got["unchanged"] is True, (r, mode, case)
                assert got["raised"] is not None and got["raised"]["type"] == "ValueError"
            message = info[f"{mode}_grad_scale"]["raised"]["message"]
            assert "different grad_scale" in message, (r, mode, message)
            assert "different param_groups" in info[f"{mode}_lr_changed"]["raised"]["message"]
            short = info[f"{mode}_short_grad"]["raised"]["message"]
            if r == world - 1:  # its own error
                assert "gradient must be a flat array" in short, short
            else:
                assert f"refused on rank {world - 1} (ValueError: " in short, short
    for mode in ("dp", "zero"):  # and the ranks stepped together afterwards
        assert len({info[f"{mode}_after"] for info in infos}) == 1


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


# --------------------------------------------------------------------------- per-tensor ZeRO-1


@pytest.fixture(scope="module")
def per_tensor(tmp_path_factory):
    out = tmp_path_factory.mktemp("per-tensor")
    mpirun(2, "zero_per_tensor.py", out)
    return out


def _one_process(cls, kw, steps, ps=None, opt=None, start=0):
    import zero_per_tensor as ZP

    X, Y = P.data()
    ps = P.init_params() if ps is None else ps
    opt = cls(ps, **kw) if opt is None else opt
    for step in range(start, steps):
        P.set_grad(ps, X, Y, P.batch(step, ZP.GLOBAL_BATCH, 0, 1))
        opt.step()
    return ps, opt


@pytest.mark.parametrize("name", ["lamb", "novograd", "adafactor", "muon"])
def test_per_tensor_zero1_equals_one_process_across_a_checkpoint(per_tensor, name):
    """ZeRO-1 LAMB, NovoGrad, Adafactor and Muon on 2 ranks (rank 0 owns the matrix W, rank 1
    the vector b and the scalar s) equal one process with the global batch to float64 rounding
    over 20 steps; the checkpoint holds the one-process state (flat arrays, Adafactor's factors
    m + n per matrix; Muon's choice of matrices over the whole ParamSet, its momentum zero on
    the fallback tensors, which no update reads), resumes on 2 ranks and in one plain optimizer
    alike."""
    import zero_per_tensor as ZP

    cls, kw = ZP.CASES[name]
    ref, _ = _one_process(cls, kw, ZP.STEPS)
    infos = [json.loads((per_tensor / f"{name}_rank{r}.json").read_text()) for r in range(2)]
    assert [i["tensors"] for i in infos] == [["W"], ["b", "s"]]
    assert [i["shard"] for i in infos] == [[0, 15], [15, 19]]
    per_element = {"lamb": 2 * 15, "novograd": 15 + 1, "adafactor": 5 + 3, "muon": 15}[name]
    assert infos[0]["state_elements"] == per_element
    for r in range(2):
        got = np.load(per_tensor / f"{name}_rank{r}.npz")
        np.testing.assert_allclose(got["uninterrupted"], ref.flat, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(got["resumed"], ref.flat, rtol=1e-12, atol=1e-14)
    _, at_save = _one_process(cls, kw, ZP.SAVE_AT)
    want = at_save.state_dict()["state"][0]
    ckpt = fo.load(per_tensor / f"{name}.fo")
    saved = ckpt.optimizer_state["state"][0]
    assert ckpt.algorithm == cls.__name__ and set(saved) == set(want)
    if name == "muon":
        assert ckpt.optimizer_state["param_groups"][0]["muon_params"] == ("W",)
        assert not np.asarray(saved["momentum_buffer"])[15:].any()
        want["momentum_buffer"] = np.concatenate([want["momentum_buffer"][:15], np.zeros(4)])
    for k, v in want.items():
        np.testing.assert_allclose(np.asarray(saved[k]), v, rtol=1e-12, atol=1e-15, err_msg=k)
    ps = P.init_params(seed=9)
    opt = cls(ps, **kw)
    ckpt.restore(params=ps, optimizer=opt)
    _one_process(cls, kw, ZP.STEPS, ps, opt, start=ckpt.extra["step"])
    np.testing.assert_allclose(ps.flat, ref.flat, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["lamb", "muon"])
def test_per_tensor_zero1_with_a_rank_that_owns_no_tensor(per_tensor, name):
    """One tensor on 2 ranks: rank 0 owns it, rank 1 steps a private element in line; the
    gathered state is the one-process state and loads back unchanged."""
    import zero_per_tensor as ZP

    cls, kw = ZP.CASES[name]
    ps = ZP.one_tensor()
    opt = cls(ps, **kw)
    for step in range(5):
        ps.grads["W"][...] = ZP.one_tensor_grad(step)
        opt.step()
    want = opt.state_dict()["state"][0]
    for r in range(2):
        got = np.load(per_tensor / f"one_{name}_rank{r}.npz")
        np.testing.assert_allclose(got["flat"], ps.flat, rtol=1e-12, atol=1e-14)
        for k, v in want.items():
            np.testing.assert_allclose(got[f"state_{k}"], v, rtol=1e-12, atol=1e-15, err_msg=k)
            assert np.array_equal(got[f"reloaded_{k}"], got[f"state_{k}"]), k


# --------------------------------------------------------------------------- 8-bit state


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    mpirun(2, "zero_int8.py", out)
    import zero_int8

    return out, [dict(np.load(out / f"rank{r}.npz")) for r in range(2)], zero_int8


def test_zero1_int8_state_equals_one_process(int8_run):
    """ZeRO-1 Adam with state_dtype="int8" on 2 ranks over 5681 elements: the shards are cut on
    256-element blocks ([0, 3072), [3072, 5681): the naive split, 2841, falls inside a block),
    both keep 8-bit state though each is below MIN_8BIT_SIZE (the whole ParamSet is not), and
    the parameters, codes and block absmax (so the dequantized state) are the bits of one
    process stepping the summed gradients, after 3 and 6 steps. A 3000-element ParamSet keeps
    float32 state, as in one process, on the naive shards."""
    _, ranks, Z = int8_run
    assert [r["big_shard"].tolist() for r in ranks] == [[0, 3072], [3072, 5681]]
    assert [r["small_shard"].tolist() for r in ranks] == [[0, 1500], [1500, 3000]]
    for case, shapes in (("big", Z.BIG), ("small", Z.SMALL)):
        for when, steps in (("mid", Z.SAVE_AT), ("final", Z.STEPS)):
            ps, opt = Z.reference(shapes, steps)
            if when == "final":
                for r in ranks:
                    assert np.array_equal(r[f"{case}_params"], ps.flat), case
            want = opt.state_dict()["state"][0]
            got = {k[len(f"{case}_{when}_") :]: v for k, v in ranks[0].items()
                   if k.startswith(f"{case}_{when}_")}  # fmt: skip
            assert set(got) == set(want), (case, when)
            for k, v in want.items():
                assert np.asarray(v).dtype == got[k].dtype, (case, when, k)
                assert np.array_equal(np.asarray(v), got[k]), (case, when, k)
            slot = opt.state[0]["exp_avg_sq"]
            if case == "big":
                assert got["exp_avg_sq"].dtype == np.uint8 and got["exp_avg_sq_absmax"].size == 23
                mine = type(slot)(got["exp_avg_sq"], got["exp_avg_sq_absmax"], False)
                assert np.array_equal(mine.dequantized(), slot.dequantized())
            else:
                assert slot.dtype == np.float32


def test_zero1_int8_state_round_trips(int8_run):
    """The 8-bit state saved at step 3 resumes to the same bits: a 2-rank checkpoint into 2
    ranks, the one-process state into 2 ranks, the 2-rank state into a 1-rank ZeRO; the
    checkpoint holds the one-process layout (codes per element, absmax per block)."""
    out, ranks, Z = int8_run
    final = Z.reference(Z.BIG, Z.STEPS)[0].flat
    for r in ranks:
        for k in ("ckpt_params", "from_one_params", "world1_params"):
            assert np.array_equal(r[k], final), k
        assert r["world1_shard"].tolist() == [0, 5681]
    saved = fo.load(out / "ckpt.fo").optimizer_state["state"][0]
    for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"):
        assert np.array_equal(np.asarray(saved[k]), ranks[0][f"big_mid_{k}"]), k
    assert saved["exp_avg_qmap"] == "signed" and saved["exp_avg_sq_qmap"] == "unsigned"


def test_zero1_int8_mismatched_block_layout_is_refused(int8_run):
    """An absmax of the naive shards' block layout (24 blocks for 23) is refused by name on
    every rank; a negative absmax in rank 1's part is refused by rank 1 and rank 0 keeps its
    state; parameters and state bit-identical after both."""
    _, ranks, _ = int8_run
    for r in ranks:
        assert "'exp_avg_absmax'" in str(r["refused_layout"])
        assert "another block layout" in str(r["refused_layout"])
        assert bool(r["unchanged_layout"]) and bool(r["unchanged_negative"])
    assert str(ranks[0]["refused_negative"]) == (
        "another rank refused the optimizer state; nothing was changed"
    )
    assert "'exp_avg_sq_absmax'] holds negative values" in str(ranks[1]["refused_negative"])


def test_trainer_zero1_with_int8_state_equals_data_parallel(int8_run):
    """Trainer(distributed=True, zero=True) with Adam's state in 8 bits (6003 float32 parameters, 24
    blocks; each rank's shard below MIN_8BIT_SIZE) trains as Trainer(distributed=True) with the
    same state on 2 ranks: parameters equal to the gradient norm's rounding (the clip factor's
    partial sums are added in another order), codes and block absmax in the gathered state."""
    _, ranks, _ = int8_run
    for r in ranks:
        np.testing.assert_allclose(
            r["trainer_zero_params"], r["trainer_dp_params"], rtol=1e-6, atol=1e-7
        )
        assert r["trainer_zero_exp_avg"].dtype == np.uint8
        assert r["trainer_zero_exp_avg_sq"].dtype == np.uint8
        assert r["trainer_zero_exp_avg_absmax"].shape == (24,)
        assert int(r["trainer_zero_step"]) == 2 * STEPS_PER_EPOCH
    assert np.array_equal(ranks[0]["trainer_zero_params"], ranks[1]["trainer_zero_params"])


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


# --------------------------------------------------------------------------- Trainer(distributed=True)

import trainer_common as TC  # noqa: E402

from fastopt.trainer import History, Trainer  # noqa: E402

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr")
TRAINER_RUNS = [
    (name, mode)
    for name in TC.SCENARIOS
    for mode in (("dp", "zero") if name in TC.ZERO_SCENARIOS else ("dp",))
]
STEPS_PER_EPOCH = 7  # 80 training samples in global batches of 12


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """Run mpi_scripts/trainer_fit.py once per world size; (output directory, rank 0's stdout
    and the other ranks', all through mpiexec's stdout)."""
    done = {}

    def get(world):
        if world not in done:
            out = tmp_path_factory.mktemp(f"trainer-{world}")
            proc = mpirun(world, "trainer_fit.py", out)
            done[world] = (out, proc.stdout)
        return done[world]

    return get


def _trainer_results(trainer_runs, world):
    out, _ = trainer_runs(world)
    infos = [json.loads((out / f"fit_rank{r}.json").read_text()) for r in range(world)]
    arrays = [dict(np.load(out / f"fit_rank{r}.npz")) for r in range(world)]
    return infos, arrays


@pytest.fixture(scope="module")
def one_process():
    """One-process Trainer references (global batch 12), cached: name -> trainer."""
    X, y = TC.data()
    done = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw)))
        if key not in done:
            t = TC.trainer(TC.model(), name, **kw)
            t.fit(X, y)
            done[key] = t
        return done[key]

    return get


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name,mode", TRAINER_RUNS)
def test_trainer_equals_one_process_with_the_global_batch(
    trainer_runs, one_process, world, name, mode
):
    """2 ranks x 6 rows (3 ranks: 4, last batch 3/3/2) = one process with batch 12; batch 13
    shared 7/6 (5/4/4, last batch 1/1/0) = one process with batch 13."""
    infos, arrays = _trainer_results(trainer_runs, world)
    ref = one_process(name)
    key = f"{name}-{mode}"
    got = arrays[0][f"{key}/flat"]
    np.testing.assert_allclose(got, ref.model.params.flat, rtol=1e-10, atol=1e-12)
    assert not np.allclose(got, TC.model().params.flat)  # it did train
    hist = infos[0]["runs"][key]["history"]
    assert hist["epoch"] == [1, 2]
    for m in METRICS:
        np.testing.assert_allclose(hist[m], ref.history[m], rtol=1e-10, atol=1e-12, err_msg=m)
    meta = infos[0]["runs"][key]["meta"]
    assert meta["world_size"] == world and meta["zero"] == (mode == "zero")
    assert meta["n_train"] == 80 and meta["n_val"] == 20
    assert meta["batch_size"] == ref.batch_size == TC.SCENARIOS[name][1].get("batch_size", 12)
    assert meta["steps_per_epoch"] == STEPS_PER_EPOCH == ref.history.meta["steps_per_epoch"]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", TC.ZERO_SCENARIOS)
def test_trainer_zero_equals_data_parallel(trainer_runs, world, name):
    infos, arrays = _trainer_results(trainer_runs, world)
    for r in range(world):
        np.testing.assert_allclose(
            arrays[r][f"{name}-zero/flat"], arrays[r][f"{name}-dp/flat"], rtol=1e-10, atol=1e-12
        )
        hz, hd = (infos[r]["runs"][f"{name}-{m}"]["history"] for m in ("zero", "dp"))
        for m in METRICS:
            np.testing.assert_allclose(hz[m], hd[m], rtol=1e-10, atol=1e-12, err_msg=m)


@pytest.mark.parametrize("world", WORLDS)
def test_trainer_ranks_agree(trainer_runs, world):
    """Parameters and buffers bit-identical on every rank (each rank built its model from its
    own seed: rank 0's were broadcast); histories (time included) and meta identical."""
    infos, arrays = _trainer_results(trainer_runs, world)
    assert all(info["world"] == world for info in infos)
    for key in arrays[0]:
        for r in range(1, world):
            assert np.array_equal(arrays[0][key], arrays[r][key]), (key, r)
    for key, run in infos[0]["runs"].items():
        for r in range(1, world):
            other = infos[r]["runs"][key]
            assert other["history"] == run["history"], (key, r)
            assert other["meta"] == run["meta"] and other["global_step"] == run["global_step"]


@pytest.mark.parametrize("world", WORLDS)
def test_trainer_one_collective_per_step(trainer_runs, world):
    """The MPI calls of ``Trainer(distributed=Context(CountingComm(comm)))``, counted at the
    communicator (``mpi_scripts/problem.py``), split into buffers of the parameter count (103)
    and small ones.

    Construction: ONE parameter-sized Bcast (DataParallel / ZeroRedundancyOptimizer start every
    rank from rank 0's parameters), one pickled ``allgather`` (their arguments compared over the
    ranks, ``distributed/agreement.py``) and one pickled ``bcast`` (the seed). Per step, data parallel:
    ONE parameter-sized Allreduce (the gradient sum); ZeRO-1: ONE Reduce_scatter of the gradient
    and ONE Allgatherv of the parameters (uneven shards of 103), plus with ``max_grad_norm``
    (the adam scenario) one small Allreduce of (shard sum of squares, non-finite flag).

    Small collectives of a fit of E epochs (E = 2 here): at the start one pickled ``allgather``
    (every rank passed the same data) and the model broadcast again (fit may follow a load or a
    change of the weights: one parameter-sized Bcast and one small Bcast per model buffer, the
    input standardisation's mean and inv_std); then per EPOCH, not per step, 3 small
    Allreduces (the training metric sums, the validation metric sums, the agreement on a stop
    request) and one pickled ``allreduce`` (the slowest rank's epoch time). The 7-step epochs
    are shorter than the 16-step stop check, so no step adds a collective: a regression that
    does changes these counts.
    """
    infos, _ = _trainer_results(trainer_runs, world)
    steps = STEPS_PER_EPOCH * TC.EPOCHS
    m = TC.model()
    assert m.params.size == 103 and len(m.buffers) == 2
    small_per_epoch = 3
    for info in infos:
        runs = info["runs"]
        for key in [f"{name}-dp" for name in TC.SCENARIOS] + ["sgd-zero", "adam-zero"]:
            run = runs[key]
            assert run["global_step"] == steps
            assert run["comm_built"] == {
                "buffers": {"Bcast": {"full": 1, "small": 0}},
                "objects": {"allgather": 1, "bcast": 1},
            }, key  # fmt: skip
            norm = steps if TC.SCENARIOS[key.split("-")[0]][1].get("max_grad_norm") else 0
            small = small_per_epoch * TC.EPOCHS
            if key.endswith("-dp"):
                # the norm is taken locally after the one Allreduce: no extra collective
                step_calls = {"Allreduce": {"full": steps, "small": small}}
                counter = {"Bcast": 1, "Allreduce": steps}
            else:
                step_calls = {
                    "Reduce_scatter": {"full": steps, "small": 0},
                    "Allgatherv": {"full": steps, "small": 0},
                    "Allreduce": {"full": 0, "small": small + norm},
                }
                counter = {"Bcast": 1, "Reduce_scatter": steps, "Allgatherv": steps}
                if norm:
                    counter["Allreduce(norm)"] = norm
            assert run["comm_fit"] == {
                "buffers": {"Bcast": {"full": 1, "small": len(m.buffers)}, **step_calls},
                "objects": {"allgather": 1, "allreduce": TC.EPOCHS},
            }, key
            # Trainer.comm_stats (public) reports the gradient collectives the communicator saw
            assert run["calls"] == counter, key


@pytest.mark.parametrize("world", WORLDS)
def test_trainer_early_stopping_and_plateau_decided_alike(trainer_runs, one_process, world):
    infos, arrays = _trainer_results(trainer_runs, world)
    ref = one_process("adam", epochs=TC.STOPPING_EPOCHS, **TC.STOPPING)
    assert ref.history.meta["stopped_epoch"] == 6 and ref.history.meta["restored_epoch"] == 4
    assert ref.history["lr"] == [0.01, 0.01, 0.01, 0.005, 0.005, 0.0025]
    for info in infos:
        run = info["runs"]["stopping"]
        for k in ("stopped_early", "stopped_epoch", "best_epoch", "restored_epoch"):
            assert run["meta"][k] == ref.history.meta[k], k
        assert run["meta"]["best"] == pytest.approx(ref.history.meta["best"], rel=1e-10)
        assert run["history"]["lr"] == ref.history["lr"]
        assert run["lr"] == 0.00125  # the plateau's last reduction (after epoch 6)
        np.testing.assert_allclose(
            run["history"]["val_loss"], ref.history["val_loss"], rtol=1e-10, atol=1e-12
        )
    np.testing.assert_allclose(  # the best epoch's weights were restored everywhere
        arrays[0]["stopping/flat"], ref.model.params.flat, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("world", WORLDS)
def test_trainer_only_root_prints_and_writes(trainer_runs, world):
    out, stdout = trainer_runs(world)
    infos, _ = _trainer_results(trainer_runs, world)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == [f"epoch {e}" for e in range(1, 7)]
    # every rank was given its own path; only rank 0's files exist (no stray temporaries)
    assert sorted(p.name for p in out.glob("*.fo")) == [
        "intr_rank0.fo", "resume.fo", "stop_rank0.fo",
    ]  # fmt: skip
    assert [p.name for p in out.glob("hist_*")] == ["hist_rank0.json"]
    assert not list(out.glob(".*"))
    saved = History.from_json(out / "hist_rank0.json")
    run = infos[0]["runs"]["stopping"]
    assert saved["val_loss"] == run["history"]["val_loss"] and saved.meta == run["meta"]
    ckpt = fo.load(out / "stop_rank0.fo")
    state = ckpt.extra["trainer"]
    assert state["epoch"] == 6 and state["world_size"] == world and state["zero"] is True
    assert len(ckpt.extra["rng_states"]) == world
    assert ckpt.algorithm == "Adam"
    assert ckpt.optimizer_state["state"][0]["exp_avg"].shape == (TC.model().params.size,)


@pytest.mark.parametrize("world", WORLDS)
def test_trainer_batch_norm_and_dropout(trainer_runs, world):
    """Running statistics averaged (identical everywhere), dropout masks drawn per rank."""
    infos, arrays = _trainer_results(trainer_runs, world)
    fresh = TC.model(batch_norm=True, dropout=0.2)
    for name, init in fresh.arrays().items():
        got = arrays[0][f"bn_dropout/{name}"]
        assert np.all(np.isfinite(got))
        if ".bn.running_" in name:
            assert not np.allclose(got, init), name  # updated
    draws = [info["runs"]["bn_dropout"]["next_uniform"] for info in infos]
    assert len(set(draws)) == world  # a different dropout stream on every rank


@pytest.mark.parametrize("world", WORLDS)
def test_trainer_ctrl_c_on_one_rank_stops_every_rank(trainer_runs, world):
    """The last rank alone gets SIGINT in step 3: the ranks agree at the end of the epoch (7
    steps) or, in a 20-step epoch, after step 16, and stop together."""
    out, _ = trainer_runs(world)
    infos, _ = _trainer_results(trainer_runs, world)
    for info in infos:
        run = info["runs"]["interrupt"]
        assert run["interrupted"] is True
        assert run["meta"]["interrupted"] == {"epoch": 1, "global_step": STEPS_PER_EPOCH}
        assert run["history"]["epoch"] == [1]
    state = fo.load(out / "intr_rank0.fo").extra["trainer"]
    assert state["interrupted"] is True and state["epoch"] == 1
    for info in infos:  # 20 steps per epoch: the ranks agree after 16 steps
        run = info["runs"]["interrupt_mid_epoch"]
        assert run["interrupted"] is True and run["global_step"] == 16
        assert run["meta"]["interrupted"] == {"epoch": 0, "global_step": 16}
        assert "loss" not in run["history"]


@pytest.fixture(scope="module")
def trainer_resumed(trainer_runs):
    """resume.fo written by ZeRO-1 on 2 ranks, resumed on 3 ranks (ZeRO-1 and plain DP)."""
    out, _ = trainer_runs(2)
    mpirun(3, "trainer_resume.py", out)
    return out


def _saved(out):
    arrays = dict(np.load(out / "fit_rank0.npz"))
    state = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("saved_state/")}
    return arrays["saved_flat"], state, arrays["uninterrupted/flat"]


def test_trainer_checkpoint_from_2_ranks_resumes_on_3(trainer_resumed):
    out = trainer_resumed
    flat, state, final = _saved(out)
    assert set(state) == {"exp_avg", "exp_avg_sq", "step"}
    uninterrupted = json.loads((out / "fit_rank0.json").read_text())["runs"]["uninterrupted"]
    for r in range(3):
        res = dict(np.load(out / f"resumed_rank{r}.npz"))
        info = json.loads((out / f"resumed_rank{r}.json").read_text())
        for tag in ("zero", "dp"):
            assert np.array_equal(res[f"{tag}/loaded_flat"], flat), (tag, r)
            for k, v in state.items():  # bit for bit, re-sliced for 3 ranks
                assert np.array_equal(res[f"{tag}/loaded_state/{k}"], v), (tag, k, r)
            # 3 ranks (per-rank batches 4, last 3/3/2) go on exactly as the 2 ranks did
            np.testing.assert_allclose(res[f"{tag}/final_flat"], final, rtol=1e-10, atol=1e-12)
            h = info[tag]["history"]
            assert info[tag]["epoch"] == 4 and info[tag]["global_step"] == 4 * STEPS_PER_EPOCH
            assert h["epoch"] == [1, 2, 3, 4]
            for m in METRICS:
                np.testing.assert_allclose(
                    h[m], uninterrupted["history"][m], rtol=1e-10, atol=1e-12, err_msg=m
                )


def test_trainer_distributed_checkpoint_resumes_in_one_process(trainer_runs):
    out, _ = trainer_runs(2)
    flat, state, final = _saved(out)
    X, y = TC.data()
    t = TC.trainer(TC.model(seed=42), "adam")
    t.fit(X, y, resume=out / "resume.fo", epochs=2)  # loads, trains nothing
    assert np.array_equal(t.model.params.flat, flat)
    loaded = t.optimizer.state_dict()["state"][0]
    for k, v in state.items():
        assert np.array_equal(np.asarray(loaded[k]), v), k
    ckpt = fo.load(out / "resume.fo")
    assert t.rng.bit_generator.state == ckpt.extra["rng_states"][0]  # rank 0's generator
    t.fit(X, y, epochs=4)
    np.testing.assert_allclose(t.model.params.flat, final, rtol=1e-10, atol=1e-12)
    assert t.global_step == 4 * STEPS_PER_EPOCH


def test_trainer_distributed_arguments():
    """Checked before any MPI call (a Context stand-in without a communicator)."""
    ctx = object.__new__(dist.Context)
    ctx.comm, ctx.root, ctx.rank, ctx.world_size = None, 0, 0, 2
    with pytest.raises(ValueError, match="zero=True needs distributed"):
        Trainer(TC.model(), zero=True)
    with pytest.raises(TypeError, match="distributed must be"):
        Trainer(TC.model(), distributed="yes")
    with pytest.raises(ValueError, match="does not support weight_decay"):
        Trainer(TC.model(), distributed=ctx, zero=True, weight_decay=1e-3)
    with pytest.raises(ValueError, match="over model.params"):
        m = TC.model()
        Trainer(m, fo.Adam(m.param_groups(1e-3)), distributed=ctx, zero=True)
    with pytest.raises(TypeError, match="optimizer must be"):
        Trainer(TC.model(), "adam", distributed=ctx, zero=True)


def test_trainer_zero_steps_a_muon_recipe_instance_as_one_process():
    """Trainer(zero=True) with ``Muon(muon_param_groups(params))``: the group's choice of
    matrices (over the whole model) reaches ZeRO-1, which restricts it per rank; in a world of
    one rank (MPI's COMM_WORLD here) training equals the plain Trainer's."""
    pytest.importorskip("mpi4py")
    from fastopt.nn import MLP

    X, y = TC.data()
    finals = []
    for zero in (False, True):
        m = MLP(TC.D, (10, 10), TC.K, dtype="float64", seed=0)
        opt = fo.Muon(fo.muon_param_groups(m.params), lr=0.02, ns_dtype="float64")
        extra = {"distributed": dist.Context(), "zero": True} if zero else {}
        trainer = Trainer(m, opt, batch_size=TC.BATCH, epochs=2, seed=5, progress=False, **extra)
        trainer.fit(X, y)
        finals.append(m.params.flat.copy())
    assert fo.muon_param_groups(m.params)[0]["muon_params"] == ("layers.1.weight",)
    np.testing.assert_allclose(finals[1], finals[0], rtol=1e-12, atol=1e-14)


def test_trainer_zero_keeps_an_instances_storage_options():
    """Trainer(zero=True) given an instance with ``state_dtype="int8"``: ZeRO-1 builds its
    optimizer with that instance's storage options (they are not in ``defaults``), and in a
    world of one rank training equals the plain Trainer's bit for bit."""
    pytest.importorskip("mpi4py")
    from fastopt.nn import MLP

    X, y = TC.data()
    finals = []
    for zero in (False, True):
        m = MLP(TC.D, (600,), TC.K, dtype="float32", seed=0)  # above 4096: 8-bit state
        opt = fo.Adam(m.params, lr=0.01, state_dtype="int8", stochastic_rounding=True, seed=3)
        extra = {"distributed": dist.Context(), "zero": True} if zero else {}
        trainer = Trainer(m, opt, batch_size=TC.BATCH, epochs=2, seed=5, progress=False, **extra)
        trainer.fit(X, y)
        local = getattr(trainer.optimizer, "local_optimizer", trainer.optimizer)
        assert local.precision.state_dtype == "int8" and local.precision.seed == 3
        finals.append(m.params.flat.copy())
    assert finals[1].tobytes() == finals[0].tobytes()


# --------------------------------------------------------------------------- in-process fakes
#
# A fake communicator (rank 0 of a world whose other ranks hold the same data as this one) and
# fake CuPy device buffers: the MPI calls are counted where they happen, at the communicator, and
# the host staging of device buffers is exercised without MPI or a GPU.


class _FakeMPI:
    IN_PLACE = object()
    SUM, MIN, MAX = "sum", "min", "max"
    FLOAT, DOUBLE, INT = "float", "double", "int"


def _fake_device_class():
    def __init__(self, host):
        self.host = np.array(host)
        self.dtype, self.shape, self.size = self.host.dtype, self.host.shape, self.host.size
        self.nbytes, self.ndim = self.host.nbytes, self.host.ndim

    def get(self):
        self.downloads = getattr(self, "downloads", 0) + 1
        return self.host.copy()

    def set(self, host):
        self.uploads = getattr(self, "uploads", 0) + 1
        self.host[...] = host

    cls = type("ndarray", (), {"__init__": __init__, "get": get, "set": set})
    cls.__module__ = "cupy._core.core"  # what fastopt.arrays recognises as a CuPy array
    return cls


FakeDevice = _fake_device_class()


class _FakeComm:
    def __init__(self, size=2):
        self.size = size
        self.calls = []  # (method, type of the buffer MPI was handed)

    def Get_rank(self):
        return 0

    def Get_size(self):
        return self.size

    @staticmethod
    def _array(spec):
        buf = spec[0]
        return buf.host if isinstance(buf, FakeDevice) else buf

    def _record(self, name, spec):
        self.calls.append((name, type(spec[0]).__name__))

    def Allreduce(self, send, recv, op):
        assert send is _FakeMPI.IN_PLACE and op == _FakeMPI.SUM
        self._record("Allreduce", recv)
        a = self._array(recv)
        a *= self.size  # every rank holds the same values

    def Reduce_scatter_block(self, send, recv, op):
        self._record("Reduce_scatter_block", send)
        d = self._array(recv)
        d[...] = self.size * self._array(send)[: d.size]

    def Reduce_scatter(self, send, recv, counts, op):
        self._record("Reduce_scatter", send)
        d = self._array(recv)
        d[...] = self.size * self._array(send)[: d.size]

    def Allgather(self, send, recv):
        self._record("Allgather", recv)  # the other ranks' slices equal ours: nothing changes

    def Allgatherv(self, send, recv):
        self._record("Allgatherv", recv)

    def Bcast(self, buf, root):
        self._record("Bcast", buf)

    def bcast(self, obj, root):
        return obj

    def allgather(self, obj):
        return [obj] * self.size


@pytest.fixture
def fake_mpi(monkeypatch):
    from fastopt.distributed import collectives, mpi

    monkeypatch.setattr(mpi, "import_mpi", lambda: _FakeMPI)
    monkeypatch.setattr(collectives, "import_mpi", lambda: _FakeMPI)
    syncs = []
    stream = type("Stream", (), {"synchronize": lambda self: syncs.append(1)})()
    cuda = type("cuda", (), {"get_current_stream": staticmethod(lambda: stream)})
    monkeypatch.setitem(sys.modules, "cupy", type("cupy", (), {"cuda": cuda}))
    return syncs


@pytest.mark.parametrize("cuda_aware", [False, True])
def test_device_buffers_are_staged_through_the_host(fake_mpi, cuda_aware):
    """Without a CUDA-aware MPI every collective hands MPI a NumPy copy of the device buffer and
    copies the result back; with one, the device buffer itself. The stream is synchronised
    before each call either way."""
    from fastopt.distributed.collectives import Collectives

    comm = _FakeComm(size=3)
    coll = Collectives(comm, cuda_aware)
    grad = FakeDevice(np.arange(6, dtype=np.float32))
    coll.allreduce_sum(grad)
    np.testing.assert_array_equal(grad.host, 3 * np.arange(6))
    shard = FakeDevice(np.zeros(2, np.float32))
    coll.reduce_scatter_sum(grad, shard, [2, 2, 2])
    np.testing.assert_array_equal(shard.host, [0, 9])
    flat = FakeDevice(np.ones(6, np.float64))
    coll.allgather_inplace(flat, [2, 2, 2], [0, 2, 4])
    coll.bcast(flat, 0)
    names = [c[0] for c in comm.calls]
    assert names == ["Allreduce", "Reduce_scatter_block", "Allgather", "Bcast"]
    staged = [getattr(b, "downloads", 0) for b in (grad, flat)]
    if cuda_aware:
        assert staged == [0, 0] and not hasattr(shard, "uploads")
    else:
        assert staged == [2, 2]  # grad: Allreduce + Reduce_scatter; flat: Allgather + Bcast
        assert grad.uploads == 1 and shard.uploads == 1 and flat.uploads == 2
    assert len(fake_mpi) == 5  # one synchronisation per device buffer handed to a call
    assert coll.stats.calls == {"Allreduce": 1, "Reduce_scatter_block": 1, "Allgather": 1,
                                "Bcast": 1}  # fmt: skip


def test_device_buffers_reach_mpi_as_numpy_arrays_when_staged(fake_mpi):
    from fastopt.distributed.collectives import Collectives

    seen = []
    comm = _FakeComm(size=2)
    real = comm.Allreduce
    comm.Allreduce = lambda send, recv, op: seen.append(type(recv[0])) or real(send, recv, op)
    Collectives(comm, False).allreduce_sum(FakeDevice(np.ones(4, np.float32)))
    Collectives(comm, True).allreduce_sum(FakeDevice(np.ones(4, np.float32)))
    assert seen == [np.ndarray, FakeDevice]


@pytest.mark.parametrize("clip", [None, 0.5])
def test_one_collective_per_step_counted_at_the_communicator(fake_mpi, clip):
    """DataParallel: one Allreduce per step; ZeRO-1: one Reduce_scatter and one Allgatherv
    (+ one Allreduce of the norm with clipping): what the communicator saw, not fastopt's own
    counter."""
    X, Y = P.data()
    for mode in ("dp", "zero"):
        comm = _FakeComm(size=2)
        ps = P.init_params()
        if mode == "dp":
            opt = dist.DataParallel(ps, fo.Adam(ps, lr=0.01, max_grad_norm=clip), comm=comm)
        else:
            opt = dist.ZeroRedundancyOptimizer(ps, fo.Adam, lr=0.01, max_grad_norm=clip, comm=comm)
        assert [c[0] for c in comm.calls] == ["Bcast"]  # the parameters, at construction
        del comm.calls[:]
        for step in range(3):
            P.set_grad(ps, X, Y, P.batch(step, 8, 0, 2))
            opt.step()
        names = [c[0] for c in comm.calls]
        if mode == "dp":
            assert names == ["Allreduce"] * 3
        else:
            per_step = ["Reduce_scatter"] + (["Allreduce"] if clip else []) + ["Allgatherv"]
            assert names == per_step * 3


def test_closure_optimizers_and_bad_muon_settings_are_refused(fake_mpi):
    """DataParallel and ZeRO-1 step with averaged gradients: L-BFGS (a closure optimizer) is
    refused by name at construction by both; ZeRO-1 checks Muon's settings over the whole
    ParamSet (a vector without a fallback, an unknown name) as one process would; nothing is
    communicated before a refusal."""
    ps = fo.ParamSet({"w": np.zeros((2, 2)), "b": np.zeros(2)})
    comm = _FakeComm(size=2)
    with pytest.raises(TypeError, match="LBFGS steps with a closure"):
        dist.DataParallel(ps, fo.LBFGS(ps), comm=comm)
    with pytest.raises(ValueError, match="cannot shard LBFGS: it steps with a closure"):
        dist.ZeroRedundancyOptimizer(ps, fo.LBFGS, comm=comm)
    with pytest.raises(ValueError, match="parameter 'b' has shape"):
        dist.ZeroRedundancyOptimizer(ps, fo.Muon, comm=comm)
    with pytest.raises(ValueError, match="not parameters of the group"):
        dist.ZeroRedundancyOptimizer(ps, fo.Muon, muon_params=("v",), comm=comm)
    assert comm.calls == []


def test_per_tensor_state_dict_is_checked_against_the_full_layout(fake_mpi):
    """The root's check of a per-tensor state: Adafactor's factors have their own sizes (5 + 3
    for a 5x3 matrix, one per element of a vector), and an array it does not keep is named."""
    ps = P.init_params()
    zero = dist.ZeroRedundancyOptimizer(ps, fo.Adafactor, comm=_FakeComm(size=1), lr=0.01)
    assert zero.tensors == ("W", "b", "s") and zero.shard == (0, 19)
    one = fo.Adafactor(P.init_params(), lr=0.01)
    one.step(np.ones(19))
    sd = one.state_dict()
    _, names = zero.check_state_dict(sd)
    assert [k for k, _ in names] == ["col_var", "row_var", "variance"]
    bad = {**sd, "state": {0: {**sd["state"][0], "row_var": np.zeros(7)}}}
    with pytest.raises(
        ValueError, match="'row_var'.* 7 elements, Adafactor over this ParamSet keeps 5"
    ):
        zero.check_state_dict(bad)
    bad = {**sd, "state": {0: {**sd["state"][0], "exp_avg": np.zeros(19)}}}
    with pytest.raises(ValueError, match=r"'exp_avg'\] is not a state array of Adafactor"):
        zero.check_state_dict(bad)


def test_zero1_int8_layout_is_decided_on_the_whole_paramset(fake_mpi):
    """Rank 0 of 2: the 5681-element ParamSet's shard is [0, 3072) and keeps 8-bit state (3072
    elements, below MIN_8BIT_SIZE: decided on the whole ParamSet). The root's check of a loaded
    state names each mismatch before anything is communicated: an absmax of another block
    layout, float codes, codes without their absmax, 8-bit state for a ParamSet that keeps
    float32 state (3000 elements) or float state."""

    def zero(n, **kw):
        ps = fo.ParamSet({"w": np.zeros(n, np.float32)})
        return dist.ZeroRedundancyOptimizer(ps, fo.Adam, comm=_FakeComm(size=2), **kw)

    z = zero(5681, state_dtype="int8")
    assert z.shard == (0, 3072) and z.quantized
    z.step(np.ones(5681, np.float32))
    slot = z.local_optimizer.state[0]["exp_avg"]
    assert slot.codes.size == 3072 and slot.absmax.size == 12
    assert z.local_state_elements() == 2 * 3072
    one = fo.Adam(fo.ParamSet({"w": np.zeros(5681, np.float32)}), state_dtype="int8")
    one.step(np.ones(5681, np.float32))
    sd = one.state_dict()
    _, names = z.check_state_dict(sd)
    assert dict(names) == {"exp_avg": "uint8", "exp_avg_absmax": "float32",
                           "exp_avg_sq": "uint8", "exp_avg_sq_absmax": "float32"}  # fmt: skip
    entry = sd["state"][0]

    def bad(**changes):
        kept = {k: v for k, v in entry.items() if k not in changes or changes[k] is not None}
        kept.update({k: v for k, v in changes.items() if v is not None})
        return {**sd, "state": {0: kept}}

    for state, exc, match in [
        (bad(exp_avg_absmax=np.ones(24, np.float32)), ValueError, "another block layout"),
        (bad(exp_avg=entry["exp_avg"].astype(np.float32)), TypeError, "uint8 expected"),
        (bad(exp_avg_sq_absmax=None), ValueError, r"without \['exp_avg_sq_absmax'\]"),
    ]:
        with pytest.raises(exc, match=match):
            z.check_state_dict(state)
    small = zero(3000, state_dtype="int8")
    assert small.shard == (0, 1500) and not small.quantized
    small_sd = fo.Adam(fo.ParamSet({"w": np.zeros(3000)}), state_dtype="int8").state_dict()
    small_sd["state"] = {0: {"step": 1, "exp_avg": np.zeros(3000, np.uint8),
                             "exp_avg_sq": np.zeros(3000, np.float32)}}  # fmt: skip
    with pytest.raises(ValueError, match=r"'exp_avg'\] is 8-bit.*fewer than MIN_8BIT_SIZE"):
        small.check_state_dict(small_sd)
    with pytest.raises(ValueError, match="state_dtype is not 'int8'"):
        zero(5681).check_state_dict(sd)


# --------------------------------------------------------------------------- 16-bit, per tensor


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    out = tmp_path_factory.mktemp("staged")
    mpirun(2, "zero_staged.py", out)
    return out


@pytest.mark.parametrize("name", ["lamb", "lars", "novograd", "adafactor", "muon"])
def test_per_tensor_zero1_of_bfloat16_equals_one_process_bit_for_bit(staged, name):
    """ZeRO-1 of a bfloat16 ParamSet with master weights, bfloat16 state and stochastic rounding
    (each state array's random bits counted in its one-process layout, the master copy
    gathered into the checkpoint) ends on one process's bits, uninterrupted and resumed, and
    gathers one process's state, dtypes included."""
    import zero_staged as ZS

    cls, kw = ZS.CASES[name]
    ps = ZS.params()
    opt = cls(ps, **kw, **ZS.OPTIONS)
    for step in range(ZS.STEPS):
        ZS.set_grad(ps, step)
        opt.step()
    want = opt.state_dict()["state"][0]
    assert "master_param" in want
    for r in range(2):
        got = np.load(staged / f"{name}_rank{r}.npz")
        assert np.array_equal(got["uninterrupted"], ps.flat.view(np.uint16)), r
        assert np.array_equal(got["resumed"], ps.flat.view(np.uint16)), r
        for k, v in want.items():
            if not hasattr(v, "dtype"):
                continue
            v = np.asarray(v)
            assert str(got[f"dtype_{k}"]) == str(v.dtype), k
            bits = (v.view(np.uint16) if v.dtype == ZS.BF16 else v).reshape(-1)
            mine = got[f"state_{k}"].reshape(-1)
            if name == "muon" and k == "momentum_buffer":
                # as test_per_tensor_zero1_equals_one_process_across_a_checkpoint: ZeRO keeps
                # no momentum for the fallback tensors (one process runs it, nothing reads it)
                bits, mine = bits[:15], mine[:15]
            assert np.array_equal(mine, bits), k


def test_per_tensor_zero1_refuses_int8_state_by_name(staged):
    for r in range(2):
        text = (staged / f"int8_rank{r}.txt").read_text()
        assert "shards LAMB on tensor boundaries" in text and "state_dtype='int8'" in text


def test_trainer_zero1_takes_muons_recipe_with_bf16(staged):
    """Trainer(fo.Muon, zero=True) used to refuse the model's biases (its recipe was only that
    of zero=False); with precision="bf16" both strategies end on the same bits."""
    for r in range(2):
        got = np.load(staged / f"trainer_rank{r}.npz")
        assert np.array_equal(got["trainer_zero0"], got["trainer_zero1"])


def test_per_tensor_zero1_gathers_float32_state_of_a_bfloat16_paramset(staged):
    """Muon with float32 state over a bf16 ParamSet: the rank without momentum sends zeros of
    the state's dtype (it sent the parameters' and the gather failed: message truncated)."""
    import zero_staged as ZS

    cls, kw = ZS.CASES["muon"]
    ps = ZS.params()
    opt = cls(ps, state_dtype="float32", **kw)
    for step in range(2):
        ZS.set_grad(ps, step)
        opt.step()
    want = opt.state_dict()["state"][0]
    for r in range(2):
        got = np.load(staged / f"muon_f32_rank{r}.npz")
        assert np.array_equal(got["flat"], ps.flat.view(np.uint16))
        for k in ("exp_avg", "exp_avg_sq"):
            assert got[f"state_{k}"].dtype == np.float32
            assert np.array_equal(got[f"state_{k}"], np.asarray(want[k]).reshape(-1)), k
        assert np.array_equal(got["state_momentum_buffer"][:15], want["momentum_buffer"][:15])
