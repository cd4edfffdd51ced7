"""The real fwknop client and server as test oracles.

fwknop_packet(): a packet built by /usr/bin/fwknop --test (nothing is sent),
with the field values it prints. fwknopd_verdicts(): which of a list of
packets the real fwknopd accepts, judged from a pcap file (fwknopd --pcap-file
--test: no interface, no namespace, no firewall change).

`python tests/helpers/fwknop_helpers.py` rewrites tests/data/fwknop/vectors.json
(test keys only) with fresh packets from the installed client.
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from repo_paths import DATA

FWKNOP = "/usr/bin/fwknop"
FWKNOPD = "/usr/sbin/fwknopd"
VECTORS = os.path.join(DATA, "fwknop", "vectors.json")

# fwknop's -v dump: "   Random Value: 1811059254102183"
FIELD_NAMES = {
    "Random Value": "rand", "Username": "username", "Timestamp": "timestamp", "FKO Version": "version",
    "Message Type": "message_type", "Message String": "message", "Nat Access": "nat_access",
    "Server Auth": "server_auth", "Client Timeout": "client_timeout", "Digest Type": "digest_type",
    "HMAC Type": "hmac_type", "Encoded Data": "encoded", "SPA Data Digest": "digest",
}


def have_fwknop():
    return os.access(FWKNOP, os.X_OK)


def have_fwknopd():
    return os.access(FWKNOPD, os.X_OK)


def fwknop_packet(key_b64, hmac_key_b64, *, access="tcp/22", allow_ip="198.51.100.7", digest="sha256",
                  hmac_digest="sha256", user="alice", client_timeout=None, nat=None, source_ip=False):
    """Run the real client in test mode -> (payload bytes, {field: value})."""
    with tempfile.TemporaryDirectory(prefix="xknock-fwknop-") as home:
        saved = os.path.join(home, "packet")
        argv = [FWKNOP, "-A", access, "-D", "127.0.0.1", "--use-hmac", "--key-base64-rijndael", key_b64,
                "--key-base64-hmac", hmac_key_b64, "-m", digest, "--hmac-digest-type", hmac_digest,
                "-U", user, "--test", "--no-save-args", "--no-rc-file", "-B", saved, "-v"]
        argv += ["-s"] if source_ip else ["-a", allow_ip]
        if client_timeout:
            argv += ["-f", str(client_timeout)]
        if nat:
            argv += ["-N", nat]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                env={"HOME": home, "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, f"fwknop failed: {result.stderr}{result.stdout}"
        with open(saved, "rb") as f:
            payload = f.read().strip()
    fields = {}
    for line in result.stdout.split("Generating SPA packet")[0].splitlines():
        name, colon, value = line.strip().partition(": ")
        if colon and name in FIELD_NAMES:
            fields[FIELD_NAMES[name]] = value
    return payload, fields


def write_pcap(path, packets):
    """packets: [(source IPv4, payload)] -> a pcap of UDP datagrams to 62201."""
    from scapy.all import IP, UDP, Ether, wrpcap

    wrpcap(path, [Ether() / IP(src=src, dst="192.0.2.1") / UDP(sport=40000 + i, dport=62201) / payload
                  for i, (src, payload) in enumerate(packets)])


def fwknopd_verdicts(stanzas, packets):
    """Let the real fwknopd judge packets. stanzas: access.conf text;
    packets: [(unique source IPv4, payload)]. Returns (accepted sources, log)."""
    with tempfile.TemporaryDirectory(prefix="xknock-fwknopd-") as work:
        conf = os.path.join(work, "fwknopd.conf")
        access = os.path.join(work, "access.conf")
        # Packet aging is off by default with --pcap-file: turn it on.
        settings = "PCAP_FILTER udp port 62201;\nENABLE_SPA_PACKET_AGING Y;\nMAX_SPA_PACKET_AGE 120;\n"
        for path, text in ((conf, settings), (access, stanzas)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(text)
        pcap = os.path.join(work, "packets.pcap")
        write_pcap(pcap, packets)
        # -C: exit after this many packets (at the end of a pcap file fwknopd
        # would otherwise wait for more).
        process = subprocess.Popen(
            [FWKNOPD, "-c", conf, "-a", access, "-d", os.path.join(work, "digest.cache"),
             "-p", os.path.join(work, "fwknopd.pid"), "-r", os.path.join(work, "run"),
             "--pcap-file", pcap, "--foreground", "--test", "-v", "-v", "-C", str(len(packets))],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            log, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            log, _ = process.communicate()
            log += "\n[test] fwknopd did not exit by itself: killed after 60 s"
    accepted = set(re.findall(r"\[([\d.]+)\] \(stanza #\d+\) --test mode enabled, skipping firewall", log))
    return accepted, log


def access_stanza(key_b64, hmac_key_b64, hmac_digest="sha256", open_ports="tcp/22, udp/53", extra=""):
    return (f"SOURCE ANY\nKEY_BASE64 {key_b64}\nHMAC_KEY_BASE64 {hmac_key_b64}\n"
            f"HMAC_DIGEST_TYPE {hmac_digest}\nOPEN_PORTS {open_ports}\nFW_ACCESS_TIMEOUT 30\n"
            f"MAX_FW_TIMEOUT 300\n{extra}")


def fresh_keys(hmac_bytes=64):
    return (base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(hmac_bytes)).decode())


CASES = [
    {"name": "defaults"},
    {"name": "md5 digest, md5 hmac", "digest": "md5", "hmac_digest": "md5", "hmac_bytes": 16},
    {"name": "sha1, sha1", "digest": "sha1", "hmac_digest": "sha1", "hmac_bytes": 20},
    {"name": "sha384, sha384", "digest": "sha384", "hmac_digest": "sha384", "hmac_bytes": 128},
    {"name": "sha512, sha512", "digest": "sha512", "hmac_digest": "sha512", "hmac_bytes": 128},
    {"name": "sha3_256, sha3_256", "digest": "sha3_256", "hmac_digest": "sha3_256"},
    {"name": "sha3_512, sha3_512", "digest": "sha3_512", "hmac_digest": "sha3_512"},
    {"name": "several ports, client timeout", "access": "tcp/22,udp/53,tcp/443", "client_timeout": 600},
    {"name": "source ip (-s), other user", "source_ip": True, "user": "bob.smith"},
    {"name": "nat access with timeout", "nat": "192.168.1.2,22", "client_timeout": 120},
]


def generate_vectors():
    vectors = []
    for case in CASES:
        case = dict(case)
        name = case.pop("name")
        key, hmac_key = fresh_keys(case.pop("hmac_bytes", 64))
        payload, fields = fwknop_packet(key, hmac_key, **case)
        vectors.append({"name": name, "key_base64": key, "hmac_key_base64": hmac_key, "args": case,
                        "packet": payload.decode(), "fields": fields})
    return vectors


if __name__ == "__main__":
    if not have_fwknop() or not shutil.which("fwknop"):
        sys.exit("fwknop is not installed")
    os.makedirs(os.path.dirname(VECTORS), exist_ok=True)
    with open(VECTORS, "w") as out:
        version = subprocess.run([FWKNOP, "--version"], capture_output=True, text=True).stdout.strip()
        json.dump({"comment": f"Packets built by the real fwknop client ({version})"
                              " with these TEST keys (never used anywhere else); regenerate with "
                              "`python tests/helpers/fwknop_helpers.py`.",
                   "vectors": generate_vectors()}, out, indent=1)
        out.write("\n")
    print(f"wrote {VECTORS}")
