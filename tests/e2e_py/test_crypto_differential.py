"""An independent check of the proxy's cryptography (issue 11, section 2).

The proxy and the KMS emulator share the AAD / CDIV code, so a bug there would pass
every test that only pairs the two. Here nothing of the project's code is used on the
checking side: the real proxy binary serves a SoftHSM token into which this test has
imported an AES-256 key of KNOWN value (with python-pkcs11, C_CreateObject, the
attributes `xks-proxy keys create` sets: sensitive and non-extractable), and Python's
`cryptography` checks the proxy's answers against the spec (shared docs, xks-api.md):

  AAD given to AES-GCM = u16_be(len aad) || aad || u8(len md) || md
  CDIV = SHA-256(aad || ciphertextMetadata || iv || ciphertext || tag)

Random cases from a seeded RNG (XKS_DIFF_SEED, XKS_DIFF_CASES to change them):
plaintext 1..4300 bytes, AAD absent or 0..8192 bytes. Each case goes both ways:
proxy Encrypt -> Python decrypts and recomputes the CDIV; Python encrypts (with the
ciphertextMetadata the proxy returned) -> proxy Decrypt. Then negative cases: any
changed bit of the tag, ciphertext, IV, AAD or metadata, and AADs built other than the
spec's way, must be refused with 400 InvalidCiphertextException.
"""

import base64
import hashlib
import http.client
import json
import os
import random
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conftest import AKID, CERTS, PATH, REGION, REPO, SECRET, WAIT_SECONDS, XKS_HOST, ProxySetup, sigv4_signature

HERE = Path(__file__).resolve().parent
# A test constant: the whole point is that the checking side knows the key.
KNOWN_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
KEY_ID = "diff-known-key"
SEED = int(os.environ.get("XKS_DIFF_SEED", "20261206"))
CASES = int(os.environ.get("XKS_DIFF_CASES", "2000"))
MAX_PLAINTEXT = 4300  # the spec's minimum maximum
MAX_AAD = 8192
TIME_BUDGET = 240  # seconds for all the cases: a hang fails, it never blocks the run


def b64(data):
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text, validate=True)


def spec_aad(aad, metadata):
    """The spec's AAD, written from the spec: a missing field is length 0, no bytes."""
    aad = aad or b""
    metadata = metadata or b""
    assert len(aad) < 1 << 16 and len(metadata) < 1 << 8
    return len(aad).to_bytes(2, "big") + aad + len(metadata).to_bytes(1, "big") + metadata


def spec_cdiv(aad, metadata, iv, ciphertext, tag):
    return hashlib.sha256((aad or b"") + (metadata or b"") + iv + ciphertext + tag).digest()


def test_spec_worked_example():
    """The spec's CDIV vector, so the checking side is itself checked."""
    got = spec_cdiv(
        b"project=nile,department=marketing",
        b"key_version=1",
        bytes.fromhex("1ccae5470f39700254779031"),
        bytes.fromhex("821c642b5b71783367deaf18"),
        bytes.fromhex("bc1c4dda7707d6812447c5955e99b261"),
    )
    assert got.hex() == "a8703f2260bd8791ec2d15ea0b23e65a0631eedcf2a13a65cc82db3f47cf5ec7"
    assert b64(got) == "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="
    assert spec_aad(None, None) == b"\0\0\0"


