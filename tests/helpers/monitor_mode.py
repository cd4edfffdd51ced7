"""Monitor mode's one promise, for any packet the filter refuses: enforce
refuses it, monitor passes it, and both count the reason why (monitor counts
monitor_passed as well). Each test file hands in its own packet and reason."""

import dataclasses

from xknock.controller.kernel.layout import Reason
from xknock_dev.testrun import XDP_PASS


def assert_monitor_passes_what_enforce_refuses(harness, config, frame, reason):
    """Runs frame under config in enforce mode, then in monitor mode, each from
    clean state; leaves the harness in monitor mode after its run, for the
    caller's own checks."""
    for mode, passes in (("enforce", False), ("monitor", True)):
        harness.reset_state()
        harness.apply(dataclasses.replace(config, mode=mode))
        verdict = harness.run(frame)
        counters = harness.counters()
        assert (verdict == XDP_PASS) is passes, f"{mode}: verdict {verdict}"
        assert counters[reason] == 1, f"{mode}: {reason.name} counted {counters[reason]} times"
        assert counters[Reason.MONITOR_PASSED] == int(passes), f"{mode}: monitor_passed {counters[Reason.MONITOR_PASSED]}"
