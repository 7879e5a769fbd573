"""Audit fixes outside the optimizers: clip_grad_norm's non-finite check and argument types, CSV
records kept as the csv module reads them, and EMA refusing state changes inside swapped()."""

import re

import numpy as np
import pytest

import fastopt as fo
from fastopt import datasets
from fastopt.swa import AveragedModel

# ---------------------------------------------------------------------------- clipping


def test_clip_grad_norm_error_if_nonfinite_raises_when_the_norm_overflows():
    # every element finite, the sum of squares inf: torch raises; before, the gradients were
    # all scaled by 0 without a word
    grads = [np.full(4, 1e200), np.ones(3)]
    with pytest.raises(FloatingPointError, match="overflows"):
        fo.clip_grad_norm(grads, 1.0, error_if_nonfinite=True)
    assert np.array_equal(grads[0], np.full(4, 1e200)) and np.array_equal(grads[1], np.ones(3))
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        fo.clip_grad_norm([np.array([1.0, np.inf])], 1.0, error_if_nonfinite=True)


def test_clip_grad_norm_on_an_overflowing_norm_matches_torch():
    from oracle import torch_or_skip

    torch = torch_or_skip()
    grads = [np.full(4, 1e200), np.ones(3)]
    params = [torch.zeros(a.shape, dtype=torch.float64, requires_grad=True) for a in grads]
    for p, a in zip(params, grads):
        p.grad = torch.tensor(a)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    want = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False)  # no check: scaled by 0
    assert fo.clip_grad_norm(grads, 1.0) == float(want) == np.inf
    for a, p in zip(grads, params):
        assert np.array_equal(a, p.grad.numpy())


@pytest.mark.parametrize("value", [np.float32(1.0), np.float64(1.0), np.int64(1), 1, 1.0])
def test_clipping_takes_numpy_scalars_as_torch(value):
    from oracle import torch_or_skip

    torch = torch_or_skip()
    g = [np.full(4, 3.0, np.float32)]
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.full((4,), 3.0)
    want = torch.nn.utils.clip_grad_norm_([p], value, foreach=False)
    assert fo.clip_grad_norm(g, value) == pytest.approx(float(want))
    np.testing.assert_allclose(g[0], p.grad.numpy(), rtol=1e-6)
    g = [np.array([-3.0, 0.5, 2.0])]
    fo.clip_grad_value(g, value)
    assert np.array_equal(g[0], [-1.0, 0.5, 1.0])


