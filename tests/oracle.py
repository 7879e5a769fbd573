"""torch as a test oracle: skip when it is missing, unless the run demands it.

``FASTOPT_REQUIRE_ORACLE=1`` turns a missing torch into a failure, so a CI job that installs
``fastopt[oracle]`` cannot silently pass by skipping every comparison.
"""

import os

import pytest

REQUIRE_ENV = "FASTOPT_REQUIRE_ORACLE"


def oracle_required():
    """Whether the environment demands the torch oracle (``FASTOPT_REQUIRE_ORACLE=1``)."""
    return os.environ.get(REQUIRE_ENV, "").strip() == "1"


def torch_or_skip():
    """The ``torch`` module; skip the calling test (or module) when torch cannot be imported, or
    raise when ``FASTOPT_REQUIRE_ORACLE=1`` so that the test fails instead of skipping."""
    try:
        import torch
    except (ImportError, OSError) as exc:  # OSError: a torch install with broken shared libraries
        if oracle_required():
            raise RuntimeError(
                f"{REQUIRE_ENV}=1 but torch cannot be imported ({exc!r}); "
                "install the oracle extra: pip install 'fastopt[oracle]'"
            ) from exc
        pytest.skip(
            f"torch is not installed (oracle tests; set {REQUIRE_ENV}=1 to make this an error)",
            allow_module_level=True,
        )
    return torch


EXTRAS_ENV = "FASTOPT_REQUIRE_EXTRAS"
"""Set to 1 (CI does) to make a missing matplotlib, scikit-learn or tqdm (the test extra) an error."""

_REQUIRED_BY = {"torch": REQUIRE_ENV, "matplotlib": EXTRAS_ENV, "sklearn": EXTRAS_ENV}
_REQUIRED_BY["tqdm"] = EXTRAS_ENV
_REQUIRED_BY["schedulefree"] = REQUIRE_ENV  # the schedule-free oracle, installed beside torch
_REQUIRED_BY["bitsandbytes"] = REQUIRE_ENV  # the 8-bit state oracle, installed beside torch


def import_or_skip(name):
    """``pytest.importorskip(name)`` that honours the FASTOPT_REQUIRE_* flag of the module's
    distribution (``torch``: FASTOPT_REQUIRE_ORACLE; ``matplotlib``, ``sklearn``, ``tqdm`` and
    their submodules: FASTOPT_REQUIRE_EXTRAS): with the flag set, a failed import fails the test."""
    flag = _REQUIRED_BY.get(name.split(".")[0])
    if flag is None:
        raise ValueError(f"no FASTOPT_REQUIRE_* flag covers {name!r}; add it to _REQUIRED_BY")
    if os.environ.get(flag, "").strip() == "1":
        import importlib

        try:
            return importlib.import_module(name)
        except (ImportError, OSError) as exc:
            pytest.fail(f"{flag}=1 but {name} cannot be imported ({exc!r})", pytrace=False)
    return pytest.importorskip(name)
