"""The metrics endpoint over TLS and basic auth (--metrics-web-config, in
node_exporter's web.yml format): certificates made by openssl for the test,
requests by urllib, every mistake in the file refused before anything is
attached. No BPF: the server holds only the process collector here
(tests/e2e/test_prometheus.py scrapes the real one over TLS and basic auth)."""

import base64
import contextlib
import os
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import bcrypt
import pytest

from xknock.controller.config import ConfigError
from xknock.controller.daemon import metrics
from xknock.controller.daemon.webconfig import load_web_config
from tls_helpers import make_certs

XKNOCK = os.path.join(os.path.dirname(sys.executable), "xknock")
PASSWORD = "s3cret pass"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def web_config(directory, text):
    path = directory / "web.yml"
    path.write_text(text)
    return str(path)


TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"


def users(**passwords):
    lines = "".join(f"  {user}: {bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode()}\n"
                    for user, pw in passwords.items())
    return "basic_auth_users:\n" + lines


@contextlib.contextmanager
def server(path):
    served = metrics.MetricsServer("127.0.0.1", 0, load_web_config(path))
    try:
        yield served
    finally:
        served.close()


def get(url, certs=None, auth=None, client=None):
    """(status, headers, body); status 0 with the error when no HTTP answer came."""
    context = None
    if url.startswith("https"):
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        if client:
            context.load_cert_chain(str(certs / f"{client}.crt"), str(certs / f"{client}.key"))
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()
    except (OSError, ssl.SSLError) as err:
        return 0, {}, str(err)


def test_tls_serves_the_metrics_and_plain_http_gets_nothing(certs):
    with server(web_config(certs, TLS)) as served:
        status, _, body = get(f"https://127.0.0.1:{served.port}/metrics", certs)
        assert status == 200 and "process_cpu_seconds_total" in body
        assert get(f"http://127.0.0.1:{served.port}/metrics")[0] != 200


def test_basic_auth_lets_in_the_right_user_only(certs):
    with server(web_config(certs, TLS + users(prometheus=PASSWORD, other="x"))) as served:
        url = f"https://127.0.0.1:{served.port}/metrics"
        status, headers, _ = get(url, certs)
        assert status == 401 and headers["WWW-Authenticate"] == 'Basic realm="xknock"'
        for wrong in ("prometheus:wrong", "nobody:" + PASSWORD, "prometheus", "other:" + PASSWORD, ":"):
            assert get(url, certs, auth=wrong)[0] == 401, wrong
        for _ in range(2):   # the second from the cache of verified credentials
            status, _, body = get(url, certs, auth="prometheus:" + PASSWORD)
            assert status == 200 and "process_cpu_seconds_total" in body
        assert get(url, certs, auth="prometheus:wrong")[0] == 401   # the cache holds right ones only


def test_basic_auth_without_tls(tmp_path):
    with server(web_config(tmp_path, users(prometheus=PASSWORD))) as served:
        url = f"http://127.0.0.1:{served.port}/metrics"
        assert get(url)[0] == 401
        assert get(url, auth="prometheus:" + PASSWORD)[0] == 200


def test_client_certificates_when_required(certs):
    (certs / "other-ca").mkdir(exist_ok=True)
    make_certs(certs / "other-ca")
    config = TLS + "  client_ca_file: ca.crt\n  client_auth_type: RequireAndVerifyClientCert\n"
    with server(web_config(certs, config)) as served:
        url = f"https://127.0.0.1:{served.port}/metrics"
        assert get(url, certs, client="client")[0] == 200
        assert get(url, certs)[0] == 0                                  # no certificate: no answer
        assert get(url, certs, client="other-ca/client")[0] == 0       # signed by another CA