@pytest.mark.parametrize(
    "value, error",
    [
        (True, TypeError),  # a bool is not a norm (was taken as 1)
        ("1.0", TypeError),
        (None, TypeError),
        (0.0, ValueError),
        (-1.0, ValueError),
        (np.float32(-1.0), ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
    ],
)
def test_clipping_refuses_bad_values_by_type_before_any_write(value, error):
    g = [np.array([-3.0, 0.5, 2.0])]
    with pytest.raises(error, match="max_norm"):
        fo.clip_grad_norm(g, value)
    with pytest.raises(error, match="clip_value"):
        fo.clip_grad_value(g, value)
    assert np.array_equal(g[0], [-3.0, 0.5, 2.0])


# ---------------------------------------------------------------------------- CSV


def _write(tmp_path, name, text):
    path = tmp_path / name
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


FIELDS = {
    "LF": "New\nYork",
    "CRLF": "New\r\nYork",
    "U+2028": "caf\u2028e",
    "U+2029": "r\u2029s",
    "NEL": "x\x85y",
    "FF": "a\x0cb",
    "VT": "a\x0bb",
    "RS": "p\x1eq",
}
CSV_CASES = [(k, True) for k in FIELDS] + [(k, False) for k in FIELDS if k not in ("LF", "CRLF")]


@pytest.mark.parametrize("kind, quoted", CSV_CASES)
def test_csv_fields_keep_every_character_as_the_csv_module_reads_them(tmp_path, kind, quoted):
    # before: str.splitlines() cut records at \x0b \x0c \x1c-\x1e \x85 U+2028 U+2029 and dropped
    # the newlines kept inside quoted fields (an unquoted newline ends a record, in csv too)
    field = FIELDS[kind]
    cell = f'"{field}"' if quoted else field
    path = _write(tmp_path, "f.csv", f"a,b,y\n1,2,{cell}\n3,4,Boston\n5,6,{cell}\n")
    ds = datasets.load(str(path))
    assert ds.y.tolist() == [field, "Boston", field]
    assert ds.X.tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_csv_line_ends_and_line_numbers_as_before(tmp_path, newline):
    text = newline.join(["a,b,y", "1,2,x", "", "3,4,z", ""])
    ds = datasets.load(str(_write(tmp_path, "ok.csv", text)))
    assert ds.y.tolist() == ["x", "z"] and ds.X.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    bad = newline.join(["a,b,y", "1,2,x", "3,4", ""])
    with pytest.raises(datasets.DatasetError, match="line 3 has 2 fields, the header has 3"):
        datasets.load(str(_write(tmp_path, "bad.csv", bad)))
    nonnum = newline.join(["a,b,y", '1,"two\nlines",x', "3,4,z", ""])  # the record ends on line 3
    with pytest.raises(datasets.DatasetError, match="line 3"):
        datasets.load(str(_write(tmp_path, "nonnum.csv", nonnum)))


# ---------------------------------------------------------------------------- EMA


def _ema_case(kind):
    if kind == "paramset":
        ps = fo.ParamSet({"w": np.ones(3), "b": np.ones(2)})
        return ps, lambda: ps.flat, fo.EMA(ps, decay=0.5)
    if kind == "float16":
        params = [np.ones(3, np.float16), np.ones(2, np.float16)]
        return (
            params,
            lambda: np.concatenate([p.astype(np.float64) for p in params]),
            fo.EMA(params, decay=0.5),
        )
    if kind == "averaged_model":
        params = [np.ones(3), np.ones(2)]
        return params, lambda: np.concatenate(params), AveragedModel(params)
    params = [np.ones(3), np.ones(2)]
    return params, lambda: np.concatenate(params), fo.EMA(params, decay=0.5)


def _set(params, value):
    for p in params.values() if isinstance(params, fo.ParamSet) else params:
        p[...] = value


@pytest.mark.parametrize("kind", ["list", "paramset", "float16", "averaged_model"])
def test_ema_refuses_state_changes_inside_swapped_before_any_write(kind):
    params, flat, ema = _ema_case(kind)
    ema.update()
    _set(params, 3.0)
    ema.update()  # average 2 (EMA, decay 0.5, and the equal-weight average of 1 and 3)
    trained = flat().copy()
    saved = ema.state_dict()
    calls = {
        "update()": ema.update,
        "load_state_dict()": lambda: ema.load_state_dict(saved),
        "copy_to_params()": ema.copy_to_params,
        "swapped()": lambda: ema.swapped().__enter__(),
        "averages": lambda: ema.averages,
    }
    if isinstance(ema, AveragedModel):
        calls["update_parameters()"] = ema.update_parameters
    with ema.swapped():
        inside = flat().copy()
        np.testing.assert_allclose(inside, 2.0)
        for name, call in calls.items():
            # before: update() folded the averages into the trained values, which the block's
            # exit then put into the parameters (the trained weights were lost)
            called = "update()" if name == "update_parameters()" else name
            match = f"{type(ema).__name__}.{re.escape(called)} inside"
            with pytest.raises(RuntimeError, match=match):
                call()
            assert np.array_equal(flat(), inside), name
        # state_dict() works and holds the averages (not the trained values it swapped out)
        for got, want in zip(ema.state_dict()["averages"], saved["averages"]):
            assert np.array_equal(got, want)
    assert np.array_equal(flat(), trained)
    assert ema.num_updates == 2
    for a in ema.averages:
        np.testing.assert_allclose(a, 2.0)
    ema.update()  # allowed again after the block
    assert ema.num_updates == 3


def test_ema_swapped_still_restores_after_a_refused_call_raises_out_of_the_block():
    params = [np.ones(3)]
    ema = fo.EMA(params, decay=0.5)
    ema.update()
    params[0][...] = 5.0
    ema.update()  # average 3
    with pytest.raises(RuntimeError, match="update"), ema.swapped():
        ema.update()
    assert np.array_equal(params[0], np.full(3, 5.0))
    np.testing.assert_allclose(ema.averages[0], 3.0)
    with ema.swapped():
        np.testing.assert_allclose(params[0], 3.0)


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_clipping_refuses_a_read_only_gradient_before_scaling_any(clip):
    """clip_grad_norm/_value scale arrays one at a time: a read-only one after a writable one
    raised only once the first was already scaled. Now every array is checked first, and a
    dict's entries are named by key."""
    w = np.array([3.0, 4.0])
    ro = np.array([10.0])
    ro.flags.writeable = False
    run = {
        "norm": lambda g: fo.clip_grad_norm(g, 1.0),
        "value": lambda g: fo.clip_grad_value(g, 1.0),
    }[clip]
    with pytest.raises(ValueError, match=r"grads\[1\] is read-only"):
        run([w, ro])
    with pytest.raises(ValueError, match=r"grads\['frozen'\] is read-only"):
        run({"w": w, "frozen": ro})
    np.testing.assert_array_equal(w, [3.0, 4.0])
    assert fo.global_norm([w, ro]) == pytest.approx(np.sqrt(125.0))  # reading needs no write
