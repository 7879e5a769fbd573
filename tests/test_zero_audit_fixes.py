"""ZeroRedundancyOptimizer: three bugs an audit found, each run on 2 MPI ranks.

1. A per-tensor choice (LAMB/LARS masks, Muon's ``muon_params``) that fails for one tensor
   raised on the rank owning it only, inside its step, while the other ranks wrote their shards
   and waited in the Allgather forever: now every rank raises the same error, before any write.
2. ``load_state_dict`` of a state whose param_groups hold a lambda: the root raised
   PicklingError inside the broadcast and the other ranks waited forever (so did any other
   refusal of the root that was not a TypeError or ValueError): now it loads, or every rank
   raises the same error.
3. A rank owning only zero-size tensors was taken for a rank owning nothing: its per-tensor
   state (NovoGrad's one value per tensor) was left out of the one-process layout.

This file is also the MPI script: ``mpiexec -n 2 python tests/test_zero_audit_fixes.py OUTDIR
CASE`` runs ``CASES[CASE]`` on every rank, which writes ``CASE_rank<r>.json``. A rank that hangs
is stopped by the MPI tests' timeout (``FASTOPT_MPI_TIMEOUT``, ``mpi_scripts/launch.py``).
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import fastopt as fo

SCRIPTS = pathlib.Path(__file__).resolve().parent / "mpi_scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import launch  # noqa: E402

WORLD = 2


# --------------------------------------------------------------------------- launching


def run_case(case, outdir):
    """Run ``case`` on ``WORLD`` ranks; the ranks' JSON results, by rank."""
    launcher, reason = launch.launcher()
    if launcher is None:
        pytest.skip(reason)
    argv = launch.argv(WORLD, pathlib.Path(__file__).resolve(), outdir, case)
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=launch.TIMEOUT, env=launch.env()
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(argv)} timed out (a rank hangs)\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"
    return [json.loads((outdir / f"{case}_rank{r}.json").read_text()) for r in range(WORLD)]


def same_on_every_rank(results, key):
    """The value of ``key``, asserted to be the same on every rank."""
    values = [r[key] for r in results]
    assert all(v == values[0] for v in values), values
    return values[0]


# --------------------------------------------------------------------------- bug 1: masks


def test_bad_mask_raises_on_every_rank_at_construction(tmp_path):
    """A weight_decay_mask returning a non-bool for ``b`` (owned by rank 1): the same
    TypeError on both ranks, naming the mask and the tensor, at construction."""
    results = run_case("mask_construction", tmp_path)
    err = same_on_every_rank(results, "error")
    assert err.startswith("TypeError: weight_decay_mask('b', (3,))"), err


def test_mask_changed_before_a_step_raises_on_every_rank_before_any_write(tmp_path):
    """LARS's trust_ratio_mask replaced in param_groups by one failing for ``b``: the next
    step raises the same TypeError on both ranks with the parameters unchanged; the good mask
    back, the ranks step on together."""
    results = run_case("mask_changed", tmp_path)
    err = same_on_every_rank(results, "error")
    assert err.startswith("TypeError: trust_ratio_mask('b', (3,))"), err
    assert all(r["unchanged"] for r in results)
    assert all(r["stepped_after"] for r in results)


def test_private_element_is_not_given_to_the_masks(tmp_path):
    """One tensor on 2 ranks (rank 1 steps a private element): a mask defined on the
    ParamSet's names only (a dict lookup) works, and equals one process."""
    results = run_case("mask_private", tmp_path)
    assert all(r["equal_one_process"] for r in results)


def test_muon_params_changed_is_checked_over_the_whole_paramset(tmp_path):
    """Muon's muon_params replaced in param_groups: a callable failing for ``b`` (rank 1's)
    raises the same TypeError on both ranks before any write; one choosing the same tensors
    is taken (and reported by state_dict); one choosing others is refused on both ranks."""
    results = run_case("muon_changed", tmp_path)
    err = same_on_every_rank(results, "bad")
    assert err.startswith("TypeError: muon_params('b', (3,))"), err
    assert all(r["unchanged"] for r in results)
    assert same_on_every_rank(results, "same_choice") == "ok"
    assert results[0]["reported"]
    other = same_on_every_rank(results, "other_choice")
    assert other.startswith("ValueError:") and "muon_params" in other, other


