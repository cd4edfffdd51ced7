"""What a SPA verifier says about one payload, whichever protocol it spoke:
the outcome (a counter reason), why, and what to grant."""

import dataclasses

from ..kernel import layout

Reason = layout.Reason
# The reasons an SPA payload is judged with, and their names in logs.
OUTCOMES = {
    Reason.SPA_ACCEPTED: "accepted",
    Reason.SPA_BAD_HMAC: "bad_hmac",
    Reason.SPA_REPLAYED: "replayed",
    Reason.SPA_STALE: "stale",
    Reason.SPA_MALFORMED: "malformed",
    Reason.SPA_UNKNOWN_USER: "unknown_user",
    Reason.SPA_PORT_DENIED: "port_denied",
    Reason.SPA_SOURCE_DENIED: "source_denied",
    Reason.SPA_GRANT_FAILED: "grant_failed",
}


@dataclasses.dataclass
class Verdict:
    outcome: Reason
    detail: str = ""               # why, for the log; never a secret
    user: str | None = None        # the stanza whose key matched
    address: object = None         # whom to grant (accepted only)
    ports: tuple = ()              # (proto name, port)
    open_for_ns: int = 0
    idle_timeout_ns: int = 0
    also: tuple = ()               # more addresses to grant (the public-key SPA's other family)
    reply: object = None           # an acknowledgement to send once the grants are written

    @property
    def name(self):
        return OUTCOMES[self.outcome]
