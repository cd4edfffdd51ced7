"""The [cluster] table (docs/cluster.md): the etcd cluster xknock nodes share
grants, SPA replay digests and bans through, validated like the rest of the
config: every mistake found in one pass, named by its place.

Only the shape is checked here (endpoints are URLs, the files exist, the
prefix is a key prefix); whether etcd answers is the cluster package's
business at run time: a node decides every packet alone whatever etcd does.
"""

import dataclasses
import os
import re
import socket
import urllib.parse

from .fields import check_keys, parse_duration_key, type_name
from .model import NAME_PATTERN, NS_PER_UNIT

CLUSTER_KEYS = ("endpoints", "ca_file", "cert_file", "key_file", "user", "password_file", "prefix", "node",
                "share_bans", "spa_unreachable", "timeout", "hooks")
SPA_UNREACHABLE = ("refuse", "local")
HOOKS = ("every_node", "origin")
DEFAULT_PREFIX = "/xknock/"
DEFAULT_TIMEOUT_NS = 2 * NS_PER_UNIT["s"]
MAX_TIMEOUT_NS = 30 * NS_PER_UNIT["s"]
MAX_ENDPOINTS = 16
PREFIX_PATTERN = re.compile(r"/[A-Za-z0-9_./-]*/")


@dataclasses.dataclass(frozen=True)
class Cluster:
    endpoints: tuple          # ((scheme, host, port), ...)
    node: str                 # this node's name, unique in the cluster
    prefix: str = DEFAULT_PREFIX
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    user: str | None = None
    password_file: str | None = dataclasses.field(default=None, repr=False)
    share_bans: bool = False
    # What SPA does while etcd cannot be asked whether a digest is new:
    # "refuse" (the default) accepts nothing, "local" trusts this node's cache.
    spa_unreachable: str = "refuse"
    timeout_ns: int = DEFAULT_TIMEOUT_NS
    # Where on_open / on_close run for a grant made on one node: "every_node"
    # (the default: where it is written, as a hook that opens something per
    # node needs) or "origin" (the node that made it, as a notice wants).
    hooks: str = "every_node"

    def needs_restart(self, other):
        """What of other (a reload's [cluster]) a running node cannot take:
        the keys that differ, hooks aside (the controller's, applied by a reload)."""
        return [field.name for field in dataclasses.fields(self)
                if field.name != "hooks" and getattr(self, field.name) != getattr(other, field.name)]

    @property
    def tls(self):
        return self.ca_file is not None


def reload_refusal(running, loaded):
    """Why a reload cannot take loaded's [cluster] (one line), or None. The
    cluster's thread keeps the connection, prefix and node it started with:
    a node moving to another prefix or etcd mid-run would leave what it
    received from the old one and miss what was made meanwhile."""
    if running is None and loaded is None:
        return None
    if running is None or loaded is None:
        what = "[cluster] added" if running is None else "[cluster] removed"
    else:
        changed = running.needs_restart(loaded)
        if not changed:
            return None
        what = f"[cluster] changed ({', '.join(name.removesuffix('_ns') for name in changed)})"
    return (f"{what}: the controller applies [cluster] when it starts; restart it (systemctl restart "
            "xknock@IFACE: the filter stays attached and enforcing)")


