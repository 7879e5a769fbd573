"""Collective checkpoints record the ParamSet layout a DataParallel's or ZeRO's state is laid out
over, and load_checkpoint refuses an optimizer over a ParamSet of another layout than the saved
state, before anything changes. One process (a world of one rank)."""

import numpy as np
import pytest

import fastopt as fo
from fastopt import checkpoint as ck

dist = pytest.importorskip("fastopt.distributed")
pytest.importorskip("mpi4py")


def paramset(order):
    values = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": -np.ones(6, np.float32)}
    return fo.ParamSet({k: values[k] for k in order})


def stepped(wrapper, ps):
    ps.grads["w"][...] = 1.0
    ps.grads["b"][...] = -2.0
    wrapper.step()
    return wrapper


@pytest.fixture(params=["zero", "data_parallel"])
def make(request):
    def build(ps):
        if request.param == "zero":
            return dist.ZeroRedundancyOptimizer(ps, fo.Adam, lr=1e-2)
        return dist.DataParallel(ps, fo.Adam(ps, lr=1e-2))

    return build


def test_the_layout_is_recorded(make, tmp_path):
    ps = paramset(("w", "b"))
    path = dist.save_checkpoint(
        tmp_path / "c.safetensors", params=ps, optimizer=stepped(make(ps), ps)
    )
    assert ck.load(path).optimizer_layout == [[["w", [2, 3]], ["b", [6]]]]


def test_an_optimizer_over_another_layout_is_refused(make, tmp_path):
    ps = paramset(("w", "b"))
    path = dist.save_checkpoint(
        tmp_path / "c.safetensors", params=ps, optimizer=stepped(make(ps), ps)
    )
    other = paramset(("b", "w"))  # same size, the state's halves swapped
    target = paramset(("w", "b"))
    opt = make(other)
    before = opt.state_dict()
    with pytest.raises(ck.CheckpointError, match="layout"):
        dist.load_checkpoint(path, params=target, optimizer=opt)
    after = opt.state_dict()
    assert after["state"].keys() == before["state"].keys()
    np.testing.assert_array_equal(target.flat, paramset(("w", "b")).flat)


def test_the_same_layout_loads(make, tmp_path):
    ps = paramset(("w", "b"))
    saved = stepped(make(ps), ps)
    path = dist.save_checkpoint(tmp_path / "c.safetensors", params=ps, optimizer=saved)
    target = paramset(("w", "b"))
    opt = make(target)
    dist.load_checkpoint(path, params=target, optimizer=opt)
    np.testing.assert_array_equal(target.flat, ps.flat)
    for k, v in saved.state_dict()["state"][0].items():
        np.testing.assert_array_equal(opt.state_dict()["state"][0][k], v)
