"""[spa] and [[spa.user]]: what is accepted, and one clear error for each mistake."""

import base64
import ipaddress

import pytest

from xknock.controller.kernel import layout
from xknock.controller.policy import policy
from xknock.controller.config import ConfigError, Step, parse_config

KEY = base64.b64encode(b"k" * 32).decode()
HMAC_KEY = base64.b64encode(b"h" * 64).decode()


def user(**keys):
    fields = {"name": '"alice"', "key": f'"{KEY}"', "hmac_key": f'"{HMAC_KEY}"', "open": '["tcp:22"]'} | keys
    return "[[spa.user]]\n" + "".join(f"{k} = {v}\n" for k, v in fields.items() if v is not None)


def parse(text):
    return parse_config(text, listening=set())


def test_defaults_follow_fwknop():
    spa = parse("[spa]\n" + user()).spa
    assert (spa.port, spa.max_age_ns, spa.rate) == (62201, 120_000_000_000, 10)
    (alice,) = spa.users
    assert alice.key == b"k" * 32 and alice.hmac_key == b"h" * 64 and alice.hmac_digest == "sha256"
    assert alice.open == (Step("tcp", 22),)
    assert alice.open_for_ns == alice.max_open_for_ns == 30_000_000_000
    assert alice.source_allowed("192.0.2.1") and alice.source_allowed("2001:db8::1")
    assert "k" * 8 not in repr(alice) and KEY not in repr(alice)   # keys never in a repr (logs, tracebacks)


def test_a_spa_only_config_warns_of_nothing_guarded_no_more():
    config = parse("[spa]\n" + user())
    assert not any("nothing is guarded" in w for w in config.warnings)
    assert config.guarded == (Step("tcp", 22),)


@pytest.mark.parametrize("text, expected", [
    ("[spa]\nport = 0\n" + user(), "port 0: must be a whole number from 1 to 65535"),
    ("[spa]\nrate = 0\n" + user(), "rate 0: must be a whole number"),
    ("[spa]\nrate = 100\ntotal_rate = 10\n" + user(), "total_rate 10 is below rate 100"),
    ("[spa]\nmax_age = \"2\"\n" + user(), 'max_age "2": no unit'),
    ("[spa]\nreplay_cache = \"relative\"\n" + user(), "replay_cache 'relative': must be an absolute path"),
    ("[spa]\nbogus = 1\n" + user(), 'unknown key "bogus"'),
    ("[spa]\n[spa.user]\nname = \"a\"\n", "write [[spa.user]], not [spa.user]"),
    ("[spa]\n" + user(hmac_key=None), "no hmac_key: HMAC is required"),
    ("[spa]\n" + user(key=None), "no key: give the Rijndael key"),
    ("[spa]\n" + user(key=None, hmac_key=None), "no keys: give key_file"),
    ("[spa]\n" + user(key='"not base64!"'), "key is not valid base64"),
    ("[spa]\n" + user(key='"' + base64.b64encode(b"k" * 33).decode() + '"'), "key decodes to 33 bytes; fwknop takes 1-32"),
    ("[spa]\n" + user(key_file='"/etc/k"'), "give key_file or key + hmac_key, not both"),
    ("[spa]\n" + user(key=None, hmac_key=None, key_file='"keys"'), "key_file 'keys': must be an absolute path"),
    ("[spa]\n" + user(hmac_digest='"sha2"'), "hmac_digest 'sha2': one of md5, sha1, sha256"),
    ("[spa]\n" + user(open=None), 'missing key "open"'),
    ("[spa]\n" + user(open='["icmp"]'), "icmp cannot be opened"),
    ("[spa]\n" + user(sources='["10.0.0.1/8"]'), "host bits set"),
    ("[spa]\n" + user(open_for='"1m"', max_open_for='"30s"'), "max_open_for is shorter than open_for"),
    ("[spa]\n" + user(name='"bad name"'), 'missing or bad "name"'),
    ("[spa]\n" + user() + user(), 'name "alice" is already used by spa.user[0]'),
    ("[spa]\n" + user(require_source_address='"yes"'), "require_source_address must be true or false"),
    ("[spa]\nport = 7000\n" + user() + '[[sequence]]\nname = "s"\nknock = ["udp:7000", "tcp:1", "tcp:2"]\nopen = ["tcp:3"]\n',
     'udp:7000 is a knock step of sequence "s"'),
    ("[spa]\n" + user(open='["tcp:1"]') + '[[sequence]]\nname = "s"\nknock = ["udp:7000", "tcp:1", "tcp:2"]\nopen = ["tcp:3"]\n',
     'open[0] "tcp:1" is a knock step of sequence "s"'),
    ("[spa]\n" + user(open='["udp:62201"]'), "is the SPA port itself"),
])
def test_mistakes_are_named(text, expected):
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert any(expected in error for error in caught.value.errors), caught.value.errors


