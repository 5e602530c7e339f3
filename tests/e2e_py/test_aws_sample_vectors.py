"""Ciphertexts made by AWS's sample proxy keep decrypting after a switch (issue 14, §1).

The vectors in ../shared/vectors/aws-sample/ were made by the sample itself (xks-axum
v3.1.2, unmodified) on SoftHSM: 78 per file, with its static `ciphertext_metadata_b64`
unset (no-metadata.jsonl) and set to "djAuMC4x" (static-metadata.jsonl). Here their keys
(public test values from that README) are imported into a fresh SoftHSM token with
python-pkcs11 (pkcs11_import_key.py, none of the project's code), the real proxy serves
the token with `[keystores.aws_sample_ciphertexts]` on two prefixes (one per metadata
setting), and every vector is decrypted over HTTPS, signed like KMS, exactly as KMS
would send it back. Then the negative side: every tampered copy (ciphertext, tag, IV,
AAD changed, added or dropped, metadata changed, the other prefix's setting) must be
refused with 400 InvalidCiphertextException, and a new Encrypt must use this project's
scheme (checked with Python's `cryptography` against the spec's AAD), never the
sample's.
"""

import base64
import hashlib
import http.client
import json
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from conftest import AKID, CERTS, REGION, REPO, SECRET, WAIT_SECONDS, XKS_HOST, ProxySetup, sigv4_signature

HERE = Path(__file__).resolve().parent
VECTORS = REPO.parent / "shared" / "vectors" / "aws-sample"
# The sample's test keys (VECTORS/README.md): public values, for tests only.
KEYS = {
    "foo": bytes(range(32)),
    "bar": bytes(range(255, 223, -1)),
}
# prefix -> (vector file, the sample's ciphertext_metadata_b64 as it was configured)
PREFIXES = {
    "/static": ("static-metadata.jsonl", "djAuMC4x"),
    "/none": ("no-metadata.jsonl", ""),
}
OURS = "ours-1"  # a key this proxy made, on the same token


def b64(data):
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text, validate=True)


def load(name):
    with open(VECTORS / name) as f:
        return [json.loads(line) for line in f if line.strip()]


class SampleMigration(ProxySetup):
    """The harness's SoftHSM proxy with two keystores that also open the sample's
    ciphertexts (one per metadata setting), serving the sample's keys as shared keys."""

    def write(self):
        creds = "".join(
            f'\n[[keystores.credentials]]\naccess_key_id = "{akid}"\nsecret_env = "{env}"\n'
            for akid, env in self.credentials
        )
        keystores = "".join(
            f'\n[[keystores]]\npath_prefix = "{prefix}"\n'
            f"allowed_keys = {json.dumps(self.keys if i == 0 else [])}\n"
            f"shared_keys = {json.dumps(sorted(KEYS))}\n{creds}"
            f'\n[keystores.aws_sample_ciphertexts]\nciphertext_metadata_b64 = "{metadata}"\n'
            for i, (prefix, (_, metadata)) in enumerate(PREFIXES.items())
        )
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\n\n'
            f'[server.tls]\ncertificate = "{CERTS / "server-ecdsa.pem"}"\n'
            f'private_key = "{CERTS / "server-ecdsa.key"}"\n\n'
            f"[backend]\n{self.backend_toml}{self.disabled_toml()}{keystores}"
        )


class Xks:
    """SigV4-signed XKS calls (conftest's independent signer, as KMS signs)."""

    def __init__(self, port):
        self.port = port
        self.ctx = ssl.create_default_context(cafile=str(CERTS / "ca.pem"))
        self.n = 0

    def call(self, prefix, key, operation, body):
        path = f"{prefix}/kms/xks/v1/keys/{key}/{operation}"
        self.n += 1
        body = dict(body)
        body["requestMetadata"] = {
            "kmsRequestId": f"sample-{self.n}",
            "kmsOperation": "Encrypt" if operation == "encrypt" else "Decrypt",
            "awsPrincipalArn": "arn:aws:iam::111122223333:user/migration",
            "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/11111111-2222-3333-4444-555555555555",
        }
        data = json.dumps(body).encode()
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        sig = sigv4_signature(SECRET, path, XKS_HOST, amz_date, REGION, data)
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx, timeout=30)
        try:
            conn.request("POST", path, body=data, headers={
                "Host": XKS_HOST,
                "X-Amz-Date": amz_date,
                "Content-Type": "application/json",
                "Authorization": (
                    f"AWS4-HMAC-SHA256 Credential={AKID}/{amz_date[:8]}/{REGION}/kms-xks-proxy/aws4_request, "
                    f"SignedHeaders=host;x-amz-date, Signature={sig}"
                ),
            })
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()