# --------------------------------------------------------------------------- bug 2: loading


def test_load_state_dict_with_a_lambda_mask(tmp_path):
    """LAMB with a lambda weight_decay_mask: its state loads back given on every rank or on
    the root only (the root's mask is its current one: each rank keeps its own); a state with
    another lambda loads when given on every rank, and given on the root only is refused by
    every rank with the same ValueError naming the option, nothing changed."""
    r = run_case("lambda_load", tmp_path)
    assert same_on_every_rank(r, "everywhere") == "ok"
    assert same_on_every_rank(r, "root_only") == "ok"
    err = same_on_every_rank(r, "other_root_only")
    assert err.startswith("ValueError:") and "'weight_decay_mask'" in err, err
    assert all(x["unchanged"] for x in r)
    assert same_on_every_rank(r, "other_everywhere") == "ok"
    assert all(x["other_taken"] for x in r)


def test_load_state_dict_with_a_lambda_muon_params(tmp_path):
    """Muon with a lambda muon_params: its state loads back from the root only and from every
    rank, and state_dict reports the lambda again."""
    r = run_case("lambda_muon", tmp_path)
    assert same_on_every_rank(r, "root_only") == "ok"
    assert same_on_every_rank(r, "everywhere") == "ok"
    assert r[0]["reported"]


def test_any_refusal_of_the_root_is_raised_on_every_rank(tmp_path):
    """A malformed state whose check fails on the root with a KeyError, and one holding an
    unpicklable value in its state entry: every rank raises the same ValueError."""
    r = run_case("root_refusals", tmp_path)
    err = same_on_every_rank(r, "malformed")
    assert err.startswith("ValueError:") and "KeyError" in err, err
    err = same_on_every_rank(r, "unpicklable")
    assert err.startswith("ValueError:") and "cannot be sent" in err, err


# --------------------------------------------------------------------------- bug 3: empty tensors


@pytest.mark.parametrize("order", ["last", "first"])
def test_zero_size_tensor_keeps_the_one_process_layout(tmp_path, order):
    """NovoGrad and LAMB over W (3, 4) and a zero-size z (rank 0 or rank 1 owns only z): the
    state_dict has the one-process layout and values (NovoGrad's exp_avg_sq: one per tensor,
    2), and states move both ways between ZeRO and one process."""
    r = run_case(f"empty_{order}", tmp_path)
    for x in r:
        assert x["owned"] == {"last": [["W"], ["z"]], "first": [["z"], ["W"]]}[order]
        for name, res in x["cases"].items():
            assert res["shapes"] == res["one_shapes"], (name, res)
            assert res["close"], (name, res)
            assert res["zero_loads_one"] == "ok", (name, res)
            assert res["one_loads_zero"] == "ok", (name, res)
            assert res["resumed_close"], (name, res)


# --------------------------------------------------------------------------- the MPI script


