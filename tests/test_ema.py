import numpy as np
import pytest

import fastopt as fo


def test_ema_matches_torch_averaged_model():
    from oracle import torch_or_skip

    torch = torch_or_skip()
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3))
    ps = fo.ParamSet({"w": w})
    ema = fo.EMA(ps, decay=0.9)
    model = torch.nn.Linear(3, 4, bias=False).double()
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=False)
    for _ in range(50):
        new = rng.standard_normal((4, 3))
        ps["w"][...] = new
        with torch.no_grad():
            model.weight.copy_(torch.tensor(new))
        ema.update()
        avg.update_parameters(model)
    np.testing.assert_allclose(
        ema.averages[0].reshape(4, 3), avg.module.weight.detach().numpy(), rtol=1e-12
    )


def test_ema_formula_warmup_and_dtype():
    p = np.zeros(5, np.float32)
    ema = fo.EMA([p], decay=0.99, warmup=True)
    expected = np.zeros(5)
    for t in range(20):
        p[...] = t
        d = ema.current_decay()
        assert d == min(0.99, (1 + t) / (10 + t))  # 0.1 at t = 0, unused: the first update copies
        ema.update()
        expected = np.full(5, 0.0) if t == 0 else expected + (1 - d) * (t - expected)
    np.testing.assert_allclose(ema.averages[0], expected, rtol=1e-5)
    assert ema.averages[0].dtype == np.float32
    ema.num_updates = 10_000  # (1 + t) / (10 + t) > 0.99 from t = 882 on: the decay is capped
    assert ema.current_decay() == 0.99
    assert fo.EMA([p], decay=0.99).current_decay() == 0.99  # no warmup: the decay from the start


def test_swapped_context_restores_even_on_error():
    ps = fo.ParamSet({"w": np.ones(3)})
    ema = fo.EMA(ps, decay=0.5)
    ema.update()
    ps["w"][...] = 3.0
    ema.update()  # average = 1 + 0.5 * 2 = 2
    with ema.swapped():
        np.testing.assert_array_equal(ps["w"], 2.0)
    np.testing.assert_array_equal(ps["w"], 3.0)
    with pytest.raises(KeyError), ema.swapped():
        np.testing.assert_array_equal(ps["w"], 2.0)
        raise KeyError("boom")
    np.testing.assert_array_equal(ps["w"], 3.0)
    np.testing.assert_array_equal(ema.averages[0], 2.0)


def test_state_dict_round_trip_and_errors():
    a = [np.ones(3), np.ones((2, 2))]
    ema = fo.EMA(a, decay=0.9)
    ema.update()
    a[0][...] = 5
    ema.update()
    sd = ema.state_dict()
    other = fo.EMA([np.zeros(3), np.zeros((2, 2))], decay=0.5)
    other.load_state_dict(sd)
    assert other.decay == 0.9 and other.num_updates == 2
    np.testing.assert_array_equal(other.averages[0], ema.averages[0])
    with pytest.raises(ValueError, match="arrays"):
        fo.EMA([np.zeros(3)]).load_state_dict(sd)
    with pytest.raises(ValueError, match="decay"):
        fo.EMA([np.zeros(3)], decay=1.5)
    with pytest.raises(RuntimeError, match="update"), fo.EMA([np.zeros(3)]).swapped():
        pass


@pytest.mark.parametrize(
    "second, match",
    [(np.array(["x"] * 4), "dtype <U1"), (np.full(4, 2 + 3j, np.complex64), "dtype complex64")],
)
def test_a_bad_average_in_a_loaded_state_writes_nothing(second, match):
    """Every average is checked (a real float dtype) and converted before the first is written:
    a bad second array leaves the first average as it was, and complex ones are refused
    instead of losing their imaginary part."""
    ema = fo.EMA([np.ones(3, np.float32), np.ones((2, 2), np.float32)], decay=0.9)
    ema.update()
    before = [a.copy() for a in ema.averages]
    sd = {**ema.state_dict(), "averages": [np.full(3, 5.0, np.float32), second]}
    with pytest.raises(TypeError, match=f"EMA state array 1 has {match}"):
        ema.load_state_dict(sd)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(ema.averages, before))


def test_one_kernel_call_per_update_over_a_paramset(monkeypatch):
    from fastopt import dispatch

    calls = []
    backend = dispatch.get_backend("numba-cpu")
    original = type(backend).update
    monkeypatch.setattr(
        type(backend), "update", lambda self, *a: calls.append(a[0]) or original(self, *a)
    )
    ps = fo.ParamSet({f"l{i}": np.ones(4) for i in range(30)})
    ema = fo.EMA(ps)
    ema.update()
    ema.update()
    assert calls == ["ema"]