def decrypt_body(vector, **change):
    """The Decrypt KMS sends for what the sample answered; `change` replaces fields
    (None drops one)."""
    req, resp = vector["request"], vector["response"]
    body = {
        "ciphertext": resp["ciphertext"],
        "initializationVector": resp["initializationVector"],
        "authenticationTag": resp["authenticationTag"],
        "encryptionAlgorithm": "AES_GCM",
    }
    if "additionalAuthenticatedData" in req:
        body["additionalAuthenticatedData"] = req["additionalAuthenticatedData"]
    if "ciphertextMetadata" in resp:
        body["ciphertextMetadata"] = resp["ciphertextMetadata"]
    for field, value in change.items():
        if value is None:
            body.pop(field, None)
        else:
            body[field] = value
    return body


def flip(b64text, at=0):
    raw = bytearray(unb64(b64text))
    raw[at % len(raw)] ^= 0x01
    return b64(bytes(raw))


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    if not shutil.which("softhsm2-util"):
        pytest.fail("softhsm2-util not found: apt-get install -y softhsm2 (tests/run-all.sh installs it)")
    assert VECTORS.is_dir(), f"{VECTORS} missing: ../shared must be beside the repo"
    base = tmp_path_factory.mktemp("aws-sample")
    out = subprocess.run(
        [str(REPO / "tests/softhsm/setup.sh"), str(base / "softhsm"), "sample-setup"],
        check=True, capture_output=True, text=True, timeout=WAIT_SECONDS,
    ).stdout
    env = {}
    for line in out.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value.strip("'\"")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SOFTHSM2_CONF", "XKS_TEST_PKCS11_MODULE", "XKS_TEST_SOFTHSM_TOKEN_LABEL", "XKS_TEST_SOFTHSM_USER_PIN"):
            mp.setenv(name, env[name])
        setup = SampleMigration(base, backend="softhsm")
    token = f"e2e-{setup.port}"
    for label, value in KEYS.items():
        imported = subprocess.run(
            [sys.executable, str(HERE / "pkcs11_import_key.py"), env["XKS_TEST_PKCS11_MODULE"], token, label, value.hex()],
            env=dict(setup.env, PIN=env["XKS_TEST_SOFTHSM_USER_PIN"]),
            capture_output=True, text=True, timeout=WAIT_SECONDS,
        )
        assert imported.returncode == 0 and "imported" in imported.stdout, imported.stderr
    # One key of our own (this also makes the token's health-check key).
    setup.create_key(OURS)
    proc = setup.start()
    try:
        yield Xks(setup.port)
    finally:
        proc.stop()


def test_every_sample_vector_decrypts_through_the_proxy(proxy):
    seen = 0
    for prefix, (name, metadata) in PREFIXES.items():
        vectors = load(name)
        assert len(vectors) == 78, name
        for i, v in enumerate(vectors):
            assert unb64(v["response"].get("ciphertextMetadata", "")) == unb64(metadata), (name, i)
            status, r = proxy.call(prefix, v["keyId"], "decrypt", decrypt_body(v))
            assert status == 200, f"{name}#{i} ({v['keyId']}): {status} {r}"
            assert r["plaintext"] == v["request"]["plaintext"], f"{name}#{i}"
            seen += 1
    assert seen == 156


