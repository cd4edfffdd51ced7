"""The controller's rotation of time-based sequences writes new knock ports,
not a new host: the host's answer settings (sysctls, and the protocols probed
on loopback) are read at reload and at the first rotation, and kept."""

import types

from xknock_dev.e2e import write_config

from xknock.controller.config import parse_config
from xknock.controller.daemon import daemon
from xknock.controller.policy import protocols

TOTP = """
[filter]
answer = "drop"

[[sequence]]
name = "ssh"
totp = true
secret = "ONZXG43TONZXG43TONZXG43TONZXG43T"
knock = ["tcp", "udp", "tcp"]
window = "60s"
port_range = "20000-29999"
open = ["tcp:22"]
"""


def test_rotations_reuse_the_host_read_at_the_first_and_at_reload(xk, tmp_path, monkeypatch):
    probes = []
    real_probe = protocols.probe
    monkeypatch.setattr(protocols, "probe", lambda *args, **kw: probes.append(1) or real_probe(*args, **kw))
    path = write_config(tmp_path, "totp.toml", TOTP)
    controller = daemon.Controller(types.SimpleNamespace(maps=xk.maps), ["veth-test"], path,
                                   parse_config(TOTP, listening=set()), signals=daemon.Signals())
    for _ in range(3):
        controller.rotate()
        assert not controller.rotate_now and controller.rotation.uids   # written, not failed
    assert len(probes) == 1
    ok, error, _ = controller._reload()
    assert ok, error
    assert len(probes) == 2   # a reload asks the host again
    controller.rotate()
    assert len(probes) == 2
