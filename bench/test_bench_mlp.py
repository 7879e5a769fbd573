"""Quality and speed goals of ``fastopt.nn`` / ``fastopt.trainer`` / ``fastopt.sklearn`` (issue #5).

Run: ``pytest bench/test_bench_mlp.py -s`` (prints a table). Not part of the default test run.

``test_digits_tuned_settings``
    scikit-learn's bundled digits, 25 % stratified test split (``random_state=0``):
    ``fastopt.sklearn.MLPClassifier.tuned(random_state=0)`` (the documented tuned settings; the
    plain defaults are scikit-learn's) must reach >= 98 % test accuracy, its ``fit`` in < 30 s.
``test_epoch_goal[...]``
    one training epoch of a 784-256-256-10 ReLU MLP, batch 128, Adam (lr 1e-3), cross-entropy,
    on 60,000 synthetic float32 samples (N(0, 1) inputs, uniform labels), same thread count for
    everyone, measured in ONE run with the peers interleaved:

    - ``fastopt``: ``Trainer(MLP(784, (256, 256), 10), batch_size=128).fit`` one epoch more;
    - ``torch`` / ``torch_fused``: the textbook torch loop (``randperm``, index, forward,
      ``CrossEntropyLoss``, ``zero_grad``, ``backward``, ``Adam.step``), Adam's default
      (for-each/for-loop) implementation and ``fused=True``;
    - ``sklearn``: ``sklearn.neural_network.MLPClassifier((256, 256), batch_size=128,
      max_iter=1, alpha=0)``: ``fit`` is one epoch (plus its cheap initialization).

    Goals: fastopt <= 1.0x the faster torch variant; fastopt >= 2x faster than scikit-learn.
    Each peer runs one warm-up epoch, then ``FASTOPT_BENCH_MLP_ROUNDS`` rounds (default 5), every
    peer once per round in a rotated order. The goals are judged on the ratio of the best (least
    disturbed) epoch times: on a shared machine, load from elsewhere only ever adds time, and
    when another process takes one of two cores every peer's multithreaded matrix products run
    at half speed, which compresses the ratios (GEMMs are most of fastopt's epoch, a smaller
    part of the others'). The per-round ratios and the ratio of the median times are reported
    next to it, to judge the noise.

Environment: ``FASTOPT_BENCH_THREADS`` (default: Numba's thread count, i.e. the usable cores;
set for Numba, the BLAS through threadpoolctl, and torch), ``FASTOPT_BENCH_MLP_N`` (samples,
default 60000), ``FASTOPT_BENCH_MLP_ROUNDS``, ``FASTOPT_BENCH_MLP_OUT`` (write the results as
JSON there). Peers that are not installed are skipped with the reason.
"""

import contextlib
import json
import os
import platform
import statistics
import time
import warnings

import numpy as np
import pytest

HIDDEN = (256, 256)
BATCH = 128


def _env_int(name, default):
    return int(os.environ.get(name, default))


def _threads():
    import numba

    return _env_int("FASTOPT_BENCH_THREADS", numba.config.NUMBA_NUM_THREADS)


