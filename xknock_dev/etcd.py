"""A real etcd cluster for tests: three members (Debian's etcd-server), on
loopback ports of this namespace or one member in each of a lab's server
namespaces, killed in `finally` whatever failed.

    with EtcdCluster.loopback(tmp_path) as etcd:       # 127.0.0.1, free ports
        etcd.endpoints                                  # ["http://127.0.0.1:PORT", ...]
        etcd.sigkill(); etcd.start()                    # an outage, then back with its data

Readiness is polled (`etcdctl endpoint health`), never slept for.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess

from xknock_dev.lab import stop_process, wait_for

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Member:
    def __init__(self, name, address, client_port, peer_port, host=None, scheme="http"):
        self.scheme = scheme      # of the client URL: "https" with EtcdCluster(tls=...)
        self.name = name
        self.address = address
        self.client_port = client_port
        self.peer_port = peer_port
        self.host = host          # a lab.Host to run in, or None: this namespace
        self.process = None

    @property
    def client_url(self):
        return f"{self.scheme}://{self.address}:{self.client_port}"

    @property
    def peer_url(self):
        return f"http://{self.address}:{self.peer_port}"

    def command(self, argv):
        return self.host.command(argv) if self.host else list(argv)


class EtcdCluster:
    def __init__(self, directory, members, tls=None):
        """tls: {"ca": path, "cert": path, "key": path} of the server, whose
        clients must then show a certificate of that CA (client-cert-auth)."""
        self.directory = str(directory)
        self.members = members
        self.tls = tls
        for member in members:
            member.scheme = "https" if tls else "http"
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        self.token = f"xk-{os.getpid()}-{id(self):x}"

    @classmethod
    def loopback(cls, directory, size=3, tls=None):
        return cls(directory, [Member(f"m{i}", "127.0.0.1", free_port(), free_port()) for i in range(size)], tls)

    @classmethod
    def on_hosts(cls, directory, hosts, client_port=2379, peer_port=2380):
        """One member per lab host, on its lab address (and its loopback)."""
        return cls(directory, [Member(f"m{i}", host.ipv4, client_port, peer_port, host)
                               for i, host in enumerate(hosts)])

    @property
    def endpoints(self):
        return [m.client_url for m in self.members]

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout=30.0):
        """Start every member not running (again, with its data) and wait until healthy."""
        for member in self.members:
            if member.process is None or member.process.poll() is not None:
                self._start(member)
        if not wait_for(self.healthy, timeout, interval=0.2):
            raise RuntimeError(f"etcd cluster not healthy after {timeout}s:\n{self.logs()}")

    def _start(self, member):
        data = os.path.join(self.directory, f"etcd-{member.name}")
        listen_clients = member.client_url if member.address == "127.0.0.1" else \
            f"{member.client_url},http://127.0.0.1:{member.client_port}"
        argv = [ETCD, "--name", member.name, "--data-dir", data,
                "--listen-client-urls", listen_clients, "--advertise-client-urls", member.client_url,
                "--listen-peer-urls", member.peer_url, "--initial-advertise-peer-urls", member.peer_url,
                "--initial-cluster", self.initial, "--initial-cluster-token", self.token,
                "--initial-cluster-state", "new", "--log-level", "warn",
                "--heartbeat-interval", "100", "--election-timeout", "1000"]
        if self.tls:
            argv += ["--cert-file", self.tls["cert"], "--key-file", self.tls["key"],
                     "--trusted-ca-file", self.tls["ca"], "--client-cert-auth"]
        log = open(os.path.join(self.directory, f"etcd-{member.name}.log"), "ab")
        member.process = subprocess.Popen(member.command(argv), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
        log.close()

    def ctl(self, *args, timeout=10):
        """etcdctl ARGS against the cluster, from the first member's namespace."""
        first = self.members[0]
        tls = [f"--cacert={self.tls['ca']}", f"--cert={self.tls['cert']}", f"--key={self.tls['key']}"] \
            if self.tls else []
        argv = first.command([ETCDCTL, f"--endpoints={','.join(self.endpoints)}", "--command-timeout=3s", *tls,
                              *args])
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "ETCDCTL_API": "3"})

    def healthy(self):
        result = self.ctl("endpoint", "health", "-w", "json")
        if result.returncode != 0:
            return False
        try:
            return all(entry.get("health") for entry in json.loads(result.stdout))
        except ValueError:
            return False

    def get_prefix(self, prefix):
        """{key: value} under prefix, as text."""
        result = self.ctl("get", "--prefix", prefix, "-w", "json")
        assert result.returncode == 0, result.stderr
        import base64

        kvs = json.loads(result.stdout).get("kvs", [])
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode() for kv in kvs}

    def sigkill(self):
        """Every member killed at once, as a power cut would."""
        for member in self.members:
            if member.process and member.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    member.process.send_signal(signal.SIGKILL)
                member.process.wait(10)

    def stop(self):
        for member in self.members:
            if member.process is not None:
                stop_process(member.process)

    def logs(self):
        text = []
        for member in self.members:
            with contextlib.suppress(OSError):
                with open(os.path.join(self.directory, f"etcd-{member.name}.log"), errors="replace") as f:
                    text.append(f"--- {member.name}\n" + f.read()[-2000:])
        return "\n".join(text)


def make_tls(directory, name="xknock-test"):
    """A CA, and a certificate for 127.0.0.1 it signed (server and client use
    alike): {"ca", "cert", "key"} paths, PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {kind: os.path.join(str(directory), f"{name}-{kind}.pem") for kind in ("ca", "cert", "key")}
    for kind, data in (("ca", ca.public_bytes(serialization.Encoding.PEM)),
                       ("cert", cert.public_bytes(serialization.Encoding.PEM)),
                       ("key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))):
        with open(os.open(paths[kind], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
    return paths