def parse_cluster(report, table, has_ban=True):
    """Cluster, or None when the table is wrong (reported). has_ban: the
    config has [ban] (share_bans needs it: without it the data path checks no ban)."""
    if not isinstance(table, dict):
        report.error("cluster", f"must be a table ([cluster]), not {type_name(table)}")
        return None
    before = len(report.errors)
    check_keys(report, "cluster", table, CLUSTER_KEYS)
    endpoints = _endpoints(report, table.get("endpoints"))
    files = {key: _file(report, table, key) for key in ("ca_file", "cert_file", "key_file", "password_file")}
    if ("cert_file" in table) != ("key_file" in table):
        report.error("cluster", "cert_file and key_file go together (the client certificate and its key)")
    schemes = {scheme for scheme, _, _ in endpoints}
    if "ca_file" in table and "http" in schemes:
        report.error("cluster", "ca_file is set but an endpoint is http://: write https:// for TLS")
    if "https" in schemes and "ca_file" not in table:
        report.error("cluster", "an https:// endpoint needs ca_file (the CA that signed etcd's certificates)")
    if "cert_file" in table and "ca_file" not in table:
        report.error("cluster", "cert_file needs ca_file and https:// endpoints")
    user = _string(report, table, "user")
    if (user is None) != ("password_file" not in table):
        report.error("cluster", "user and password_file go together")
    if files["password_file"] and _readable_by_others(files["password_file"]):
        report.error("cluster", f"password_file {files['password_file']}: readable by group or others; "
                                f"chmod 600 {files['password_file']}")
    prefix = _string(report, table, "prefix") or DEFAULT_PREFIX
    if not PREFIX_PATTERN.fullmatch(prefix) or "//" in prefix:
        report.error("cluster", f'prefix "{prefix}": must start and end with "/" (e.g. "/xknock/prod/"), '
                                "letters, digits and _ . - / only")
    node = _string(report, table, "node")
    if node is None:
        node = socket.gethostname().split(".")[0]
    if not NAME_PATTERN.fullmatch(node) or len(node) > 63:
        report.error("cluster", f'node "{node}": a name of letters, digits and _ . - (at most 63), unique '
                                "in the cluster")
    share_bans = table.get("share_bans", False)
    if not isinstance(share_bans, bool):
        report.error("cluster", f"share_bans must be true or false, not {type_name(share_bans)}")
    elif share_bans and not has_ban:
        report.error("cluster", "share_bans = true needs a [ban] table: without one this node checks no ban")
    spa_unreachable = table.get("spa_unreachable", "refuse")
    if spa_unreachable not in SPA_UNREACHABLE:
        report.error("cluster", f'spa_unreachable {spa_unreachable!r}: must be "refuse" (accept no SPA packet '
                                'while etcd is away) or "local" (trust this node\'s replay cache alone)')
    hooks = table.get("hooks", "every_node")
    if hooks not in HOOKS:
        report.error("cluster", f'hooks {hooks!r}: must be "every_node" (on_open / on_close run on every node a '
                                'grant is written on) or "origin" (only on the node that made it)')
    timeout_ns = parse_duration_key(report, "cluster", table, "timeout", DEFAULT_TIMEOUT_NS)
    if timeout_ns > MAX_TIMEOUT_NS:
        report.error("cluster", "timeout: at most 30s (the controller waits this long for etcd at most)")
    if len(report.errors) > before:
        return None
    return Cluster(endpoints=endpoints, node=node, prefix=prefix, user=user, share_bans=share_bans,
                   spa_unreachable=spa_unreachable, timeout_ns=timeout_ns, hooks=hooks, **files)


def _endpoints(report, value):
    if value is None:
        report.error("cluster", 'endpoints missing: e.g. endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]')
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        report.error("cluster", "endpoints must be a non-empty array of URLs such as \"https://10.0.0.1:2379\"")
        return ()
    if len(value) > MAX_ENDPOINTS:
        report.error("cluster", f"endpoints: at most {MAX_ENDPOINTS}")
    found = []
    for index, text in enumerate(value):
        try:
            url = urllib.parse.urlsplit(text)
            port = url.port
        except ValueError:
            url, port = None, None
        if url is None or url.scheme not in ("http", "https") or not url.hostname or port is None \
                or url.path not in ("", "/") or url.query or url.username:
            report.error("cluster", f'endpoints[{index}] "{text}": write http://HOST:PORT or https://HOST:PORT')
            continue
        found.append((url.scheme, url.hostname, port))
    if len(set(found)) != len(found):
        report.error("cluster", "endpoints: one is named twice")
    return tuple(found)


def _string(report, table, key):
    value = table.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        report.error("cluster", f"{key} must be a non-empty string, not {type_name(value)}")
        return None
    return value


def _file(report, table, key):
    path = _string(report, table, key)
    if path is None:
        return None
    if not os.path.isabs(path):
        report.error("cluster", f"{key} {path!r}: must be an absolute path")
        return None
    if not os.path.isfile(path):
        report.error("cluster", f"{key} {path}: no such file")
        return None
    return path


def _readable_by_others(path):
    try:
        return bool(os.stat(path).st_mode & 0o044)
    except OSError:
        return False
