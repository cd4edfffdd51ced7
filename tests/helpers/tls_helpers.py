"""Certificates for the tests of TLS: a CA and what it signs, made by openssl."""

import os
import subprocess


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory):
    """ca.crt, and server.crt/key (127.0.0.1) and client.crt/key signed by it."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=xknock test CA", "-days", "2",
            cwd=directory)
    for name, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", None)):
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
        extra = []
        if san:
            (directory / f"{name}.ext").write_text(san + "\n")
            extra = ["-extfile", f"{name}.ext"]
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", *extra, cwd=directory)
    for key in directory.glob("*.key"):
        os.chmod(key, 0o600)   # xknock refuses a TLS key others can read (kernel/trust.py)
    return directory