def test_every_tampered_sample_vector_is_refused(proxy):
    refused = 0
    for prefix, (name, metadata) in PREFIXES.items():
        other = next(p for p in PREFIXES if p != prefix)
        for i, v in enumerate(load(name)):
            resp, req = v["response"], v["request"]
            aad = req.get("additionalAuthenticatedData")
            tampered = {
                "ciphertext": decrypt_body(v, ciphertext=flip(resp["ciphertext"])),
                "tag": decrypt_body(v, authenticationTag=flip(resp["authenticationTag"], 5)),
                "iv": decrypt_body(v, initializationVector=flip(resp["initializationVector"], 3)),
                # Absent and present-but-empty AAD differ in the sample's scheme.
                "aad": decrypt_body(v, additionalAuthenticatedData=None if aad is not None else ""),
                "metadata": decrypt_body(v, ciphertextMetadata=b64(b"v0.0.2")),
            }
            if aad:
                tampered["aad byte"] = decrypt_body(v, additionalAuthenticatedData=flip(aad, 7))
            for what, body in tampered.items():
                status, r = proxy.call(prefix, v["keyId"], "decrypt", body)
                assert (status, r.get("errorName")) == (400, "InvalidCiphertextException"), f"{name}#{i} {what}: {status} {r}"
                refused += 1
            # The other prefix expects the other static metadata: not recognised there.
            status, r = proxy.call(other, v["keyId"], "decrypt", decrypt_body(v))
            assert (status, r.get("errorName")) == (400, "InvalidCiphertextException"), f"{name}#{i} at {other}"
            refused += 1
    assert refused > 156 * 6


def spec_aad(aad, metadata):
    return len(aad).to_bytes(2, "big") + aad + len(metadata).to_bytes(1, "big") + metadata


def sample_aad(aad, metadata):
    digest = hashlib.sha256(aad).digest() if aad is not None else b""
    return len(aad or b"").to_bytes(2, "big") + digest + len(metadata).to_bytes(1, "big") + metadata


def test_new_encryptions_use_this_projects_scheme_never_the_samples(proxy):
    gcm = AESGCM(KEYS["foo"])
    for prefix in PREFIXES:
        for aad in (None, b"", b"migration"):
            body = {"plaintext": b64(b"after the switch"), "encryptionAlgorithm": "AES_GCM"}
            if aad is not None:
                body["additionalAuthenticatedData"] = b64(aad)
            status, r = proxy.call(prefix, "foo", "encrypt", body)
            assert status == 200, r
            metadata = unb64(r["ciphertextMetadata"])
            assert len(metadata) == 5 and metadata[0] == 1, "this project's metadata"
            iv, sealed = unb64(r["initializationVector"]), unb64(r["ciphertext"]) + unb64(r["authenticationTag"])
            assert gcm.decrypt(iv, sealed, spec_aad(aad or b"", metadata)) == b"after the switch"
            if aad is not None:  # (without AAD the two schemes build the same bytes)
                with pytest.raises(InvalidTag):
                    gcm.decrypt(iv, sealed, sample_aad(aad, metadata))
            # It decrypts back; with the sample's metadata in place of ours it is
            # opened the sample's way and fails: no downgrade.
            back = {k: r[k] for k in ("ciphertext", "initializationVector", "authenticationTag", "ciphertextMetadata")}
            back["encryptionAlgorithm"] = "AES_GCM"
            if aad is not None:
                back["additionalAuthenticatedData"] = b64(aad)
            status, d = proxy.call(prefix, "foo", "decrypt", back)
            assert (status, d.get("plaintext")) == (200, b64(b"after the switch"))
            downgraded = dict(back, ciphertextMetadata=PREFIXES[prefix][1])
            if not PREFIXES[prefix][1]:
                downgraded.pop("ciphertextMetadata")
            status, d = proxy.call(prefix, "foo", "decrypt", downgraded)
            assert (status, d.get("errorName")) == (400, "InvalidCiphertextException"), d
    # A key the proxy made keeps working beside the sample's.
    status, r = proxy.call("/static", OURS, "encrypt", {"plaintext": b64(b"x"), "encryptionAlgorithm": "AES_GCM"})
    assert status == 200, r