def test_a_client_that_never_finishes_its_handshake_holds_up_nobody(certs, capsys):
    with server(web_config(certs, TLS)) as served:
        with socket.create_connection(("127.0.0.1", served.port)) as silent:
            with socket.create_connection(("127.0.0.1", served.port)) as junk:
                junk.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")   # plain HTTP to TLS: a failed handshake
                status, _, _ = get(f"https://127.0.0.1:{served.port}/metrics", certs)
                assert status == 200
            silent.sendall(b"")
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("tls_server_config:\n  cert_file: server.crt\n", "tls_server_config: key_file is missing"),
    (TLS + "  cipher_suites: [x]\n", "tls_server_config: unknown key 'cipher_suites'"),
    ("http_server_config:\n  http2: true\n", "unknown key 'http_server_config'"),
    ("tls_server_config:\n  cert_file: none.crt\n  key_file: server.key\n", "none.crt: no such file"),
    ("tls_server_config:\n  cert_file: server.crt\n  key_file: client.key\n", "do not make a certificate and its key"),
    (TLS + "  client_auth_type: RequireAndVerifyClientCert\n", "RequireAndVerifyClientCert needs client_ca_file"),
    (TLS + "  client_auth_type: Maybe\n", "client_auth_type 'Maybe': one of NoClientCert"),
    (TLS + "  min_version: TLS10\n", "min_version 'TLS10': one of TLS12, TLS13"),
    ("basic_auth_users:\n  prometheus: plaintext\n", "prometheus: not a bcrypt hash (make one with `htpasswd"),
    ("basic_auth_users: []\n", "expected a mapping of user names to bcrypt hashes"),
    ("tls_server_config: [\n", "not YAML"),
    ("- a\n", "expected a mapping"),
])
def test_a_bad_web_config_is_refused_with_its_reason(certs, text, message):
    with pytest.raises(ConfigError) as caught:
        load_web_config(web_config(certs, text))
    assert any(message in error for error in caught.value.errors), caught.value.errors


def test_files_others_could_change_or_read_are_refused(tmp_path):
    certs = make_certs(tmp_path)
    os.chmod(certs / "server.key", 0o640)
    path = web_config(certs, TLS)
    with pytest.raises(ConfigError) as caught:
        load_web_config(path)
    assert caught.value.errors == [f"tls_server_config key_file {certs}/server.key: readable by group or others "
                                   f"(mode 0640) but it holds secrets (chmod 600 {certs}/server.key)"]
    os.chmod(certs / "server.key", 0o600)
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError, match="metrics web config .*writable by group or others"):
        load_web_config(path)
    os.chmod(path, 0o644)
    os.chmod(certs / "ca.crt", 0o666)
    with pytest.raises(ConfigError, match="client_ca_file .*writable by group or others"):
        load_web_config(web_config(certs, TLS + "  client_ca_file: ca.crt\n"))


def test_every_problem_is_named_at_once(certs):
    with pytest.raises(ConfigError) as caught:
        load_web_config(web_config(certs, "tls_server_config:\n  key_file: server.key\nusers: {}\n"))
    assert len(caught.value.errors) == 2, caught.value.errors


def test_attach_refuses_a_bad_web_config_before_attaching(tmp_path):
    config = tmp_path / "x.toml"
    config.write_text('[[sequence]]\nname = "ssh"\nknock = ["udp:7000", "udp:8000", "udp:9000"]\nopen = ["tcp:22"]\n')
    bad = web_config(tmp_path, "tls_server_config:\n  cert_file: a.crt\n  key_file: a.key\n")
    # In a network namespace of its own: whatever happens, nothing is attached here.
    result = subprocess.run(["unshare", "--net", XKNOCK, "attach", "lo", "-c", str(config), "--metrics-addr",
                             "127.0.0.1:9798", "--metrics-web-config", bad], capture_output=True, text=True, timeout=30)
    assert result.returncode == 78, result.stderr   # EX_CONFIG: systemd does not restart it
    assert result.stderr.splitlines() == [f"xknock: --metrics-web-config {bad}: tls_server_config: cert_file "
                                          f"{tmp_path}/a.crt: no such file",
                                          f"xknock: --metrics-web-config {bad}: tls_server_config: key_file "
                                          f"{tmp_path}/a.key: no such file"]
    alone = subprocess.run(["unshare", "--net", XKNOCK, "attach", "lo", "-c", str(config), "--metrics-web-config",
                            bad], capture_output=True, text=True, timeout=30)
    assert alone.returncode == 2 and "give --metrics-addr too" in alone.stderr
