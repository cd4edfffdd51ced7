"""The foreground controller's memory while it serves (issue 16: at most 50
MiB once attached and while serving metrics, events, hooks and SPA): VmRSS
read after each thing it did in a lab, a knock whose on_open hook ran, an
SPA packet from `xknock spa` accepted, a metrics scrape, all of them again."""

import base64
import os
import tempfile
import time

from xknock_dev.e2e import XKNOCK, Foreground, knock, served_lab, spa_verdicts, write_config
from xknock_dev.lab import HELPER_PYTHON, can_connect, wait_for

from . import common

GUARDED = 22
SPA_PORT = 62201
CONFIG = """
[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
open = ["tcp:{guarded}"]
on_open = ["/bin/sh", "-c", "echo opened >> {hooked}"]

[spa]
port = {port}
replay_cache = "{cache}"

[[spa.user]]
name = "alice"
key = "{key}"
hmac_key = "{hmac}"
username = "alice"
open = ["tcp:{guarded}"]
open_for = "30s"
"""


def _scrape(net, port):
    done = net.server.run([HELPER_PYTHON, "-c",
                           f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/metrics').read()"])
    if done.returncode:
        raise SystemExit(f"bench: the metrics scrape failed: {done.stderr.strip()}")


def serving_rss_kib(rounds=3):
    """[(what the controller had done, VmRSS KiB)], in order."""
    key, hmac = base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(64)).decode()
    metrics_port = 9100
    found = []
    with tempfile.TemporaryDirectory(prefix="xkbench-serving-") as tmp, served_lab("xkrss", GUARDED) as net:
        hooked = os.path.join(tmp, "hooked")
        path = write_config(tmp, "serving.toml", CONFIG.format(
            guarded=GUARDED, hooked=hooked, port=SPA_PORT, cache=os.path.join(tmp, "state", "spa-replay"),
            key=key, hmac=hmac))
        with Foreground(net, path, "--metrics-addr", f"127.0.0.1:{metrics_port}") as controller:
            controller.wait_ready()
            pid = controller.process.pid
            found.append(("attached, handed over (no BCC)", common.vmrss_kib(pid)))
            _scrape(net, metrics_port)
            found.append(("+ a metrics scrape", common.vmrss_kib(pid)))
            for round_ in range(1, rounds + 1):
                knock(net.client, net.server.ipv4, "tcp:7000", "udp:8000", "tcp:9000")
                if not wait_for(lambda: os.path.exists(hooked) and len(open(hooked).readlines()) >= round_, 10):
                    raise SystemExit(f"bench: the on_open hook did not run:\n{controller.log.read_all(0.5)}")
                if round_ == 1:
                    found.append(("+ a knock, its on_open hook run", common.vmrss_kib(pid)))
                spa = net.client.run([XKNOCK, "spa", net.server.ipv4, "-A", f"tcp/{GUARDED}", "--key-base64", key,
                                      "--hmac-key-base64", hmac, "--user", "alice", "--port", str(SPA_PORT)])
                if spa.returncode:
                    raise SystemExit(f"bench: xknock spa failed: {spa.stderr.strip()}")
                if not wait_for(lambda: spa_verdicts(net).get("accepted", 0) >= round_, 10):
                    raise SystemExit(f"bench: the SPA packet was not accepted: {spa_verdicts(net)}\n"
                                     f"{controller.log.read_all(0.5)}")
                if round_ == 1:
                    found.append(("+ an SPA packet accepted", common.vmrss_kib(pid)))
                _scrape(net, metrics_port)
            if not can_connect(net.client, net.server.ipv4, GUARDED, timeout=2):
                raise SystemExit("bench: the guarded port did not open for the client")
            time.sleep(1)   # the controller's once-a-second work (counters, sweeps) after the last of it
            found.append((f"+ {rounds - 1} more knocks, SPA packets and scrapes", common.vmrss_kib(pid)))
    return found
