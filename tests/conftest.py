import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The knock, grant and list tests read plain verdicts: their refusals drop.
# What answer = "closed" (the default) sends is tested in test_answers.py and
# end to end; strict mode (also the default) stays on.
EXAMPLE_CONFIG = """
[filter]
mode = "enforce"
answer = "drop"

[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
step_timeout = "5s"
open = ["tcp:22"]
open_for = "30s"
idle_timeout = "15m"

[[sequence]]
name = "web"
knock = ["udp:8000", "icmp", "tcp:7001"]
step_timeout = "5s"
open = ["tcp:443", "udp:443"]
open_for = "10s"
idle_timeout = "1m"

[allow]
sources = ["192.0.2.10", "2001:db8:a::/48"]

[deny]
sources = ["203.0.113.0/24", "2001:db8:bad::/48"]
"""


def pytest_configure(config):
    if os.geteuid() != 0:
        raise pytest.UsageError("xknock's tests load XDP programs and build namespaces: run them as root")


@pytest.fixture(scope="session")
def harness():
    """The real program, built with the test clock, loaded once per session."""
    from xknock.controller.testrun import Harness

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
