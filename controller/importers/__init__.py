"""Migrations: knockd.conf and fwknop's access.conf to xknock's TOML."""
