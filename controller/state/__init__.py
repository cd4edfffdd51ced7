"""The live state of a running filter: grants, bans, sessions an attach would cut, status."""