class XksClient:
    """Direct, SigV4-signed XKS calls to the proxy over one kept-alive TLS connection
    (signed with conftest's independent SigV4, SignedHeaders host;x-amz-date, as KMS)."""

    def __init__(self, port):
        self.port = port
        self.ctx = ssl.create_default_context(cafile=str(CERTS / "ca.pem"))
        self.conn = None
        self.n = 0

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def call(self, operation, body):
        path = f"{PATH}/keys/{KEY_ID}/{operation}"
        self.n += 1
        body = dict(body)
        body["requestMetadata"] = {
            "kmsRequestId": f"diff-{self.n}",
            "kmsOperation": "Encrypt" if operation == "encrypt" else "Decrypt",
            "awsPrincipalArn": "arn:aws:iam::111122223333:user/differential",
            "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/11111111-2222-3333-4444-555555555555",
        }
        data = json.dumps(body).encode()
        for attempt in (1, 2):
            amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            sig = sigv4_signature(SECRET, path, XKS_HOST, amz_date, REGION, data)
            headers = {
                "Host": XKS_HOST,
                "X-Amz-Date": amz_date,
                "Content-Type": "application/json",
                "Authorization": (
                    f"AWS4-HMAC-SHA256 Credential={AKID}/{amz_date[:8]}/{REGION}/kms-xks-proxy/aws4_request, "
                    f"SignedHeaders=host;x-amz-date, Signature={sig}"
                ),
            }
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
                self.conn.request("POST", path, body=data, headers=headers)
                resp = self.conn.getresponse()
                payload = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionError, http.client.BadStatusLine):
                # The server may close an idle kept-alive connection; one fresh retry.
                self.close()
                if attempt == 2:
                    raise
        return resp.status, json.loads(payload or b"{}")


@pytest.fixture(scope="module")
def proxy_on_known_key(tmp_path_factory):
    """A fresh SoftHSM token holding KNOWN_KEY under KEY_ID, and the real proxy on it."""
    if not shutil.which("softhsm2-util"):
        pytest.fail("softhsm2-util not found: apt-get install -y softhsm2 (tests/run-all.sh installs it)")
    base = tmp_path_factory.mktemp("crypto-diff")
    out = subprocess.run(
        [str(REPO / "tests/softhsm/setup.sh"), str(base / "softhsm"), "diff-setup"],
        check=True, capture_output=True, text=True, timeout=WAIT_SECONDS,
    ).stdout
    env = {}
    for line in out.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value.strip("'\"")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SOFTHSM2_CONF", "XKS_TEST_PKCS11_MODULE", "XKS_TEST_SOFTHSM_TOKEN_LABEL", "XKS_TEST_SOFTHSM_USER_PIN"):
            mp.setenv(name, env[name])
        # The harness's SoftHSM proxy: it makes a token of its own (label e2e-<port>) in
        # the SoftHSM directory set above, and writes the proxy's config.
        setup = ProxySetup(base, backend="softhsm")
    token = f"e2e-{setup.port}"
    imported = subprocess.run(
        [sys.executable, str(HERE / "pkcs11_import_key.py"), env["XKS_TEST_PKCS11_MODULE"], token, KEY_ID, KNOWN_KEY.hex()],
        env=dict(setup.env, PIN=env["XKS_TEST_SOFTHSM_USER_PIN"]),
        capture_output=True, text=True, timeout=WAIT_SECONDS,
    )
    assert imported.returncode == 0 and "imported" in imported.stdout, imported.stderr
    setup.keys.append(KEY_ID)
    setup.write()
    proxy = setup.start()  # bounded wait for "listening on https://"
    client = XksClient(setup.port)
    try:
        yield client, proxy
    finally:
        client.close()
        proxy.stop()


def pick_len(rng, top, edges):
    """Lengths with the edges over-represented: a boundary bug shows in any run."""
    return rng.choice(edges) if rng.random() < 0.15 else rng.randint(edges[0], top)


def pick_aad(rng):
    r = rng.random()
    if r < 0.2:
        return None  # field absent
    if r < 0.25:
        return b""  # present, empty
    return rng.randbytes(pick_len(rng, MAX_AAD, [0, 1, 2, 255, 256, 257, 4096, 8191, MAX_AAD]))


def encrypt(client, plaintext, aad, cdiv=True):
    body = {"plaintext": b64(plaintext), "encryptionAlgorithm": "AES_GCM"}
    if aad is not None:
        body["additionalAuthenticatedData"] = b64(aad)
    if cdiv:
        body["ciphertextDataIntegrityValueAlgorithm"] = "SHA_256"
    return client.call("encrypt", body)


