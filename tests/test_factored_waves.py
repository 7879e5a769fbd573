"""kernels/factored.py's CPU schedule: the pairwise tree in passes keeps its order, and the waves
of segments (run one after the other for cache reuse) and the segments stepped whole (by one
thread each) cover the buffer and change no bit."""

import numpy as np

from fastopt.kernels import factored

SHAPES = [(30, 40), (40,), (3, 5, 7), (), (70, 300), (9,), (1, 1)]


def _halving(t, n):
    """The pairwise tree as its definition: t[j] += t[j + half] for half = n/2, ..., 1."""
    t = t.copy()
    half = n // 2
    while half > 0:
        t[:half] = t[:half] + t[half : 2 * half]
        half //= 2
    return t[0]


def test_tree_adds_in_the_pairwise_halving_order():
    rng = np.random.default_rng(0)
    for n in [1 << k for k in range(9)]:
        for _ in range(20):
            t = rng.standard_normal(n) * 10.0 ** rng.integers(-8, 9, n)
            got = factored._tree.py_func(t.copy(), n)
            assert np.float64(got).tobytes() == np.float64(_halving(t, n)).tobytes(), n


def test_waves_and_whole_segments_cover_the_buffer_once(monkeypatch):
    monkeypatch.setattr(factored, "WAVE_ELEMENTS", 200)
    monkeypatch.setattr(factored, "WHOLE_ELEMENTS", 10)  # (), (9,) and (1, 1) are whole
    layout = factored.plan(SHAPES)
    waves, whole, first, numel = layout["waves"], layout["whole"], layout["first"], layout["numel"]
    assert waves.shape[1] == factored.WAVE_FIELDS and len(waves) > 2
    assert whole.shape[1] == factored.WHOLE_FIELDS
    batches_per_segment = [int(np.prod(s[:-2])) if factored.factored(s) else 0 for s in SHAPES]
    batch_first = np.concatenate([[0], np.cumsum(batches_per_segment)])
    in_waves = []
    for w, (i0, i1, b0, b1, s0, s1) in enumerate(waves):
        if w:
            assert s0 >= waves[w - 1, factored.W_S1]
        assert (i0, i1) == (first[s0], first[s1])
        assert (b0, b1) == (batch_first[s0], batch_first[s1])
        assert s1 - s0 == 1 or numel[s0:s1].sum() <= 200
        in_waves += range(s0, s1)
    for s, i0, i1, b0, b1, size in whole:
        assert (i0, i1, b0, b1, size) == (first[s], first[s + 1], *batch_first[s : s + 2], numel[s])
    assert list(whole[:, factored.H_SEG]) == [5, 3, 6]  # largest first, ties in buffer order
    assert sorted(in_waves + list(whole[:, factored.H_SEG])) == list(range(len(SHAPES)))
    assert all(numel[s] > 10 for s in in_waves) and all(whole[:, factored.H_SIZE] <= 10)


def _step(layout, dtype, steps=3):
    rng = np.random.default_rng(1)
    size = int(layout["numel"].sum())
    p = rng.standard_normal(size).astype(dtype)
    rows, cols, vector = factored.state_sizes(SHAPES)
    row_var, col_var, variance = (
        np.zeros(rows, dtype),
        np.zeros(cols, dtype),
        np.zeros(vector, dtype),
    )
    work = factored.scratch(layout, dtype)
    st = np.dtype(dtype).type
    for k in range(1, steps + 1):
        g = rng.standard_normal(size).astype(dtype)
        w = float(k) ** -0.8
        eps1 = float(np.finfo(dtype).eps)
        h = (st(1), st(w), st(1) - st(w), st(eps1), st(eps1 * eps1), st(1), st(1))
        factored.step(p, g, row_var, col_var, variance, h, (1e-3, 1e-2, 1.0), (st(1), st(0)),
                      layout, work)  # fmt: skip
    return p, row_var, col_var, variance


def test_wave_schedule_and_whole_segments_give_the_bits_of_one_wave(monkeypatch):
    monkeypatch.setattr(factored, "WAVE_ELEMENTS", 200)
    monkeypatch.setattr(factored, "WHOLE_ELEMENTS", -1)  # no segment whole: all in waves
    waves = factored.plan(SHAPES)
    one = dict(waves, waves=waves["waves"][[0]].copy())
    one["waves"][0, 1::2] = waves["waves"][-1, 1::2]  # the ends of the last wave
    assert len(waves["waves"]) > 2 and len(waves["whole"]) == 0
    monkeypatch.setattr(factored, "WHOLE_ELEMENTS", 10)
    mixed = factored.plan(SHAPES)
    monkeypatch.setattr(factored, "WHOLE_ELEMENTS", 1 << 17)
    whole = factored.plan(SHAPES)
    assert len(mixed["whole"]) == 3 and len(whole["whole"]) == len(SHAPES)
    # float32 only: the serial kernel test_adafactor.py compiles too (no new variant in CI)
    want = _step(one, np.float32)
    for layout in (waves, mixed, whole):
        for a, b in zip(_step(layout, np.float32), want):
            assert a.tobytes() == b.tobytes()
