"""Test-suite setup: make sibling helper modules (``oracle``) importable under --import-mode=importlib.

Keep this minimal and free of heavy imports (no numba): the CUDA simulator tests run in their own
process and must be able to set their environment before numba is first imported.
"""

import pathlib
import sys

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
