"""A sequence's identity in the maps (the key of its progress and stats)."""

import hashlib


def sequence_uid(seq):
    """Stable while the knock itself is unchanged, so in-flight knocks survive
    reloads that touch other sequences or only timeouts; never 0 (0 marks a
    grant written by the operator)."""
    text = seq.name + "\0" + " ".join(str(step) for step in seq.knock)
    uid = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")
    return uid or 1
