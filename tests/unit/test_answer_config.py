"""[filter] answer and strict, the host's answer settings and the warnings
about them: pure functions, on files made here, never this host's own."""

import pytest

from xknock.controller.kernel import layout
from xknock.controller.policy import answers, policy
from xknock.controller.config import ConfigError, parse_config

SSH = """
[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
open = ["tcp:22"]
"""


def parse(text):
    return parse_config(text, listening=set())


def test_defaults_are_closed_and_strict():
    config = parse(SSH)
    assert (config.answer, config.strict) == ("closed", True)


@pytest.mark.parametrize("value,message", [
    ('"reject"', 'filter: answer "reject": must be "closed" (answer like an unused port) or "drop"'),
    ("1", 'filter: answer an integer: must be "closed" (answer like an unused port) or "drop"'),
])
def test_a_bad_answer_is_refused(value, message):
    with pytest.raises(ConfigError) as err:
        parse(f"[filter]\nanswer = {value}\n" + SSH)
    assert message in err.value.errors


def test_drop_and_lenient_change_the_hash_the_defaults_do_not():
    from xknock.controller.config import config_hash

    base = config_hash(parse(SSH))
    assert config_hash(parse('[filter]\nanswer = "closed"\nstrict = true\n' + SSH)) == base
    assert config_hash(parse('[filter]\nanswer = "drop"\n' + SSH)) != base
    assert config_hash(parse("[filter]\nstrict = false\n" + SSH)) != base


def sequence(knock):
    steps = ", ".join(f'"{s}"' for s in knock)
    return f'[[sequence]]\nname = "s"\nknock = [{steps}]\nopen = ["tcp:22"]\n'


@pytest.mark.parametrize("knock,strict,warned", [
    (["tcp:7100", "tcp:7101"], True, "neighbouring ports in ascending order"),
    (["tcp:7100", "tcp:7101", "tcp:7102"], True, "neighbouring ports in ascending order"),
    (["tcp:7100"], True, "a single knock"),
    # strict mode does not help here: a random-order scan sends the two knocks back to back
    (["tcp:7100", "tcp:7200"], True, "random-order port scan"),
    (["udp:7200", "udp:7100"], True, "random-order port scan"),
    (["tcp:7100", "tcp:7200", "tcp:7300"], True, None),
    (["tcp:7100", "tcp:7200"], False, "sequential port scan"),
    (["tcp:7200", "tcp:7100"], False, "random-order port scan"),
    (["tcp:7100", "tcp:7200", "tcp:7300"], False, "sequential port scan"),
    (["tcp:7300", "tcp:7200", "tcp:7100"], False, None),
    (["tcp:7100", "udp:7200", "tcp:7300"], False, None),
])
def test_sequences_a_scan_could_complete_are_warned_about(knock, strict, warned):
    text = ("" if strict else "[filter]\nstrict = false\n") + sequence(knock)
    warnings = [w for w in parse(text).warnings if "scan" in w or "single knock" in w]
    if warned is None:
        assert warnings == []
    else:
        [warning] = warnings
        assert warned in warning and warning.startswith("sequence s:")


def write(root, path, text):
    full = root / path
    full.parent.mkdir(parents=True, exist_ok=True)
    full.write_text(text)


def test_the_host_values_are_read_from_its_sysctls(tmp_path):
    for path, value in {"net/ipv4/ip_default_ttl": "61", "net/ipv6/conf/eth7/hop_limit": "33",
                        "net/ipv6/conf/default/hop_limit": "99", "net/ipv4/icmp_ratelimit": "250",
                        "net/ipv4/icmp_ratemask": "6168", "net/ipv6/icmp/ratelimit": "400",
                        "net/ipv6/icmp/ratemask": "0-0,2-127", "net/ipv4/icmp_msgs_per_sec": "300",
                        "net/ipv4/icmp_msgs_burst": "7", "net/ipv6/auto_flowlabels": "0"}.items():
        write(tmp_path, path, value + "\n")
    host = answers.read_host("eth7", root=str(tmp_path))
    assert (host.ttl, host.hop_limit, host.icmp_ratelimit_ms, host.icmp6_ratelimit_ms) == (61, 33, 250, 400)
    assert host.icmp6_unreach_limited is False   # type 1 left out of the mask
    assert answers.read_host("eth8", root=str(tmp_path)).hop_limit == 99   # no such interface: default
    assert answers.read_host(root=str(tmp_path / "none")) == answers.HostAnswers()


def test_the_settings_follow_the_host():
    settings = policy.compile_policy(parse(SSH), 0, host=answers.HostAnswers(
        ttl=61, hop_limit=33, icmp_ratelimit_ms=250, icmp6_ratelimit_ms=400, msgs_per_sec=200, msgs_burst=7,
        auto_flowlabels=1, flowlabel_state_ranges=1)).settings
    assert settings.flags & layout.SET_ANSWER and settings.flags & layout.SET_STRICT
    assert (settings.ttl, settings.hop_limit) == (61, 33)
    assert (settings.icmp_peer_cost_ns, settings.icmp_peer_burst_ns) == (250_000_000, 1_500_000_000)
    assert settings.icmp6_peer_cost_ns == 100_000_000   # 400 ms for a /64 route: divided by four
    assert (settings.icmp_host_cost_ns, settings.icmp_host_burst_ns) == (5_000_000, 35_000_000)
    assert settings.flowlabels == layout.FLOWLABEL_AUTO | layout.FLOWLABEL_STATELESS
    assert settings.knock_window_us == 5_000_000   # the step timeout (default 5 s)


def test_no_rate_limit_mask_means_no_limit_per_destination():
    settings = policy.compile_policy(parse('[filter]\nanswer = "drop"\n' + SSH), 0,
                                     host=answers.HostAnswers(icmp_ratemask=0, msgs_per_sec=0)).settings
    assert not settings.flags & layout.SET_ANSWER
    assert settings.icmp_peer_cost_ns == 0
    assert settings.icmp_host_burst_ns == 0 and settings.icmp_host_cost_ns > 10**18   # no ICMP errors at all


def test_kernel_type_lists():
    assert answers.parse_type_list("0-1,3-127\n") == {0, 1, *range(3, 128)}
    assert answers.parse_type_list("") == set()


def test_attach_warns_when_the_answer_does_not_fit_the_host():
    closed, drop = parse(SSH), parse('[filter]\nanswer = "drop"\n' + SSH)
    [warning] = answers.attach_warnings(closed, {}, drops="nftables chain inet filter input: policy drop")
    assert 'Set answer = "drop"' in warning
    [warning] = answers.attach_warnings(drop, {}, drops="")
    assert "the only silent ones" in warning
    assert answers.attach_warnings(closed, {}, drops="") == []
    assert answers.attach_warnings(drop, {}, drops="iptables INPUT policy DROP") == []