def test_inline_keys_need_a_file_only_root_reads(tmp_path):
    path = tmp_path / "xknock.toml"
    path.write_text("[spa]\n" + user())
    path.chmod(0o644)
    from xknock.controller.config import load_config

    with pytest.raises(ConfigError, match=r"readable by group or others \(mode 0644\) but it holds secrets \(chmod 600 "):
        load_config(str(path), listening=set())
    path.chmod(0o600)
    assert load_config(str(path), listening=set()).spa.users[0].name == "alice"


def test_sources_limit_who_may_send():
    (alice,) = parse("[spa]\n" + user(sources='["192.0.2.0/24", "2001:db8::/32"]')).spa.users
    assert alice.source_allowed(ipaddress.ip_address("192.0.2.77"))
    assert not alice.source_allowed("198.51.100.1")
    assert alice.source_allowed("2001:db8::5") and not alice.source_allowed("2001:db9::5")


def test_the_policy_classifies_the_spa_port_and_guards_the_users_ports():
    config = parse("[spa]\nport = 4444\nrate = 4\ntotal_rate = 100\n" + user(open='["tcp:22", "udp:53"]'))
    compiled = policy.compile_policy(config, 0, cpus=2)
    assert compiled.ports[(layout.PROTO_UDP, 4444)].flags == layout.PORT_SPA
    assert compiled.ports[(layout.PROTO_TCP, 22)].flags == layout.PORT_GUARDED
    assert compiled.ports[(layout.PROTO_UDP, 53)].flags == layout.PORT_GUARDED
    settings = compiled.settings
    assert settings.spa_cost_ns == 250_000_000 and settings.spa_burst_ns == 1_000_000_000
    assert settings.spa_cpu_cost_ns == 20_000_000 and settings.spa_cpu_burst_ns == 1_000_000_000


def test_keys_change_the_policy_but_never_the_shown_hash():
    from xknock.controller.config import config_hash

    one = parse("[spa]\n" + user())
    other = parse("[spa]\n" + user(key='"' + base64.b64encode(b"x" * 32).decode() + '"'))
    assert one != other
    assert config_hash(one) == config_hash(other)


def test_the_default_total_rate_follows_the_stanzas_a_sender_costs():
    # Each stanza admitting a sender costs one HMAC per candidate: the default
    # keeps the verifier to half a core however many there are (issue 13.3).
    from xknock.controller.config import spa_config

    many = "".join(user(name=f'"u{n}"') for n in range(16))
    assert parse("[spa]\n" + user()).spa.total_rate == spa_config.default_total_rate(1) == 19_230
    assert parse("[spa]\n" + many).spa.total_rate == spa_config.default_total_rate(16) == 1_689
    cost_us = (spa_config.CANDIDATE_BASE_NS + 16 * spa_config.CANDIDATE_HMAC_NS) / 1000
    assert 1_689 * cost_us / 1e6 <= spa_config.VERIFIER_SHARE
    assert parse("[spa]\ntotal_rate = 50000\n" + many).spa.total_rate == 50_000   # given: as given
    assert parse("[spa]\nrate = 2000\n" + many).spa.total_rate == 2_000   # never below one source's rate


def test_the_replay_cache_defaults_to_the_instances_state_directory(monkeypatch):
    """xknock@IFACE sets XKNOCK_STATE_DIR=/var/lib/xknock/IFACE: two instances never share a cache."""
    monkeypatch.delenv("XKNOCK_STATE_DIR", raising=False)
    assert parse("[spa]\n" + user()).spa.replay_cache == "/var/lib/xknock/spa-replay"
    monkeypatch.setenv("XKNOCK_STATE_DIR", "/var/lib/xknock/eth1")
    assert parse("[spa]\n" + user()).spa.replay_cache == "/var/lib/xknock/eth1/spa-replay"
    assert parse('[spa]\nreplay_cache = "/srv/cache"\n' + user()).spa.replay_cache == "/srv/cache"
