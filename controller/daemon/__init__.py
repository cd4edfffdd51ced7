"""The running controller: attach and detach, the foreground loop, events, hooks, systemd notify, metrics."""