def decrypt(client, ciphertext, iv, tag, aad, metadata):
    body = {
        "ciphertext": b64(ciphertext),
        "initializationVector": b64(iv),
        "authenticationTag": b64(tag),
        "encryptionAlgorithm": "AES_GCM",
    }
    if aad is not None:
        body["additionalAuthenticatedData"] = b64(aad)
    if metadata is not None:
        body["ciphertextMetadata"] = b64(metadata)
    return client.call("decrypt", body)


def test_random_cases_both_ways(proxy_on_known_key):
    client, proxy = proxy_on_known_key
    rng = random.Random(SEED)
    gcm = AESGCM(KNOWN_KEY)
    ivs = set()
    metadatas = set()
    counts = {"proxy_encrypt": 0, "proxy_decrypt": 0, "cdiv_checked": 0, "aad_absent": 0, "aad_empty": 0}
    started = time.monotonic()
    for case in range(CASES):
        assert time.monotonic() - started < TIME_BUDGET, f"over {TIME_BUDGET}s after {case} cases"
        where = f"case {case} (XKS_DIFF_SEED={SEED})"
        plaintext = rng.randbytes(pick_len(rng, MAX_PLAINTEXT, [1, 2, 15, 16, 17, 4095, 4096, MAX_PLAINTEXT]))
        aad = pick_aad(rng)
        counts["aad_absent"] += aad is None
        counts["aad_empty"] += aad == b""
        want_cdiv = rng.random() < 0.9

        # 1. The proxy encrypts; Python decrypts with the spec's AAD and checks the CDIV.
        status, r = encrypt(client, plaintext, aad, cdiv=want_cdiv)
        assert status == 200, f"{where}: Encrypt {status} {r} (pt {len(plaintext)}, aad {aad and len(aad)})"
        counts["proxy_encrypt"] += 1
        ciphertext, iv, tag = unb64(r["ciphertext"]), unb64(r["initializationVector"]), unb64(r["authenticationTag"])
        metadata = unb64(r["ciphertextMetadata"]) if "ciphertextMetadata" in r else None
        assert len(ciphertext) == len(plaintext), where
        assert len(iv) in (12, 16), where
        assert len(tag) == 16, where
        assert metadata is None or len(metadata) <= 20, where
        assert iv not in ivs, f"{where}: the proxy reused an IV under one key"
        ivs.add(iv)
        metadatas.add(metadata)
        try:
            opened = gcm.decrypt(iv, ciphertext + tag, spec_aad(aad, metadata))
        except InvalidTag:
            pytest.fail(f"{where}: the proxy's ciphertext does not open with the spec's AAD "
                        f"(pt {len(plaintext)}, aad {aad and len(aad)}, md {metadata and metadata.hex()})")
        assert opened == plaintext, where
        if want_cdiv:
            assert "ciphertextDataIntegrityValue" in r, f"{where}: CDIV asked for, none returned"
            assert unb64(r["ciphertextDataIntegrityValue"]) == spec_cdiv(aad, metadata, iv, ciphertext, tag), (
                f"{where}: CDIV differs from the spec's (aad {aad and len(aad)}, md {metadata and metadata.hex()})"
            )
            counts["cdiv_checked"] += 1
        else:
            assert "ciphertextDataIntegrityValue" not in r, f"{where}: CDIV returned though not asked for"

        # 2. Python encrypts to the spec (fresh plaintext, AAD and IV, the proxy's
        # metadata for this key); the proxy decrypts.
        plaintext2 = rng.randbytes(pick_len(rng, MAX_PLAINTEXT, [1, 16, MAX_PLAINTEXT]))
        aad2 = pick_aad(rng)
        iv2 = rng.randbytes(12)
        sealed = gcm.encrypt(iv2, plaintext2, spec_aad(aad2, metadata))
        status, r = decrypt(client, sealed[:-16], iv2, sealed[-16:], aad2, metadata)
        assert status == 200, f"{where}: Decrypt of Python's ciphertext: {status} {r} (pt {len(plaintext2)}, aad {aad2 and len(aad2)})"
        assert unb64(r["plaintext"]) == plaintext2, where
        counts["proxy_decrypt"] += 1

    elapsed = time.monotonic() - started
    print(f"\ncrypto differential: seed {SEED}, {CASES} cases, {counts}, "
          f"metadata values {sorted(m.hex() if m else '-' for m in metadatas)}, {elapsed:.1f}s")
    assert counts["proxy_encrypt"] == counts["proxy_decrypt"] == CASES
    assert len(metadatas) == 1, f"one key version, yet several metadata values: {metadatas}"


