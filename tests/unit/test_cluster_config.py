"""[cluster] (controller/config/cluster_config.py): every rule as a case,
and the one-line refusals the loader gives."""

import os

import pytest

from xknock.controller.config import ConfigError, parse_config

BASE = """
[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
open = ["tcp:22"]
"""


def parse(cluster_text, ban=False):
    return parse_config(BASE + ('\n[ban]\nafter = 3\n' if ban else "") + "\n[cluster]\n" + cluster_text,
                        listening=set())


def refusal(cluster_text):
    with pytest.raises(ConfigError) as caught:
        parse(cluster_text)
    return "\n".join(caught.value.errors)


def test_defaults():
    cluster = parse('endpoints = ["http://127.0.0.1:2379"]\nnode = "a"').cluster
    assert cluster.endpoints == (("http", "127.0.0.1", 2379),)
    assert (cluster.node, cluster.prefix, cluster.share_bans, cluster.spa_unreachable) == ("a", "/xknock/", False,
                                                                                        "refuse")
    assert cluster.timeout_ns == 2_000_000_000 and not cluster.tls


def test_no_cluster_table_means_alone():
    assert parse_config(BASE, listening=set()).cluster is None


def test_tls_files_and_user(tmp_path):
    paths = {}
    for name in ("ca", "cert", "key", "password"):
        paths[name] = tmp_path / name
        paths[name].write_text("x")
        os.chmod(paths[name], 0o600)
    cluster = parse(f'''endpoints = ["https://10.0.0.1:2379", "https://[fd00::1]:2379"]
ca_file = "{paths['ca']}"
cert_file = "{paths['cert']}"
key_file = "{paths['key']}"
user = "xknock"
password_file = "{paths['password']}"
prefix = "/xknock/prod/"
node = "edge-1"
share_bans = true
spa_unreachable = "local"
timeout = "500ms"''', ban=True).cluster
    assert cluster.tls and cluster.endpoints[1] == ("https", "fd00::1", 2379)
    assert (cluster.user, cluster.share_bans, cluster.spa_unreachable, cluster.timeout_ns) == \
        ("xknock", True, "local", 500_000_000)


@pytest.mark.parametrize("text, expected", [
    ('node = "a"', "endpoints missing"),
    ('endpoints = []\nnode = "a"', "non-empty array"),
    ('endpoints = ["127.0.0.1:2379"]\nnode = "a"', 'endpoints[0] "127.0.0.1:2379": write http://HOST:PORT'),
    ('endpoints = ["http://127.0.0.1"]\nnode = "a"', "write http://HOST:PORT"),
    ('endpoints = ["http://h:1", "http://h:1"]\nnode = "a"', "named twice"),
    ('endpoints = ["https://h:1"]\nnode = "a"', "needs ca_file"),
    ('endpoints = ["http://h:1"]\nca_file = "/etc/hostname"\nnode = "a"', "ca_file is set but an endpoint is http"),
    ('endpoints = ["http://h:1"]\nca_file = "/nonexistent/ca.pem"', "ca_file /nonexistent/ca.pem: no such file"),
    ('endpoints = ["http://h:1"]\ncert_file = "/etc/hostname"', "cert_file and key_file go together"),
    ('endpoints = ["http://h:1"]\nuser = "u"', "user and password_file go together"),
    ('endpoints = ["http://h:1"]\nprefix = "xknock"', 'prefix "xknock": must start and end with "/"'),
    ('endpoints = ["http://h:1"]\nnode = "a b"', 'node "a b"'),
    ('endpoints = ["http://h:1"]\nshare_bans = "yes"', "share_bans must be true or false"),
    ('endpoints = ["http://h:1"]\nshare_bans = true', "share_bans = true needs a [ban] table"),
    ('endpoints = ["http://h:1"]\nspa_unreachable = "open"', 'spa_unreachable \'open\': must be "refuse"'),
    ('endpoints = ["http://h:1"]\ntimeout = "1m"', "timeout: at most 30s"),
    ('endpoints = ["http://h:1"]\nendpoint = "x"', 'unknown key "endpoint"'),
    ('endpoints = ["http://h:1"]\nhooks = "all"', 'hooks \'all\': must be "every_node"'),
])
def test_refusals(text, expected):
    assert expected in refusal(text)


def test_password_file_readable_by_others_is_refused(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("hunter2")
    os.chmod(secret, 0o644)
    assert "readable by group or others" in refusal(
        f'endpoints = ["http://h:1"]\nuser = "u"\npassword_file = "{secret}"')


def test_cluster_is_not_policy():
    alone = parse_config(BASE, listening=set())
    assert parse('endpoints = ["http://h:1"]\nnode = "a"') == alone


def test_a_reload_may_change_only_the_hooks_of_cluster():
    from xknock.controller.config.cluster_config import reload_refusal

    running = parse('endpoints = ["http://h:1"]\nnode = "a"').cluster
    assert running.hooks == "every_node"
    assert reload_refusal(running, parse('endpoints = ["http://h:1"]\nnode = "a"\nhooks = "origin"').cluster) is None
    moved = reload_refusal(running, parse('endpoints = ["http://h:2"]\nnode = "a"\nprefix = "/x/"\n'
                                          'timeout = "1s"').cluster)
    assert moved.startswith("[cluster] changed (endpoints, prefix, timeout): ") and "restart" in moved
    assert reload_refusal(running, None).startswith("[cluster] removed: ")
    assert reload_refusal(None, running).startswith("[cluster] added: ")
    assert reload_refusal(None, None) is None
