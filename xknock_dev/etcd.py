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
    def __init__(self, name, address, client_port, peer_port, host=None):
        self.name = name
        self.address = address
        self.client_port = client_port
        self.peer_port = peer_port
        self.host = host          # a lab.Host to run in, or None: this namespace
        self.process = None

    @property
    def client_url(self):
        return f"http://{self.address}:{self.client_port}"

    @property
    def peer_url(self):
        return f"http://{self.address}:{self.peer_port}"

    def command(self, argv):
        return self.host.command(argv) if self.host else list(argv)


class EtcdCluster:
    def __init__(self, directory, members):
        self.directory = str(directory)
        self.members = members
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        self.token = f"xk-{os.getpid()}-{id(self):x}"

    @classmethod
    def loopback(cls, directory, size=3):
        return cls(directory, [Member(f"m{i}", "127.0.0.1", free_port(), free_port()) for i in range(size)])

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
        log = open(os.path.join(self.directory, f"etcd-{member.name}.log"), "ab")
        member.process = subprocess.Popen(member.command(argv), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
        log.close()

    def ctl(self, *args, timeout=10):
        """etcdctl ARGS against the cluster, from the first member's namespace."""
        first = self.members[0]
        argv = first.command([ETCDCTL, f"--endpoints={','.join(self.endpoints)}", "--command-timeout=3s", *args])
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