def flip(data, rng):
    i = rng.randrange(len(data) * 8)
    out = bytearray(data)
    out[i // 8] ^= 1 << (i % 8)
    return bytes(out)


def test_tampering_is_refused(proxy_on_known_key):
    """Every kind of change to a good ciphertext, and ciphertexts sealed under AADs
    built other than the spec's way, get 400 InvalidCiphertextException."""
    client, proxy = proxy_on_known_key
    rng = random.Random(SEED + 1)
    gcm = AESGCM(KNOWN_KEY)
    refused = 0

    def refuse(what, ciphertext, iv, tag, aad, metadata):
        nonlocal refused
        status, r = decrypt(client, ciphertext, iv, tag, aad, metadata)
        assert (status, r.get("errorName")) == (400, "InvalidCiphertextException"), f"{what}: {status} {r}"
        refused += 1

    for case in range(25):
        plaintext = rng.randbytes(rng.randint(1, MAX_PLAINTEXT))
        aad = rng.randbytes(rng.randint(1, 300))
        status, r = encrypt(client, plaintext, aad)
        assert status == 200, r
        ct, iv, tag = unb64(r["ciphertext"]), unb64(r["initializationVector"]), unb64(r["authenticationTag"])
        md = unb64(r["ciphertextMetadata"]) if "ciphertextMetadata" in r else None
        # The untouched one opens (the baseline of every negative below).
        status, ok = decrypt(client, ct, iv, tag, aad, md)
        assert status == 200 and unb64(ok["plaintext"]) == plaintext, ok

        refuse(f"{case}: flipped tag bit", ct, iv, flip(tag, rng), aad, md)
        refuse(f"{case}: flipped ciphertext bit", flip(ct, rng), iv, tag, aad, md)
        refuse(f"{case}: flipped IV bit", ct, flip(iv, rng), tag, aad, md)
        refuse(f"{case}: flipped AAD bit", ct, iv, tag, flip(aad, rng), md)
        refuse(f"{case}: AAD one byte shorter", ct, iv, tag, aad[:-1], md)
        refuse(f"{case}: AAD one byte longer", ct, iv, tag, aad + b"\0", md)
        refuse(f"{case}: AAD dropped", ct, iv, tag, None, md)
        if md:
            refuse(f"{case}: flipped metadata bit", ct, iv, tag, aad, flip(md, rng))
            refuse(f"{case}: metadata dropped", ct, iv, tag, aad, None)
            # Bytes moved between the two fields: the length prefixes must catch it.
            refuse(f"{case}: last AAD byte moved into the metadata", ct, iv, tag, aad[:-1], aad[-1:] + md)

        # Python seals under AADs that are NOT the spec's; the proxy must refuse them all.
        md_bytes = md or b""
        wrong_aads = {
            "raw aad only": aad,
            "aad || md, no lengths": aad + md_bytes,
            "u16 little-endian length": len(aad).to_bytes(2, "little") + aad + bytes([len(md_bytes)]) + md_bytes,
            "no metadata part": len(aad).to_bytes(2, "big") + aad,
        }
        for name, wrong in wrong_aads.items():
            iv2 = rng.randbytes(12)
            sealed = gcm.encrypt(iv2, plaintext, wrong)
            refuse(f"{case}: sealed with {name}", sealed[:-16], iv2, sealed[-16:], aad, md)
    print(f"\ncrypto differential: {refused} tampered or mis-sealed ciphertexts refused")
