"""`xknock knock`: the client, sending a knock sequence."""

import os
import time

import click

from xknock.cli.common import echo_result, fail_cleanly, json_option
from xknock.cli.params import CONFIG_FILE, DURATION, PORT, SECONDS_OR_DURATION, SEQUENCE, STEP
from xknock.controller.config import DEFAULT_PATH, format_duration, load_config
from xknock.controller.errors import XknockError


@click.command(epilog="""\b
Examples:
  xknock knock 10.0.0.1 tcp:7000 udp:8000 tcp:9000
  xknock knock server.example --sequence ssh -c /etc/xknock/xknock.toml --delay 0.2
  xknock knock 10.0.0.1 tcp:7000 udp:8000 tcp:9000 --repeat 3   # under a flood
  xknock knock 10.0.0.1 --sequence ssh --secret-file ~/.xknock/ssh.totp --protos tcp,udp,tcp   # time-based""")
@click.argument("host")
@click.argument("steps", nargs=-1, type=STEP)
@click.option("--sequence", "sequence_name", type=SEQUENCE, help="Knock this sequence of the config instead of STEPS.")
@click.option("-c", "--config", "config_path", type=CONFIG_FILE, default=DEFAULT_PATH, show_default=True)
@click.option("--secret-file", type=click.Path(readable=False), default=None,
              help="A time-based sequence without a config: its secret (base32, chmod 600); with --protos, "
                   "and --window and --port-range if the server's differ from the defaults.")
@click.option("--protos", default=None, metavar="P,P,...", help="With --secret-file: the knocks' protocols.")
@click.option("--window", "window_ns", type=DURATION, default=None, help="With --secret-file (default 60s).")
@click.option("--port-range", default=None, metavar="LOW-HIGH", help="With --secret-file (default 10000-29999).")
@click.option("--delay", "delay_ns", type=SECONDS_OR_DURATION, default="100ms", show_default=True,
              help="Time between knocks (200ms; a bare number is seconds).")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="Send every knock this many times (xknock ignores the copies); 3 where packets get lost, "
                   "e.g. under a flood.")
@click.option("--until-open", "until_open", type=PORT, default=None,
              help="Knock again until this guarded port accepts a connection (lossy networks).")
@click.option("--deadline", "deadline_ns", type=SECONDS_OR_DURATION, default="30s", show_default=True,
              help="With --until-open: give up after this long (a bare number is seconds).")
@click.option("-4", "ipv4", is_flag=True, help="IPv4 only.")
@click.option("-6", "ipv6", is_flag=True, help="IPv6 only.")
@json_option
@fail_cleanly
def knock(host, steps, sequence_name, config_path, secret_file, protos, window_ns, port_range, delay_ns, repeat,
          until_open, deadline_ns, ipv4, ipv6, as_json):
    """Send a knock sequence to HOST (the client; ICMP knocks use a raw socket as root, else a ping socket)."""
    import socket

    from xknock.controller.client.knockclient import knock_until_open, send_knocks

    window = format_duration(window_ns) if window_ns is not None else None
    delay, deadline = delay_ns / 1e9, deadline_ns / 1e9
    steps_now = None   # a time-based sequence: its knocks change with the window
    if sequence_name:
        if steps:
            raise click.UsageError("give STEPS or --sequence, not both")
        if secret_file:
            from xknock.controller.config.totp_config import client_sequence

            if not protos:
                raise click.UsageError("--secret-file needs --protos (e.g. tcp,udp,tcp: as the server's knock)")
            found = [client_sequence(sequence_name, os.path.abspath(os.path.expanduser(secret_file)), protos,
                                     window, port_range)]
        else:
            if protos or window or port_range:
                raise click.UsageError("--protos, --window and --port-range go with --secret-file; with -c the "
                                       "config's sequence says them")
            config = load_config(config_path)
            found = [s for s in config.sequences if s.name == sequence_name]
            if not found:
                raise XknockError(f"{config_path}: no sequence named {sequence_name!r}")
        steps = found[0].knock
        if found[0].totp is not None:   # this window's ports, from the shared secret and the clock
            from xknock.controller.policy import totp

            def steps_now(sequence=found[0]):   # noqa: F811 (the time-based case of steps_now)
                return totp.variant(sequence, totp.window_of(time.time_ns(), sequence.totp.window_ns)).knock

            steps = steps_now()
    elif secret_file or protos or window or port_range:
        raise click.UsageError("--secret-file, --protos, --window and --port-range go with --sequence NAME")
    if not steps:
        raise click.UsageError("give the knock STEPS (e.g. tcp:7000 udp:8000) or --sequence NAME")
    if repeat < 1:
        raise click.BadParameter("must be >= 1", param_hint="--repeat")
    family = socket.AF_INET if ipv4 else socket.AF_INET6 if ipv6 else None
    if until_open is None:
        send_knocks(host, list(steps), delay=delay, family=family, repeat=repeat)
        echo_result(as_json, {"host": host, "knocked": [str(s) for s in steps]},
                    f"knocked {host}: {' '.join(str(s) for s in steps)}")
        return
    if deadline <= 0:
        raise click.BadParameter("must be > 0", param_hint="--deadline")
    if until_open.proto != "tcp":
        raise click.BadParameter(f"{until_open}: only a tcp port can be seen to open", param_hint="--until-open")
    fixed = list(steps)
    rounds = knock_until_open(
        host, steps_now or (lambda: fixed), until_open, deadline, delay=delay, family=family,
        repeat=repeat,
        on_attempt=lambda n, knocked, outcome: outcome != "open" and click.echo(
            f"round {n}: {' '.join(map(str, knocked))}; {until_open} {outcome}, knocking again", err=True))
    echo_result(as_json, {"host": host, "knocked": [str(s) for s in (steps_now() if steps_now else fixed)],
                          "open": str(until_open), "rounds": rounds},
                f"knocked {host}: {until_open} open after {rounds} round{'s' if rounds > 1 else ''}")
