"""controller/wire/hpke.py against RFC 9180's own test vector A.2.1
(DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305, base mode),
copied from the RFC's appendix: key derivation, encapsulation, the first
encryption and the three exported secrets."""

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from xknock.controller.wire import hpke

H = bytes.fromhex
A_2_1 = {
    "info": H("4f6465206f6e2061204772656369616e2055726e"),
    "ikmE": H("909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b"),
    "pkEm": H("1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a"),
    "skEm": H("f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600"),
    "ikmR": H("1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df"),
    "pkRm": H("4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a"),
    "skRm": H("8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb"),
    "pt": H("4265617574792069732074727574682c20747275746820626561757479"),
    "aad0": H("436f756e742d30"),
    "ct0": H("1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28"),
    "exports": [(b"", H("4bbd6243b8bb54cec311fac9df81841b6fd61f56538a775e7c80a9f40160606e")),
                (H("00"), H("8c1df14732580e5501b00f82b10a1647b40713191b7c1240ac80e2b68808ba69")),
                (H("54657374436f6e74657874"), H("5acb09211139c43b3090489a9da433e8a30ee7188ba8b0a9a1ccf0c229283e53"))],
}
V = A_2_1


def private_bytes(key):
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def test_derive_key_pair_matches_the_rfc():
    sk_e, pk_e = hpke.derive_key_pair(V["ikmE"])
    sk_r, pk_r = hpke.derive_key_pair(V["ikmR"])
    assert (private_bytes(sk_e), pk_e) == (V["skEm"], V["pkEm"])
    assert (private_bytes(sk_r), pk_r) == (V["skRm"], V["pkRm"])


def test_seal_matches_the_rfc_and_opens():
    enc, ct, exporter = hpke.seal(V["pkRm"], V["info"], V["aad0"], V["pt"], ikm_e=V["ikmE"])
    assert enc == V["pkEm"] and ct == V["ct0"]
    for context, value in V["exports"]:
        assert hpke.export(exporter, context, 32) == value
    sk_r = X25519PrivateKey.from_private_bytes(V["skRm"])
    plaintext, exporter_r = hpke.open_(sk_r, enc, V["info"], V["aad0"], ct)
    assert plaintext == V["pt"] and exporter_r == exporter


@pytest.mark.parametrize("field", ["enc", "ct", "aad", "info"])
def test_any_change_fails_to_open(field):
    sk_r = X25519PrivateKey.from_private_bytes(V["skRm"])
    args = {"enc": V["pkEm"], "info": V["info"], "aad": V["aad0"], "ct": V["ct0"]}
    args[field] = bytes([args[field][0] ^ 1]) + args[field][1:]
    with pytest.raises(hpke.OpenError):
        hpke.open_(sk_r, args["enc"], args["info"], args["aad"], args["ct"])


def test_a_low_order_encapsulation_is_refused():
    sk_r = X25519PrivateKey.from_private_bytes(V["skRm"])
    with pytest.raises(hpke.OpenError):
        hpke.open_(sk_r, bytes(32), V["info"], V["aad0"], V["ct0"])
