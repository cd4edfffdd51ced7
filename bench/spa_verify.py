"""The controller's SPA verifier alone, in this process, both protocols side
by side: verdicts a second for junk, for packets that pass the cheap checks
and fail the expensive one, and for authentic packets (decrypted, verified,
digest fsync'd to the replay cache, judged; no map write).
`python -m bench.spa_verify [SECONDS]` prints a table."""

import base64
import ipaddress
import os
import sys
import tempfile
import time

from xknock.controller.config import parse_config
from xknock.controller.spa.spa import SpaVerifier
from xknock.controller.spa.spa_replay import ReplayCache
from xknock.controller.wire import spa_message
from xknock.controller.wire import spa_pubkey
from xknock.controller.wire import spa_pubkey_keys as keys

CONFIG = """[spa]
replay_cache = "/unused"
server_key = "%(server_key)s"
[[spa.user]]
name = "fw"
key = "%(key)s"
hmac_key = "%(hmac)s"
open = ["tcp:22"]
[[spa.user]]
name = "pk"
public_keys = ["%(public)s"]
open = ["tcp:22"]
"""


def _rate(verifier, payloads, source, seconds, once):
    """Verdicts a second; once: each payload at most once (authentic ones would be replays)."""
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds and (not once or count < len(payloads)):
        verifier.verify(payloads[count % len(payloads)], source)
        count += 1
    return count / (time.perf_counter() - started)


def verifications(seconds=1.0, authentic=500):
    source = ipaddress.ip_address("10.77.0.2")
    key, hmac_key = os.urandom(32), os.urandom(64)
    user = keys.generate(keys.USER)
    with tempfile.TemporaryDirectory(prefix="xkspa-verify-") as directory:
        server_key = os.path.join(directory, "server.key")
        server_public = keys.raw_public(keys.write_pair(server_key, keys.SERVER))
        spa = parse_config(CONFIG % {"server_key": server_key, "key": base64.b64encode(key).decode(),
                                     "hmac": base64.b64encode(hmac_key).decode(),
                                     "public": base64.b64encode(keys.raw_public(user)).decode()},
                           listening=set()).spa
        n = spa_pubkey.PACKET_BYTES - len(spa_pubkey.MAGIC)

        def forged_tag():
            # What only someone who knows the server's public key can make: the
            # tag right, the ciphertext random. It costs one X25519.
            enc = os.urandom(32)
            body = enc + spa_pubkey.tag_for(server_public, enc) + os.urandom(spa_pubkey.BODY_BYTES - 40)
            return spa_pubkey.MAGIC + base64.b64encode(body).rstrip(b"=")

        cases = {
            ("fwknop", "junk"): ([base64.b64encode(os.urandom(180)).rstrip(b"=") for _ in range(1000)], False),
            ("fwknop", "authentic"): ([spa_message.encode(key=key, hmac_key=hmac_key, access_address=str(source),
                                                          ports=[("tcp", 22)], username="bench")
                                       for _ in range(authentic)], True),
            ("public-key", "junk"): ([spa_pubkey.MAGIC + base64.b64encode(os.urandom(n * 3 // 4 + 1))[:n]
                                      for _ in range(1000)], False),
            ("public-key", "forged tag"): ([forged_tag() for _ in range(1000)], False),
            ("public-key", "authentic"): ([spa_pubkey.seal_packet(server_public, user, [("tcp", 22)],
                                                                  ipv4=source)[0] for _ in range(authentic)], True),
        }
        out = {}
        with ReplayCache(os.path.join(directory, "replay")) as cache:
            verifier = SpaVerifier(spa, cache)
            for (protocol, kind), (payloads, once) in cases.items():
                out[(protocol, kind)] = _rate(verifier, payloads, source, seconds, once)
    return out


def markdown(rates):
    lines = ["| protocol | packets | verdicts/s |", "| --- | --- | --- |"]
    lines += [f"| {protocol} | {kind} | {rate:,.0f} |" for (protocol, kind), rate in rates.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(verifications(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0)))
