"""xknock nodes sharing grants, SPA replay digests and bans through etcd (docs/cluster.md)."""
