"""TLS and basic auth for the metrics endpoint: node_exporter's web config file.

`xknock attach --metrics-web-config FILE` reads the subset of the Prometheus
exporter toolkit's web.yml (docs/metrics.md) that a scrape needs:

    tls_server_config:
      cert_file: server.crt          # relative paths: from the file's directory
      key_file: server.key
      client_ca_file: ca.crt         # with client_auth_type below
      client_auth_type: RequireAndVerifyClientCert
      min_version: TLS12
    basic_auth_users:
      prometheus: $2b$12$...         # bcrypt, as `htpasswd -nBC 12 prometheus` makes

Everything is checked when the file is read, before anything is attached:
an unknown key, a missing file, a certificate that does not match its key,
a password that is not a bcrypt hash, and who may change the files
(kernel/trust.py: root's, not group- or other-writable; the TLS key not
readable by others either). The file is read once; a change needs
a restart of the controller.

Needs python3-yaml, and python3-bcrypt for basic_auth_users (scripts/setup).
"""

import base64
import binascii
import dataclasses
import hashlib
import hmac
import os
import ssl
import threading

from ..config import ConfigError
from ..kernel import trust

CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
TOP_KEYS = {"tls_server_config", "basic_auth_users"}
TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version", "max_version"}
REALM = "xknock"
_CACHE_MAX = 64


@dataclasses.dataclass
class WebConfig:
    path: str
    tls: ssl.SSLContext | None = None
    users: dict = dataclasses.field(default_factory=dict)   # user -> bcrypt hash (bytes)

    @property
    def scheme(self):
        return "https" if self.tls else "http"


def load_web_config(path):
    """A WebConfig from node_exporter's web.yml format; ConfigError naming every problem."""
    where = f"--metrics-web-config {path}"
    untrusted = trust.problem(path, "metrics web config")   # it says who may read the metrics
    if untrusted:
        raise ConfigError([untrusted])
    try:
        import yaml
    except ImportError:
        raise ConfigError([f"{where}: reading it needs PyYAML (Debian: apt install python3-yaml)"]) from None
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError([f"{where}: {err.strerror or err}"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([f"{where}: not YAML: {' '.join(str(err).split())}"]) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([f"{where}: expected a mapping with {' and '.join(sorted(TOP_KEYS))}"])
    errors = [f"{where}: unknown key {key!r} (xknock reads {', '.join(sorted(TOP_KEYS))})"
              for key in data if key not in TOP_KEYS]
    config = WebConfig(path)
    base = os.path.dirname(os.path.abspath(path))
    if data.get("tls_server_config") is not None:
        config.tls = _tls(data["tls_server_config"], base, where, errors)
    if data.get("basic_auth_users") is not None:
        config.users = _users(data["basic_auth_users"], where, errors)
    if errors:
        raise ConfigError(errors)
    return config


def _tls(section, base, where, errors):
    where = f"{where}: tls_server_config"
    if not isinstance(section, dict):
        errors.append(f"{where}: expected a mapping")
        return None
    errors += [f"{where}: unknown key {key!r} (xknock reads {', '.join(sorted(TLS_KEYS))})"
               for key in section if key not in TLS_KEYS]
    files = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        value = section.get(key)
        if value is None:
            if key != "client_ca_file":
                errors.append(f"{where}: {key} is missing")
            continue
        files[key] = os.path.join(base, str(value))
        if not os.path.isfile(files[key]):
            errors.append(f"{where}: {key} {files[key]}: no such file")
            continue
        untrusted = trust.problem(files[key], f"tls_server_config {key}", secret=key == "key_file")
        if untrusted:
            errors.append(untrusted)
    auth = section.get("client_auth_type", "RequireAndVerifyClientCert" if "client_ca_file" in files
                       else "NoClientCert")
    if auth not in CLIENT_AUTH:
        errors.append(f"{where}: client_auth_type {auth!r}: one of {', '.join(CLIENT_AUTH)}")
    elif auth != "NoClientCert" and "client_ca_file" not in files:
        errors.append(f"{where}: client_auth_type {auth} needs client_ca_file")
    versions = {}
    for key in ("min_version", "max_version"):
        if key in section:
            if section[key] not in TLS_VERSIONS:
                errors.append(f"{where}: {key} {section[key]!r}: one of {', '.join(TLS_VERSIONS)}")
            else:
                versions[key] = TLS_VERSIONS[section[key]]
    if errors:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = versions.get("min_version", ssl.TLSVersion.TLSv1_2)
    if "max_version" in versions:
        context.maximum_version = versions["max_version"]
    try:
        context.load_cert_chain(files["cert_file"], files["key_file"])
    except (ssl.SSLError, OSError) as err:
        errors.append(f"{where}: cert_file and key_file do not make a certificate and its key: {err}")
        return None
    if "client_ca_file" in files:
        try:
            context.load_verify_locations(cafile=files["client_ca_file"])
        except (ssl.SSLError, OSError) as err:
            errors.append(f"{where}: client_ca_file: {err}")
            return None
    context.verify_mode = CLIENT_AUTH[auth]
    return context


def _users(section, where, errors):
    where = f"{where}: basic_auth_users"
    if not isinstance(section, dict) or not section:
        errors.append(f"{where}: expected a mapping of user names to bcrypt hashes")
        return {}
    try:
        import bcrypt
    except ImportError:
        errors.append(f"{where}: checking passwords needs bcrypt (Debian: apt install python3-bcrypt)")
        return {}
    users = {}
    for user, hashed in section.items():
        hashed = str(hashed).encode()
        try:
            bcrypt.checkpw(b"", hashed)   # raises on anything that is not a bcrypt hash
        except ValueError:
            errors.append(f"{where}: {user}: not a bcrypt hash (make one with `htpasswd -nBC 12 {user}`)")
            continue
        if ":" in str(user):
            errors.append(f"{where}: {user!r}: a user name cannot hold ':'")
            continue
        users[str(user)] = hashed
    return users


class BasicAuth:
    """WSGI middleware: the app only for a request with a right user and
    password. Verified credentials are remembered (by their SHA-256), so that
    a scrape every few seconds does not pay bcrypt's cost each time."""

    def __init__(self, app, users):
        import bcrypt

        self.app = app
        self.users = users
        # Checked for unknown users, so that a wrong user name costs as long as a wrong password.
        cost = int(next(iter(users.values()))[4:6]) if users else 4
        self._dummy = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(cost))
        self._verified = set()
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        if self.allowed(environ.get("HTTP_AUTHORIZATION", "")):
            return self.app(environ, start_response)
        start_response("401 Unauthorized", [("WWW-Authenticate", f'Basic realm="{REALM}"'),
                                            ("Content-Type", "text/plain; charset=utf-8")])
        return [b"Unauthorized\n"]

    def allowed(self, header):
        import bcrypt

        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not token:
            return False
        try:
            user, colon, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not colon:
            return False
        digest = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        with self._lock:
            if any(hmac.compare_digest(digest, known) for known in self._verified):
                return True
        hashed = self.users.get(user)
        ok = bcrypt.checkpw(password.encode(), hashed or self._dummy) and hashed is not None
        if ok:
            with self._lock:
                if len(self._verified) >= _CACHE_MAX:
                    self._verified.clear()
                self._verified.add(digest)
        return ok
