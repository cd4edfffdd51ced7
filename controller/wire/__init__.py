"""Formats shared on the wire and on disk: fwknop's SPA message and its key files (pure)."""
