"""Issue 6, state exhaustion: a legitimate client's knock under a flood of
knocks from spoofed random sources, far more than the knock state holds.

The attacker floods SYNs to the sequence's FIRST knock port from random IPv4
sources (traffic.py, one generator, XDP frames straight to the server's bridge
port) at 700,000 a second: every flood packet writes a first step into the
`firsts` filter, so in a 0.5 s gap between two knocks 350,000 new sources
arrive, more than the whole progress map holds. That is the state-exhaustion
attack; the rate stays below what this 2-CPU lab delivers to XDP without
losing frames before it (the test skips, saying so, if the machine is too
busy for that). Faster floods lose frames in the server's receive ring before
any filter sees them: bench/run flood measures those.
Meanwhile the client knocks with the real `xknock knock --repeat 3` (the
advice for knocking through a flood, docs/operations.md) and connects to the
guarded port, 20 times at the CLI's default delay and 20 times with half a
second between knocks (this part stops at its first failure, to stay short).
The client's progress is watched in the maps (bench/flood.py), so a failure
says whether its progress was forgotten or a knock was lost.

Measured before --repeat (bench/run flood, 2 vCPUs, one generator): the flood
is judged at 1.9-2.8 Mpps and 12-32% more overflow the server's receive ring
before XDP, in bursts of up to a few hundred ms; a client's untouched first
step lives 777 ms median (359-1,753) at 1.95 M first steps/s. Knocking once,
the 0.5 s client connected 15/20 (4 'evicted after step 1') and the 0.1 s
client 12-19/20 (knocks lost in the full ring). With --repeat 3 at max rate,
3 of 5 runs held 20/20 at both delays, every failure a frame lost before XDP.
"""

import os
import subprocess
import sys
import time

import pytest
from repo_paths import REPO

ROOT = REPO
sys.path.insert(0, ROOT)
from bench.flood import TARGETS, FloodLab, run_tries, summarize  # noqa: E402

pytestmark = [pytest.mark.netns, pytest.mark.slow]

TRIES = 20
DEFAULT_DELAY = 0.1     # `xknock knock`'s default --delay
SLOW_DELAY = 0.5        # a slower client, or a longer path: half a second between knocks
REPEAT = 3              # `xknock knock --repeat 3`: the advice for knocking through a flood (docs/operations.md)


# The flood's rate: far more new sources a second than the progress map holds
# (262,144) or the first-step filter turns over in a client's gap, yet below
# what this 2-CPU lab delivers to XDP without losing frames in the server's
# receive ring (about 1 Mpps, bench/run knockd "highest junk rate"). Above
# that, frames are lost before any filter sees them: bench/run flood measures
# the unthrottled flood, and docs/operations.md gives the advice for it.
FLOOD_PPS = 700_000
MAX_RING_DROPS = 0.03


@pytest.fixture
def flooded():
    """The lab, xknock on the server, and the first-port flood running at FLOOD_PPS."""
    with FloodLab(prefix="xkfloodt") as fl:
        flood = fl.flood(TARGETS["first knock port"], rate=FLOOD_PPS)
        try:
            time.sleep(1.0)      # the map is full and turning over
            yield fl
        finally:
            flood.stop()


def _tries(fl, delay, stop_at_failure=False):
    """Knock and connect TRIES times; (results, pps the flood reached xknock at, a line saying it all,
    the share of frames lost before XDP)."""
    before, started, tx_before = fl.counters(), time.monotonic(), fl.server_port_tx()
    results = run_tries(fl, delay, TRIES, stop_at_failure=stop_at_failure, repeat=REPEAT)
    rate = fl.seen(before, fl.counters()) / (time.monotonic() - started)
    ring_drops = fl.dropped_share(tx_before, fl.server_port_tx())
    s = summarize(results)
    stopped = " (stopped at the first failure)" if stop_at_failure else ""
    text = (f"delay {delay}, repeat {REPEAT}: {s['ok']}/{s['tries']} connected{stopped};"
            f" flood judged by xknock at {rate:,.0f} pps, first steps held in the {fl.state_name} of "
            f"{fl.state_slots:,}: turnover ~{fl.state_slots / rate * 1000:.0f} ms; {ring_drops:.1%} of the frames "
            "lost in the server's full receive ring;"
            f" failed tries: {s['failures'] or '-'}")
    return results, rate, text, ring_drops


# Below this many first-step packets per second the 262,144-entry map keeps a
# step-1 entry longer than the slow client's gap (0.51 s): the flood did not
# reach the rate this test is about (a machine too busy), so it says so.
MIN_RATE = 600_000


def test_knock_succeeds_20_of_20_under_a_random_source_first_step_flood(flooded, capsys):
    default, default_rate, default_text, default_drops = _tries(flooded, DEFAULT_DELAY)
    slow, slow_rate, slow_text, slow_drops = _tries(flooded, SLOW_DELAY, stop_at_failure=True)
    with capsys.disabled():
        print(f"\n  {default_text}\n  {slow_text}")
    if min(default_rate, slow_rate) < MIN_RATE or max(default_drops, slow_drops) > MAX_RING_DROPS:
        pytest.skip(f"the flood reached xknock at {min(default_rate, slow_rate):,.0f} pps (needs {MIN_RATE:,}) "
                    f"with {max(default_drops, slow_drops):.1%} of the frames lost before XDP (at most "
                    f"{MAX_RING_DROPS:.0%}): the machine is too busy for this test")
    assert all(r["ok"] for r in default), default_text
    assert len(slow) == TRIES and all(r["ok"] for r in slow), slow_text


def test_flood_benchmark_runs_quick(tmp_path):
    """bench/run flood --quick, once, so that the benchmark cannot rot (bench/run all leaves it out: it
    takes minutes). Its numbers are not asserted."""
    env = dict(os.environ, XKNOCK_VENV=os.path.dirname(os.path.dirname(sys.executable)),
               XKNOCK_BENCH_RESULTS=str(tmp_path))
    result = subprocess.run([os.path.join(ROOT, "bench", "run"), "flood", "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    report = (tmp_path / "latest-flood.md").read_text()
    assert "## Knock success under the flood" in report and "| first knock port | max |" in report
