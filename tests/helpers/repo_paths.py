"""Where the tests find the repository and their data files, whichever
folder of tests/ a test (or this module) lives in."""

import os


def _repository():
    here = os.path.dirname(os.path.abspath(__file__))
    while not os.path.exists(os.path.join(here, "pyproject.toml")):
        parent = os.path.dirname(here)
        if parent == here:
            raise RuntimeError("tests/ is not inside the xknock repository (no pyproject.toml above it)")
        here = parent
    return here


REPO = _repository()
TESTS = os.path.join(REPO, "tests")
DATA = os.path.join(TESTS, "data")
