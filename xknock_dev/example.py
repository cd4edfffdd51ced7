"""The example config the tests and the data-path benchmarks run against.

The knock, grant and list tests read plain verdicts: their refusals drop
(answer = "drop"). What answer = "closed" (the default) sends is tested in
test_answers.py and end to end; strict mode (also the default) stays on."""

EXAMPLE_CONFIG = """
[filter]
mode = "enforce"
answer = "drop"

[[sequence]]
name = "ssh"
knock = ["tcp:7000", "udp:8000", "tcp:9000"]
step_timeout = "5s"
open = ["tcp:22"]
open_for = "30s"
idle_timeout = "15m"

[[sequence]]
name = "web"
knock = ["udp:8000", "icmp", "tcp:7001"]
step_timeout = "5s"
open = ["tcp:443", "udp:443"]
open_for = "10s"
idle_timeout = "1m"

[allow]
sources = ["192.0.2.10", "2001:db8:a::/48"]

[deny]
sources = ["203.0.113.0/24", "2001:db8:bad::/48"]
"""
