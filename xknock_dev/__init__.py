"""Development tools, never shipped: the namespace lab, the traffic generator, the test-run harness, packet builders, e2e helpers and the demo. Used by tests/, bench/ and `./run demo`."""
