"""Imports an AES-256 key of a KNOWN value into a SoftHSM token, for the differential
test of the proxy's cryptography (test_crypto_differential.py). Test-only: the value
is a test constant, the token lives in the test's temporary directory.

    python pkcs11_import_key.py MODULE TOKEN_LABEL KEY_ID KEY_HEX   (user PIN in $PIN)

Runs as its own process so the PKCS#11 library (and the SOFTHSM2_CONF it read at
C_Initialize) never stays loaded in the pytest process. Uses python-pkcs11 only, none
of the project's code. The object gets the attributes `xks-proxy keys create` gives
its keys (token, private, sensitive, non-extractable, CKA_LABEL = CKA_ID = the key
id, ENCRYPT and DECRYPT only), so nothing can read the value back out of the token.

Before exiting it proves the token holds the value we think: an AES-GCM encryption
by the token of a fixed vector must equal the one Python's `cryptography` computes.
"""

import os
import sys

import pkcs11
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams


def main(module, token_label, key_id, key_hex):
    value = bytes.fromhex(key_hex)
    assert len(value) == 32, "AES-256 needs 32 bytes"
    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=token_label)
    with token.open(user_pin=os.environ["PIN"], rw=True) as session:
        key = session.create_object(
            {
                Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.AES,
                Attribute.VALUE: value,
                Attribute.LABEL: key_id,
                Attribute.ID: key_id.encode(),
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.ENCRYPT: True,
                Attribute.DECRYPT: True,
                Attribute.WRAP: False,
                Attribute.UNWRAP: False,
                Attribute.SIGN: False,
                Attribute.VERIFY: False,
                Attribute.DERIVE: False,
            }
        )
        # The token agrees with Python on the key's value (without reading it out).
        iv, aad, msg = bytes(range(12)), b"known-answer aad", b"known-answer plaintext"
        by_token = bytes(key.encrypt(msg, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, 128)))
        by_python = AESGCM(value).encrypt(iv, msg, aad)
        if by_token != by_python:
            print("token's AES-GCM output differs from Python's for the imported key", file=sys.stderr)
            return 1
        # And the value really is out of reach.
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
    print("imported")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
