import os
import sys

import pytest

# tests/helpers for the test helpers (fault_helpers, model, ...); the repository root
# for xknock_dev, the development tools that are never installed. Subprocesses
# (the traffic generator, `python -c` helpers) find it through PYTHONPATH.
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
sys.path.insert(0, os.path.join(TESTS, "helpers"))
sys.path.insert(0, REPO)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))

from xknock_dev.example import EXAMPLE_CONFIG  # noqa: E402  (conftest.EXAMPLE_CONFIG: tests import it from here)


UNIT = os.path.join(TESTS, "unit")
# Fixtures that load the real program: root only, never in tests/unit.
ROOT_FIXTURES = {"harness", "xk"}


def _in_unit(item):
    return os.path.commonpath([str(item.path), UNIT]) == UNIT


def pytest_collection_modifyitems(config, items):
    """tests/unit runs as anyone; everything else needs root, and a unit test
    may not ask for a fixture that loads the program."""
    for item in items:
        if _in_unit(item):
            misused = ROOT_FIXTURES & set(item.fixturenames)
            if misused:
                raise pytest.UsageError(f"{item.nodeid} asks for {', '.join(sorted(misused))}: it loads the BPF "
                                        "program, so the test belongs in tests/kernel (xknock_dev/classify_tests.py)")
        elif os.geteuid() != 0:
            raise pytest.UsageError(f"{item.nodeid}: xknock's tests outside tests/unit load XDP programs and build "
                                    "namespaces: run them as root (tests/unit runs as anyone)")


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory):
    """HOME in a temporary folder for the session's fixtures (module-scoped
    ones start before any test's): no test writes the real home directory."""
    with pytest.MonkeyPatch.context() as patch:
        home = tmp_path_factory.mktemp("home")
        patch.setenv("HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def home(session_home, tmp_path_factory, monkeypatch):
    """A fresh, empty HOME for every test and the subprocesses it starts
    (`fwknop --key-gen` writes ~/.fwknoprc on its first run, for one)."""
    fresh = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(fresh))
    return fresh


@pytest.fixture(autouse=True)
def private_spent_file(tmp_path, monkeypatch):
    """Time-based sequences parsed in a test keep their spent windows in the
    test's own directory, never in the host's /var/lib/xknock. (Controllers
    run as processes name theirs in the config: spent_file.)"""
    from xknock.controller.config import totp_config

    path = str(tmp_path / "totp-spent")
    monkeypatch.setattr(totp_config, "DEFAULT_SPENT_FILE", path)
    return path


@pytest.fixture
def one_cpu():
    """The test's runs on one CPU (its lowest allowed), for what the program
    keeps per CPU (copies, rate shares); yields the CPUs it was allowed before."""
    was = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(was)})
    try:
        yield sorted(was)
    finally:
        os.sched_setaffinity(0, was)


@pytest.fixture(scope="session")
def harness():
    """The real program, built with the test clock, loaded once per session."""
    from xknock_dev.testrun import Harness

    with Harness() as h:
        yield h


@pytest.fixture
def example_config():
    from xknock.controller.config import parse_config

    return parse_config(EXAMPLE_CONFIG, listening=set())


@pytest.fixture
def xk(harness, example_config):
    """The harness with the example policy live and no state left from earlier tests."""
    harness.reset_state()
    harness.set_clock(1_000_000_000_000)
    harness.apply(example_config)
    return harness