@contextlib.contextmanager
def _thread_limits(n):
    """Numba, the BLAS (threadpoolctl, when installed) and torch all at ``n`` threads."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401  (loaded before Numba starts its OpenMP pool)
    import numba

    numba.set_num_threads(n)
    limits = contextlib.nullcontext()
    try:
        import threadpoolctl

        limits = threadpoolctl.threadpool_limits(n, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        warnings.warn("threadpoolctl not installed: BLAS threads not set", stacklevel=2)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    with limits:
        yield


# ------------------------------------------------------------------------------ quality


def test_digits_tuned_settings():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from fastopt.sklearn import MLPClassifier

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    with _thread_limits(_threads()):
        clf = MLPClassifier.tuned(random_state=0)
        start = time.perf_counter()
        clf.fit(Xtr, ytr)
        seconds = time.perf_counter() - start
    acc = clf.score(Xte, yte)
    print(f"\ndigits: test accuracy {acc:.4f}, fit {seconds:.2f} s, {clf.n_iter_} epochs")
    _record("digits", {"accuracy": acc, "fit_s": seconds, "epochs": clf.n_iter_})
    assert acc >= 0.98
    assert seconds < 30


# ------------------------------------------------------------------------------ speed

_RESULTS = {}


def _record(key, value):
    _RESULTS[key] = value
    out = os.environ.get("FASTOPT_BENCH_MLP_OUT")
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"machine": _machine(), **_RESULTS}, f, indent=1)


def _machine():
    import numba

    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "logical_cores": os.cpu_count(),
        "threads": _threads(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": numba.threading_layer() if _pool_started() else None,
    }
    for mod in ("torch", "sklearn"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import threadpoolctl

        info["blas"] = [
            {k: d.get(k) for k in ("internal_api", "version", "num_threads")}
            for d in threadpoolctl.threadpool_info()
            if d.get("user_api") == "blas"
        ]
    except ImportError:  # pragma: no cover
        pass
    return info


def _pool_started():
    import numba

    try:
        numba.threading_layer()
        return True
    except ValueError:
        return False


def _data(n):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 784), dtype=np.float32)
    y = rng.integers(0, 10, n)
    return X, y


def _fastopt_peer(X, y):
    from fastopt.nn import MLP
    from fastopt.trainer import Trainer

    model = MLP(784, HIDDEN, 10, activation="relu", seed=0)
    trainer = Trainer(model, lr=1e-3, batch_size=BATCH, epochs=0, seed=0, progress=False)

    def epoch():
        trainer.fit(X, y, epochs=trainer.epoch + 1)

    return epoch


def _torch_peer(X, y, fused):
    import torch

    torch.manual_seed(0)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, HIDDEN[0]),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN[0], HIDDEN[1]),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN[1], 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = len(X)

    def epoch():
        perm = torch.randperm(n)
        for lo in range(0, n, BATCH):
            idx = perm[lo : lo + BATCH]
            loss = loss_fn(model(Xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


def _sklearn_peer(X, y):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    def epoch():
        clf = MLPClassifier(
            HIDDEN, batch_size=BATCH, max_iter=1, alpha=0.0, learning_rate_init=1e-3,
            random_state=0,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, y)

    return epoch


def _peers(X, y):
    peers, missing = {"fastopt": _fastopt_peer(X, y)}, {}
    try:
        import torch  # noqa: F401

        peers["torch"] = _torch_peer(X, y, fused=None)
        peers["torch_fused"] = _torch_peer(X, y, fused=True)
    except ImportError as exc:
        missing["torch"] = missing["torch_fused"] = f"torch not installed ({exc})"
    try:
        import sklearn  # noqa: F401

        peers["sklearn"] = _sklearn_peer(X, y)
    except ImportError as exc:
        missing["sklearn"] = f"scikit-learn not installed ({exc})"
    return peers, missing


def _measure():
    if "epochs" in _RESULTS:
        return _RESULTS["epochs"]
    n = _env_int("FASTOPT_BENCH_MLP_N", 60000)
    rounds = _env_int("FASTOPT_BENCH_MLP_ROUNDS", 5)
    X, y = _data(n)
    times = {}
    with _thread_limits(_threads()):
        peers, missing = _peers(X, y)
        names = list(peers)
        for name in names:  # warm-up: compilation, workspaces, allocator
            peers[name]()
            times[name] = []
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                start = time.perf_counter()
                peers[name]()
                times[name].append(time.perf_counter() - start)
    result = {
        "samples": n,
        "batch_size": BATCH,
        "model": f"784-{HIDDEN[0]}-{HIDDEN[1]}-10 relu, Adam, cross-entropy, float32",
        "threads": _threads(),
        "rounds": rounds,
        "seconds": times,
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "best_s": {k: min(v) for k, v in times.items()},
        "missing": missing,
    }
    fo = times["fastopt"]
    result["speedup"] = {
        k: {
            "per_round": [p / f for p, f in zip(v, fo)],
            "median_of_rounds": statistics.median(p / f for p, f in zip(v, fo)),
            "of_medians": result["median_s"][k] / result["median_s"]["fastopt"],
            "of_bests": result["best_s"][k] / result["best_s"]["fastopt"],
        }
        for k, v in times.items()
        if k != "fastopt"
    }
    lines = [f"\nepoch of {result['model']}, {n} samples, batch {BATCH}, {_threads()} threads"]
    for k in names:
        sp = result["speedup"].get(k)
        text = f"  {k:12s} median {result['median_s'][k]:7.3f} s  best {result['best_s'][k]:7.3f} s"
        if sp:
            rounds_text = ", ".join(f"{r:.2f}" for r in sp["per_round"])
            text += (
                f"  fastopt {sp['of_bests']:.2f}x faster (best); per round {rounds_text}; "
                f"of medians {sp['of_medians']:.2f}x"
            )
        lines.append(text)
    print("\n".join(lines))
    _record("epochs", result)
    return result


@pytest.mark.parametrize("goal", ["vs_torch", "vs_sklearn"])
def test_epoch_goal(goal):
    result = _measure()
    speedup = {k: v["of_bests"] for k, v in result["speedup"].items()}
    if goal == "vs_torch":
        torch_peers = [k for k in ("torch", "torch_fused") if k in speedup]
        if not torch_peers:
            pytest.skip(result["missing"].get("torch", "torch not measured"))
        fastest = min(torch_peers, key=speedup.get)
        assert speedup[fastest] >= 1.0, (
            f"fastopt's epoch takes {1 / speedup[fastest]:.2f}x {fastest}'s (goal: <= 1.0x); "
            f"speedups {speedup}, median times {result['median_s']}"
        )
    else:
        if "sklearn" not in speedup:
            pytest.skip(result["missing"]["sklearn"])
        assert speedup["sklearn"] >= 2.0, (
            f"fastopt is {speedup['sklearn']:.2f}x faster than scikit-learn (goal: >= 2x); "
            f"median times {result['median_s']}"
        )
