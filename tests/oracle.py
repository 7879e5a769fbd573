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
