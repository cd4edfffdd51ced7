"""The data path's clock, for the times the controller writes into the maps."""

import time


def monotonic_ns():
    """The data path's clock: bpf_ktime_get_ns() is CLOCK_MONOTONIC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