def _outcome(fn):
    """'ok', or 'Type: message' of the TypeError / ValueError ``fn()`` raised."""
    try:
        fn()
    except (TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _ps():
    return fo.ParamSet({"W": np.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": np.full(3, 0.5)})


def _set_grads(ps, step):
    ps.grad_flat[...] = np.cos(np.arange(ps.size) + step)


def case_mask_construction(comm, dist):
    mask = {"W": True}.get  # returns its second argument, the shape, for "b"
    build = lambda: dist.ZeroRedundancyOptimizer(  # noqa: E731
        _ps(), fo.LAMB, comm=comm, lr=0.01, weight_decay=0.1, weight_decay_mask=mask
    )
    return {"error": _outcome(build)}


def case_mask_changed(comm, dist):
    ps = _ps()
    good = lambda name, shape: len(shape) == 2  # noqa: E731
    zero = dist.ZeroRedundancyOptimizer(ps, fo.LARS, comm=comm, lr=0.01, trust_ratio_mask=good)
    _set_grads(ps, 0)
    zero.step()
    before = ps.flat.copy()
    zero.param_groups[0]["trust_ratio_mask"] = lambda name, shape: True if name == "W" else None
    _set_grads(ps, 1)
    error = _outcome(zero.step)
    unchanged = bool(np.array_equal(ps.flat, before))
    zero.param_groups[0]["trust_ratio_mask"] = good
    zero.step()
    return {"error": error, "unchanged": unchanged, "stepped_after": True}


def case_mask_private(comm, dist):
    def make():
        return fo.ParamSet({"W": np.linspace(-1.0, 1.0, 12).reshape(4, 3)})

    decay = {"W": True}

    def mask(name, shape):
        return decay[name]  # a KeyError for any other name

    kw = {"lr": 0.01, "weight_decay": 0.1, "weight_decay_mask": mask}
    ps, one_ps = make(), make()
    zero = dist.ZeroRedundancyOptimizer(ps, fo.LAMB, comm=comm, **kw)
    one = fo.LAMB(one_ps, **kw)
    for step in range(3):
        _set_grads(ps, step)
        _set_grads(one_ps, step)
        zero.step()
        one.step()
    return {"equal_one_process": bool(np.allclose(ps.flat, one_ps.flat, rtol=1e-12))}


def case_muon_changed(comm, dist):
    ps = _ps()
    zero = dist.ZeroRedundancyOptimizer(
        ps, fo.Muon, comm=comm, lr=0.01, muon_params=("W",), ns_dtype="float64"
    )
    _set_grads(ps, 0)
    zero.step()
    before = ps.flat.copy()
    group = zero.param_groups[0]
    group["muon_params"] = lambda name, shape: True if name == "W" else None
    bad = _outcome(zero.step)
    unchanged = bool(np.array_equal(ps.flat, before))
    same = lambda name, shape: len(shape) == 2  # noqa: E731
    group["muon_params"] = same
    same_choice = _outcome(zero.step)
    sd = zero.state_dict(root=0)
    reported = sd is not None and sd["param_groups"][0]["muon_params"] is same
    group["muon_params"] = ()
    other_choice = _outcome(zero.step)
    return {
        "bad": bad,
        "unchanged": unchanged,
        "same_choice": same_choice,
        "reported": reported,
        "other_choice": other_choice,
    }


def _state_arrays(zero):
    sd = zero.state_dict(root=None)
    return {k: np.asarray(v).tolist() for k, v in sd["state"][0].items() if hasattr(v, "shape")}


def case_lambda_load(comm, dist):
    ps = _ps()
    mask = lambda name, shape: len(shape) == 2  # noqa: E731
    zero = dist.ZeroRedundancyOptimizer(
        ps, fo.LAMB, comm=comm, lr=0.01, weight_decay=0.1, weight_decay_mask=mask
    )
    _set_grads(ps, 0)
    zero.step()
    sd = zero.state_dict(root=None)
    everywhere = _outcome(lambda: zero.load_state_dict(sd))
    sd0 = zero.state_dict(root=0)
    root_only = _outcome(lambda: zero.load_state_dict(sd0))
    other = lambda name, shape: name == "b"  # noqa: E731
    other_sd = {**sd, "param_groups": [{**sd["param_groups"][0], "weight_decay_mask": other}]}
    before = _state_arrays(zero)
    other_root_only = _outcome(lambda: zero.load_state_dict(other_sd if comm.rank == 0 else None))
    unchanged = _state_arrays(zero) == before and zero.param_groups[0]["weight_decay_mask"] is mask
    other_everywhere = _outcome(lambda: zero.load_state_dict(other_sd))
    _set_grads(ps, 1)
    zero.step()
    return {
        "everywhere": everywhere,
        "root_only": root_only,
        "other_root_only": other_root_only,
        "unchanged": unchanged,
        "other_everywhere": other_everywhere,
        "other_taken": zero.param_groups[0]["weight_decay_mask"] is other,
    }


def case_lambda_muon(comm, dist):
    ps = _ps()
    choice = lambda name, shape: len(shape) == 2  # noqa: E731
    zero = dist.ZeroRedundancyOptimizer(
        ps, fo.Muon, comm=comm, lr=0.01, muon_params=choice, ns_dtype="float64"
    )
    _set_grads(ps, 0)
    zero.step()
    sd0 = zero.state_dict(root=0)
    root_only = _outcome(lambda: zero.load_state_dict(sd0))
    sd = zero.state_dict(root=None)
    everywhere = _outcome(lambda: zero.load_state_dict(sd))
    _set_grads(ps, 1)
    zero.step()
    again = zero.state_dict(root=0)
    reported = again is not None and again["param_groups"][0]["muon_params"] is choice
    return {"root_only": root_only, "everywhere": everywhere, "reported": reported}


def case_root_refusals(comm, dist):
    ps = _ps()
    zero = dist.ZeroRedundancyOptimizer(ps, fo.LAMB, comm=comm, lr=0.01)
    _set_grads(ps, 0)
    zero.step()
    malformed = {"state": {}, "param_groups": {"lr": 0.01}}  # groups[0]: a KeyError
    sd = zero.state_dict(root=None)
    unpicklable = {**sd, "state": {0: {**sd["state"][0], "note": lambda: None}}}
    return {
        "malformed": _outcome(lambda: zero.load_state_dict(malformed)),
        "unpicklable": _outcome(lambda: zero.load_state_dict(unpicklable)),
    }


def _empty_case(comm, dist, cls, order):
    shapes = {"W": (3, 4), "z": (0,)}
    if order == "first":
        shapes = {"z": (0,), "W": (3, 4)}

    def make():
        return fo.ParamSet({k: np.linspace(-1.0, 1.0, int(np.prod(s))).reshape(s) for k, s in
                            shapes.items()})  # fmt: skip

    kw = {"lr": 0.01, "weight_decay": 0.01}
    ps, one_ps = make(), make()
    zero = dist.ZeroRedundancyOptimizer(ps, cls, comm=comm, **kw)
    one = cls(one_ps, **kw)
    for step in range(2):
        _set_grads(ps, step)
        _set_grads(one_ps, step)
        zero.step()
        one.step()
    sd, osd = zero.state_dict(root=None), one.state_dict()
    arrays = {k: v for k, v in sd["state"][0].items() if hasattr(v, "shape")}
    one_arrays = {k: v for k, v in osd["state"][0].items() if hasattr(v, "shape")}
    close = set(arrays) == set(one_arrays) and all(
        np.allclose(np.reshape(arrays[k], -1), np.reshape(one_arrays[k], -1), rtol=1e-12)
        for k in arrays
    )
    res = {
        "shapes": {k: list(np.shape(v)) for k, v in sorted(arrays.items())},
        "one_shapes": {k: list(np.shape(v)) for k, v in sorted(one_arrays.items())},
        "close": bool(close and np.allclose(ps.flat, one_ps.flat, rtol=1e-12)),
        "zero_loads_one": _outcome(lambda: zero.load_state_dict(osd)),
        "one_loads_zero": _outcome(lambda: one.load_state_dict(sd)),
    }
    _set_grads(ps, 2)
    _set_grads(one_ps, 2)
    zero.step()
    one.step()
    res["resumed_close"] = bool(np.allclose(ps.flat, one_ps.flat, rtol=1e-12))
    return zero.tensors, res


def _empty(order):
    def case(comm, dist):
        cases, owned = {}, None
        for cls in (fo.NovoGrad, fo.LAMB):
            owned, cases[cls.__name__] = _empty_case(comm, dist, cls, order)
        return {"owned": [list(t) for t in comm.allgather(owned)], "cases": cases}

    return case


CASES = {
    "mask_construction": case_mask_construction,
    "mask_changed": case_mask_changed,
    "mask_private": case_mask_private,
    "muon_changed": case_muon_changed,
    "lambda_load": case_lambda_load,
    "lambda_muon": case_lambda_muon,
    "root_refusals": case_root_refusals,
    "empty_last": _empty("last"),
    "empty_first": _empty("first"),
}


def _main(comm, out, case):
    from fastopt import distributed as dist

    result = CASES[case](comm, dist)
    (out / f"{case}_rank{comm.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    import problem

    problem.run(_main)
