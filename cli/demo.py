"""The lab demo, `./run demo`: an attacker and a client against a server
guarded by xknock, in network namespaces built for the occasion and removed
afterwards."""

import os
import sys
import tempfile

from xknock.controller import lab

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


def say(text):
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def show(result):
    for stream in (result.stdout, result.stderr):
        if stream and stream.strip():
            print(stream.rstrip())


def verdict(ok):
    return "\033[32mconnected\033[0m" if ok else "\033[31mno answer (dropped in XDP)\033[0m"


def main():
    if os.geteuid() != 0:
        sys.exit("demo: run as root (it builds network namespaces and loads XDP programs)")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="xknock-demo-") as config, lab.lab("xkdemo") as net:
        config.write(DEMO_CONFIG)
        config.flush()
        server, client, attacker = net.server, net.client, net.attacker
        say(f"Lab: server {server.ipv4}, client {client.ipv4}, attacker {attacker.ipv4} (namespaces, one bridge)")
        print(DEMO_CONFIG)
        with lab.tcp_listen(server, 22):
            say("Before xknock: anyone reaches the server's port 22")
            print(f"attacker -> {server.ipv4}:22  {verdict(lab.can_connect(attacker, server.ipv4, 22))}")

            say(f"xknock attach {net.server_iface} --once (on the server)")
            result = server.run([XKNOCK, "attach", net.server_iface, "-c", config.name, "--once"])
            show(result)
            if result.returncode != 0:
                sys.exit("demo: attach failed")

            say("The attacker tries port 22 again")
            print(f"attacker -> {server.ipv4}:22  {verdict(lab.can_connect(attacker, server.ipv4, 22))}")

            say("The client knocks: xknock knock 10.77.0.1 tcp:7000 udp:8000 tcp:9000")
            show(client.run([XKNOCK, "knock", server.ipv4, "tcp:7000", "udp:8000", "tcp:9000"]))
            print(f"client   -> {server.ipv4}:22  {verdict(lab.can_connect(client, server.ipv4, 22))}")
            print(f"attacker -> {server.ipv4}:22  {verdict(lab.can_connect(attacker, server.ipv4, 22))}")

            say("The attacker guesses a sequence: nothing opens")
            show(attacker.run([XKNOCK, "knock", server.ipv4, "tcp:7000", "tcp:8000", "tcp:9000"]))
            print(f"attacker -> {server.ipv4}:22  {verdict(lab.can_connect(attacker, server.ipv4, 22))}")

            say("xknock status (on the server)")
            show(server.run([XKNOCK, "status"]))
        say("Done: the lab's namespaces are removed")


if __name__ == "__main__":
    main()
