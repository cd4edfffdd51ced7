"""The lab demo, `./run demo`: an attacker and a client against a server
guarded by xknock, in network namespaces built for the occasion and removed
afterwards."""

import json
import os
import subprocess
import sys
import tempfile
import time

from xknock.controller.wire import spa_keys
from xknock_dev import lab

XKNOCK = os.path.join(os.path.dirname(sys.executable), "xknock")

DEMO_CONFIG = """\
[filter]
mode = "enforce"

[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
step_timeout = "5s"
open = ["tcp:22"]
open_for = "30s"
idle_timeout = "15m"
"""

# Single packet authorization: one encrypted, authenticated UDP packet opens
# port 2222 (fwknop's format; the keys are made for the demo).
SPA_CONFIG = """
[spa]
port = 62201
replay_cache = "{cache}"

[[spa.user]]
name = "client"
key_file = "{keys}"
open = ["tcp:2222"]
open_for = "30s"
"""


def say(text):
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def show(result):
    for stream in (result.stdout, result.stderr):
        if stream and stream.strip():
            print(stream.rstrip())


def verdict(outcome):
    """What a connection attempt saw: open, or refused as an unused port refuses."""
    if outcome == "open":
        return "\033[32mconnected\033[0m"
    if outcome == "refused":
        return "\033[31mrefused, like an unused port (a reset forged in XDP)\033[0m"
    return f"\033[31m{outcome}\033[0m"


def probe(host_from, addr, port):
    return verdict(lab.connect_outcome(host_from, addr, port))


def main():
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it builds network namespaces and loads XDP programs)")
    with tempfile.TemporaryDirectory(prefix="xknock-demo-") as work, lab.lab("xkdemo") as net:
        keys = os.path.join(work, "client.keys")
        spa_keys.write_key_file(keys, spa_keys.generate())
        config = os.path.join(work, "xknock.toml")
        with open(os.open(config, os.O_WRONLY | os.O_CREAT, 0o600), "w") as config_file:
            config_file.write(DEMO_CONFIG + SPA_CONFIG.format(cache=os.path.join(work, "spa-replay"), keys=keys))
        _run(net, config, keys)
        say("Done: the lab's namespaces are removed")


def _run(net, config, keys):
    """The acts of the demo, in the lab."""
    server, client, attacker = net.server, net.client, net.attacker
    say(f"Lab: server {server.ipv4}, client {client.ipv4}, attacker {attacker.ipv4} (namespaces, one bridge)")
    print(DEMO_CONFIG)
    with lab.tcp_listen(server, 22), lab.tcp_listen(server, 2222):
        say("Before xknock: anyone reaches the server's port 22")
        print(f"attacker -> {server.ipv4}:22  {probe(attacker, server.ipv4, 22)}")

        say(f"xknock attach {net.server_iface} --once (on the server)")
        result = server.run([XKNOCK, "attach", net.server_iface, "-c", config, "--once"])
        show(result)
        if result.returncode != 0:
            sys.exit("demo: attach failed")

        say("The attacker tries port 22 again")
        print(f"attacker -> {server.ipv4}:22  {probe(attacker, server.ipv4, 22)}")

        say("The attacker scans: the guarded port 22 and the knock port 7000 read like their unused neighbours")
        scan = attacker.run(["nmap", "-n", "-Pn", "-sS", "-p", "20-24,6999-7001,8999-9001", server.ipv4])
        print("\n".join(line for line in scan.stdout.splitlines() if "/tcp" in line or "PORT" in line)
              or scan.stderr.strip())

        say("The client knocks: xknock knock 10.77.0.1 tcp:7000 udp:8000 tcp:9000")
        show(client.run([XKNOCK, "knock", server.ipv4, "tcp:7000", "udp:8000", "tcp:9000"]))
        print(f"client   -> {server.ipv4}:22  {probe(client, server.ipv4, 22)}")
        print(f"attacker -> {server.ipv4}:22  {probe(attacker, server.ipv4, 22)}")

        say("The attacker guesses a sequence: nothing opens")
        show(attacker.run([XKNOCK, "knock", server.ipv4, "tcp:7000", "tcp:8000", "tcp:9000"]))
        print(f"attacker -> {server.ipv4}:22  {probe(attacker, server.ipv4, 22)}")

        say("But a sniffed static knock works for anyone: the attacker replays the client's")
        show(attacker.run([XKNOCK, "knock", server.ipv4, "tcp:7000", "udp:8000", "tcp:9000"]))
        print(f"attacker -> {server.ipv4}:22  {probe(attacker, server.ipv4, 22)}")

        say("SPA instead: the controller runs (xknock attach, foreground) and verifies packets")
        print(SPA_CONFIG.format(cache="...", keys=keys))
        before = _prog_id(server)
        controller = server.popen([XKNOCK, "attach", net.server_iface, "-c", config],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The controller replaces the program (keeping every map and grant) and then listens.
        lab.wait_for(lambda: _prog_id(server) not in (before, None), timeout=30)
        time.sleep(0.5)
        print(f"attacker -> {server.ipv4}:2222  {probe(attacker, server.ipv4, 2222)}")
        say("The attacker sends SPA packets with keys of its own: nothing opens")
        wrong = os.path.join(os.path.dirname(keys), "attacker.keys")
        spa_keys.write_key_file(wrong, spa_keys.generate())
        show(attacker.run([XKNOCK, "spa", server.ipv4, "-A", "tcp/2222", "--key-file", wrong]))
        print(f"attacker -> {server.ipv4}:2222  {probe(attacker, server.ipv4, 2222)}")
        say("The client sends one SPA packet: xknock spa 10.77.0.1 -A tcp/2222 --key-file client.keys")
        show(client.run([XKNOCK, "spa", server.ipv4, "-A", "tcp/2222", "--key-file", keys]))
        lab.wait_for(lambda: lab.can_connect(client, server.ipv4, 2222, timeout=0.5), timeout=3)
        print(f"client   -> {server.ipv4}:2222  {probe(client, server.ipv4, 2222)}")
        print(f"attacker -> {server.ipv4}:2222  {probe(attacker, server.ipv4, 2222)}")

        say("xknock status (on the server)")
        show(server.run([XKNOCK, "status"]))
        lab.stop_process(controller)


def _prog_id(server):
    result = server.run([XKNOCK, "status", "--json"])
    try:
        return json.loads(result.stdout)["filters"][0]["interfaces"][0]["prog_id"]
    except (ValueError, KeyError, IndexError):
        return None


if __name__ == "__main__":
    main()
