"""CloudHSM key stores through boto3: the real kms-emulator with stand-in clusters on
SoftHSMv2 tokens (tests/softhsm/setup.sh, one throw-away directory per test), and
OpenSC's pkcs11-tool as the oracle outside the emulator (password rotation, the
operator's reset). Every wait is bounded."""

import base64
import os
import subprocess
import time

import pytest

from conftest import CERTS, REPO, WAIT_SECONDS, describe_store, error_code, kms_client, start_emulator

SO_PIN = "12345678"
CLUSTER_A = "cluster-aaaaaaaaaaaa"
CLUSTER_B = "cluster-bbbbbbbbbbbb"  # same lineage as A: related
CLUSTER_C = "cluster-cccccccccccc"  # another lineage
CLUSTER_ONE_AZ = "cluster-dddddddddddd"
CLUSTER_UNINITIALIZED = "cluster-eeeeeeeeeeee"
ANCHOR = (CERTS / "cloudhsm-trust-anchor.pem").read_text()
OTHER_ANCHOR = (CERTS / "cloudhsm-other-anchor.pem").read_text()

# Needs softhsm2 and opensc (tests/run-all.sh installs both); a missing tool fails
# the test rather than skipping it.


class Hsm:
    def __init__(self, tmp_path, tokens):
        self.dir = tmp_path / "softhsm"
        env = {}
        for label, pin in tokens:
            out = subprocess.run(
                [str(REPO / "tests/softhsm/setup.sh"), str(self.dir), label, SO_PIN, pin],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout
            for line in out.splitlines():
                k, _, v = line.removeprefix("export ").partition("=")
                env[k] = v
        self.conf = env["SOFTHSM2_CONF"]
        self.module = env["XKS_TEST_PKCS11_MODULE"]

    def tool(self, label, *args):
        return subprocess.run(
            ["pkcs11-tool", "--module", self.module, "--token-label", label, *args],
            env={**os.environ, "SOFTHSM2_CONF": self.conf},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def user_pin_works(self, label, pin):
        return self.tool(label, "--login", "--pin", pin, "--list-objects").returncode == 0

    def secret_key_labels(self, label, pin):
        """Labels of the secret keys kmsuser owns, listed by pkcs11-tool in its own process."""
        r = self.tool(label, "--login", "--pin", pin, "--list-objects", "--type", "secrkey")
        assert r.returncode == 0, r.stderr
        return [l.strip().removeprefix("label:").strip() for l in r.stdout.splitlines() if l.strip().startswith("label:")]

    def operator_reset(self, label, new_pin):
        r = self.tool(label, "--login", "--login-type", "so", "--so-pin", SO_PIN, "--init-pin", "--new-pin", new_pin)
        assert r.returncode == 0, r.stderr

    def clusters(self, entries):
        text = ""
        for cid, label, hsms, lineage, state in entries:
            text += (
                f'[[cluster]]\nid = "{cid}"\nmodule = "{self.module}"\ntoken_label = "{label}"\n'
                f'trust_anchor = "{CERTS / "cloudhsm-trust-anchor.pem"}"\nhsms_per_az = {hsms}\n'
                f'backup_lineage = "{lineage}"\nstate = "{state}"\n\n'
            )
        path = self.dir / "clusters.toml"
        path.write_text(text)
        return path


@pytest.fixture
def hsm_emulator(tmp_path, monkeypatch):
    """(hsm, emulator, boto3 client) with clusters A, B (related), C, one-AZ, uninitialized."""
    hsm = Hsm(tmp_path, [("hsm-a", "kmsuserPyOne1"), ("hsm-b", "kmsuserPyTwo2"), ("hsm-c", "kmsuserPy3")])
    path = hsm.clusters(
        [
            (CLUSTER_A, "hsm-a", "[1, 1]", "lineage-1", "ACTIVE"),
            (CLUSTER_B, "hsm-b", "[1, 1]", "lineage-1", "ACTIVE"),
            (CLUSTER_C, "hsm-c", "[1, 1]", "lineage-2", "ACTIVE"),
            (CLUSTER_ONE_AZ, "hsm-c", "[2, 0]", "lineage-3", "ACTIVE"),
            (CLUSTER_UNINITIALIZED, "hsm-c", "[1, 1]", "lineage-4", "UNINITIALIZED"),
        ]
    )
    monkeypatch.setenv("SOFTHSM2_CONF", hsm.conf)
    emu = start_emulator(9, "--cloudhsm-clusters", str(path))
    try:
        yield hsm, emu, kms_client(emu, validate=False)
    finally:
        emu.stop()


def create(kms, name, cluster, password, anchor=ANCHOR):
    return kms.create_custom_key_store(
        CustomKeyStoreName=name,
        CloudHsmClusterId=cluster,
        TrustAnchorCertificate=anchor,
        KeyStorePassword=password,
    )["CustomKeyStoreId"]


def settle(kms, store_id):
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        s = describe_store(kms, store_id)
        if s["ConnectionState"] not in ("CONNECTING", "DISCONNECTING"):
            return s
        time.sleep(0.05)
    raise AssertionError(f"store {store_id} never settled")


def connect(kms, store_id):
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    return settle(kms, store_id)


def disconnect(kms, store_id):
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    assert settle(kms, store_id)["ConnectionState"] == "DISCONNECTED"


def test_cloudhsm_lifecycle_rotation_and_operator_reset(hsm_emulator):
    hsm, emu, kms = hsm_emulator
    original, reset = "kmsuserPyOne1", "operatorReset9"
    store = create(kms, "py-hsm", CLUSTER_A, original)
    s = describe_store(kms, store)
    assert s["CustomKeyStoreType"] == "AWS_CLOUDHSM"
    assert s["CloudHsmClusterId"] == CLUSTER_A
    assert s["TrustAnchorCertificate"] == ANCHOR
    assert "XksProxyConfiguration" not in s
    assert s["ConnectionState"] == "DISCONNECTED"

    s = connect(kms, store)
    assert s["ConnectionState"] == "CONNECTED", s
    assert not hsm.user_pin_works("hsm-a", original), "the password was not rotated"

    disconnect(kms, store)
    hsm.operator_reset("hsm-a", reset)
    s = connect(kms, store)
    assert (s["ConnectionState"], s.get("ConnectionErrorCode")) == ("FAILED", "INVALID_CREDENTIALS")
    disconnect(kms, store)
    kms.update_custom_key_store(CustomKeyStoreId=store, KeyStorePassword=reset)
    assert connect(kms, store)["ConnectionState"] == "CONNECTED"
    assert not hsm.user_pin_works("hsm-a", reset)

    disconnect(kms, store)
    with pytest.raises(kms.exceptions.CustomKeyStoreInvalidStateException):
        kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)
    kms.delete_custom_key_store(CustomKeyStoreId=store)
    with pytest.raises(kms.exceptions.CustomKeyStoreNotFoundException):
        describe_store(kms, store)
    logs = emu.output()
    assert "kmsuser password rotated" in logs
    assert original not in logs and reset not in logs


def test_cloudhsm_create_and_update_errors(hsm_emulator):
    _, _, kms = hsm_emulator
    for cluster, anchor, password, want in [
        ("cluster-unknownunknown", ANCHOR, "kmsuserPw1", "CloudHsmClusterNotFoundException"),
        (CLUSTER_UNINITIALIZED, ANCHOR, "kmsuserPw1", "CloudHsmClusterNotActiveException"),
        (CLUSTER_A, OTHER_ANCHOR, "kmsuserPw1", "IncorrectTrustAnchorException"),
        (CLUSTER_ONE_AZ, ANCHOR, "kmsuserPw1", "CloudHsmClusterInvalidConfigurationException"),
        (CLUSTER_A, ANCHOR, "short6", "ValidationException"),
        (CLUSTER_A, ANCHOR, "x" * 33, "ValidationException"),
    ]:
        with pytest.raises(Exception) as e:
            create(kms, "s", cluster, password, anchor)
        assert error_code(e) == want, cluster

    store = create(kms, "first", CLUSTER_A, "kmsuserPyOne1")
    for cluster in (CLUSTER_A, CLUSTER_B):
        with pytest.raises(kms.exceptions.CloudHsmClusterInUseException):
            create(kms, "second", cluster, "kmsuserPw2")
    with pytest.raises(kms.exceptions.CustomKeyStoreNameInUseException):
        create(kms, "first", CLUSTER_C, "kmsuserPw3")

    with pytest.raises(kms.exceptions.CloudHsmClusterNotRelatedException):
        kms.update_custom_key_store(CustomKeyStoreId=store, CloudHsmClusterId=CLUSTER_C)
    kms.update_custom_key_store(CustomKeyStoreId=store, CloudHsmClusterId=CLUSTER_B)
    kms.update_custom_key_store(CustomKeyStoreId=store, CloudHsmClusterId=CLUSTER_A)
    assert connect(kms, store)["ConnectionState"] == "CONNECTED"
    kms.update_custom_key_store(CustomKeyStoreId=store, NewCustomKeyStoreName="renamed")
    for field in ({"KeyStorePassword": "kmsuserPw9"}, {"CloudHsmClusterId": CLUSTER_B}):
        with pytest.raises(kms.exceptions.CustomKeyStoreInvalidStateException):
            kms.update_custom_key_store(CustomKeyStoreId=store, **field)


def test_cloudhsm_lockout_after_five_refused_logins(hsm_emulator):
    _, _, kms = hsm_emulator
    store = create(kms, "locked", CLUSTER_A, "kmsuserWrong1")
    codes = []
    for _ in range(6):
        s = connect(kms, store)
        codes.append(s.get("ConnectionErrorCode"))
        disconnect(kms, store)
    assert codes == ["INVALID_CREDENTIALS"] * 4 + ["USER_LOCKED_OUT"] * 2
    kms.update_custom_key_store(CustomKeyStoreId=store, KeyStorePassword="kmsuserPyOne1")
    assert connect(kms, store)["ConnectionState"] == "CONNECTED"


def aws_cli(emu, tmp_path):
    """(cli, cli_state): `aws kms ...` against `emu` (JSON out; check=False gives the
    CompletedProcess), and a bounded wait for a store to leave (DIS)CONNECTING."""
    from test_cli import aws

    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = us-east-1\ncli_follow_urlparam = false\n")

    def cli(*args, **kw):
        return aws(emu, config, *args, **kw)

    def cli_state(store):
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            s = cli("describe-custom-key-stores", "--custom-key-store-id", store)["CustomKeyStores"][0]
            if s["ConnectionState"] not in ("CONNECTING", "DISCONNECTING"):
                return s
            time.sleep(0.05)
        raise AssertionError("never settled")

    return cli, cli_state


def test_cloudhsm_lifecycle_with_the_aws_cli(hsm_emulator, tmp_path):
    hsm, emu, kms = hsm_emulator
    cli, cli_state = aws_cli(emu, tmp_path)
    anchor = f"file://{CERTS / 'cloudhsm-trust-anchor.pem'}"

    out = cli(
        "create-custom-key-store", "--custom-key-store-name", "cli-hsm",
        "--cloud-hsm-cluster-id", CLUSTER_A, "--trust-anchor-certificate",
        f"file://{CERTS / 'cloudhsm-other-anchor.pem'}", "--key-store-password", "kmsuserPyOne1",
        check=False,
    )
    assert out.returncode == 255 and "IncorrectTrustAnchorException" in out.stderr, out.stderr
    store = cli(
        "create-custom-key-store", "--custom-key-store-name", "cli-hsm",
        "--cloud-hsm-cluster-id", CLUSTER_A, "--trust-anchor-certificate", anchor,
        "--key-store-password", "kmsuserPyOne1",
    )["CustomKeyStoreId"]
    cli("connect-custom-key-store", "--custom-key-store-id", store)
    s = cli_state(store)
    assert s["ConnectionState"] == "CONNECTED" and s["CloudHsmClusterId"] == CLUSTER_A
    cli("disconnect-custom-key-store", "--custom-key-store-id", store)
    assert cli_state(store)["ConnectionState"] == "DISCONNECTED"
    hsm.operator_reset("hsm-a", "operatorCli42")
    cli("connect-custom-key-store", "--custom-key-store-id", store)
    assert cli_state(store).get("ConnectionErrorCode") == "INVALID_CREDENTIALS"
    cli("disconnect-custom-key-store", "--custom-key-store-id", store)
    cli_state(store)
    cli("update-custom-key-store", "--custom-key-store-id", store, "--key-store-password", "operatorCli42")
    cli("connect-custom-key-store", "--custom-key-store-id", store)
    assert cli_state(store)["ConnectionState"] == "CONNECTED"
    cli("disconnect-custom-key-store", "--custom-key-store-id", store)
    cli_state(store)
    cli("delete-custom-key-store", "--custom-key-store-id", store)


def test_cloudhsm_keys_in_the_token(tmp_path, monkeypatch):
    """create key -> crypto in the token -> the ARN-labelled key seen by pkcs11-tool ->
    disconnect (Unavailable, KMSInvalidState) -> reconnect (old blobs open) -> material
    deleted behind KMS's back (KMSInvalidState) -> deletion destroys the material."""
    pin, look, look2 = "kmsuserKeysPy1", "operatorLookPy1", "operatorLookPy2"
    hsm = Hsm(tmp_path, [("hsm-a", pin)])
    path = hsm.clusters([(CLUSTER_A, "hsm-a", "[1, 1]", "lineage-1", "ACTIVE")])
    monkeypatch.setenv("SOFTHSM2_CONF", hsm.conf)
    emu = start_emulator(9, "--cloudhsm-clusters", str(path), "--deletion-day-length", "100ms")
    try:
        kms = kms_client(emu)
        store = create(kms, "keys", CLUSTER_A, pin)
        with pytest.raises(kms.exceptions.CustomKeyStoreInvalidStateException):
            kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)
        assert connect(kms, store)["ConnectionState"] == "CONNECTED"
        md = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)["KeyMetadata"]
        arn = md["Arn"]
        assert (md["Origin"], md["CustomKeyStoreId"], md["CloudHsmClusterId"], md["KeyState"]) == (
            "AWS_CLOUDHSM",
            store,
            CLUSTER_A,
            "Enabled",
        )
        blob = kms.encrypt(KeyId=arn, Plaintext=b"py plaintext", EncryptionContext={"k": "v"})["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=blob, EncryptionContext={"k": "v"})["Plaintext"] == b"py plaintext"
        with pytest.raises(kms.exceptions.InvalidCiphertextException):
            kms.decrypt(CiphertextBlob=blob)
        dk = kms.generate_data_key(KeyId=arn, KeySpec="AES_256")
        assert kms.decrypt(CiphertextBlob=dk["CiphertextBlob"])["Plaintext"] == dk["Plaintext"]
        wp = kms.generate_data_key_without_plaintext(KeyId=arn, NumberOfBytes=24)["CiphertextBlob"]
        assert len(kms.decrypt(CiphertextBlob=wp)["Plaintext"]) == 24
        local = kms.create_key()["KeyMetadata"]["Arn"]
        moved = kms.re_encrypt(
            CiphertextBlob=blob, SourceEncryptionContext={"k": "v"}, DestinationKeyId=local
        )["CiphertextBlob"]
        back = kms.re_encrypt(CiphertextBlob=moved, DestinationKeyId=arn)["CiphertextBlob"]
        assert kms.decrypt(CiphertextBlob=back)["Plaintext"] == b"py plaintext"

        hsm.operator_reset("hsm-a", look)
        assert hsm.secret_key_labels("hsm-a", look) == [arn]

        disconnect(kms, store)
        assert kms.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Unavailable"
        with pytest.raises(kms.exceptions.KMSInvalidStateException):
            kms.encrypt(KeyId=arn, Plaintext=b"x")
        kms.update_custom_key_store(CustomKeyStoreId=store, KeyStorePassword=look)
        assert connect(kms, store)["ConnectionState"] == "CONNECTED"
        for b in (dk["CiphertextBlob"], wp, back):
            kms.decrypt(CiphertextBlob=b)

        hsm.operator_reset("hsm-a", look2)
        r = hsm.tool("hsm-a", "--login", "--pin", look2, "--delete-object", "--type", "secrkey", "--label", arn)
        assert r.returncode == 0, r.stderr
        with pytest.raises(kms.exceptions.KMSInvalidStateException) as e:
            kms.encrypt(KeyId=arn, Plaintext=b"x")
        assert "key material" in str(e.value)

        doomed = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)["KeyMetadata"]["Arn"]
        assert hsm.secret_key_labels("hsm-a", look2) == [doomed]
        kms.schedule_key_deletion(KeyId=doomed, PendingWindowInDays=7)
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                kms.describe_key(KeyId=doomed)
            except kms.exceptions.NotFoundException:
                break
            assert time.monotonic() < deadline, "the key was never deleted"
            time.sleep(0.1)
        assert hsm.secret_key_labels("hsm-a", look2) == []
        logs = emu.output()
        for secret in (pin, look, look2, "py plaintext"):
            assert secret not in logs
    finally:
        emu.stop()


def test_cloudhsm_key_operations_with_the_aws_cli(tmp_path, monkeypatch):
    """The AWS CLI on a key in a CloudHSM key store: encrypt/decrypt with a context,
    generate-data-key, re-encrypt to an AWS_KMS key and back, Unavailable while
    disconnected (exit 255, KMSInvalidStateException), schedule-key-deletion -> the
    key and its material in the token are gone."""
    pin, look = "kmsuserCliKeys1", "operatorCliKeys1"
    hsm = Hsm(tmp_path, [("hsm-a", pin)])
    path = hsm.clusters([(CLUSTER_A, "hsm-a", "[1, 1]", "lineage-1", "ACTIVE")])
    monkeypatch.setenv("SOFTHSM2_CONF", hsm.conf)
    emu = start_emulator(9, "--cloudhsm-clusters", str(path), "--deletion-day-length", "100ms")
    try:
        cli, cli_state = aws_cli(emu, tmp_path)

        def blob_file(name, b64):
            f = tmp_path / name
            f.write_bytes(base64.b64decode(b64))
            return f"fileb://{f}"

        store = cli(
            "create-custom-key-store", "--custom-key-store-name", "cli-keys",
            "--cloud-hsm-cluster-id", CLUSTER_A,
            "--trust-anchor-certificate", f"file://{CERTS / 'cloudhsm-trust-anchor.pem'}",
            "--key-store-password", pin,
        )["CustomKeyStoreId"]
        cli("connect-custom-key-store", "--custom-key-store-id", store)
        assert cli_state(store)["ConnectionState"] == "CONNECTED"
        md = cli("create-key", "--origin", "AWS_CLOUDHSM", "--custom-key-store-id", store)["KeyMetadata"]
        arn = md["Arn"]
        assert (md["Origin"], md["CloudHsmClusterId"], md["CustomKeyStoreId"]) == ("AWS_CLOUDHSM", CLUSTER_A, store)

        plain = tmp_path / "plain.txt"
        plain.write_bytes(b"cli plaintext in the token")
        ct = cli(
            "encrypt", "--key-id", arn, "--plaintext", f"fileb://{plain}", "--encryption-context", "app=cli"
        )["CiphertextBlob"]
        out = cli("decrypt", "--ciphertext-blob", blob_file("ct.bin", ct), "--encryption-context", "app=cli")
        assert (base64.b64decode(out["Plaintext"]), out["KeyId"]) == (b"cli plaintext in the token", arn)
        r = cli("decrypt", "--ciphertext-blob", blob_file("ct.bin", ct), check=False)
        assert r.returncode == 255 and "InvalidCiphertextException" in r.stderr, r.stderr

        dk = cli("generate-data-key", "--key-id", arn, "--key-spec", "AES_256")
        assert len(base64.b64decode(dk["Plaintext"])) == 32
        out = cli("decrypt", "--ciphertext-blob", blob_file("dk.bin", dk["CiphertextBlob"]))
        assert out["Plaintext"] == dk["Plaintext"]

        local = cli("create-key")["KeyMetadata"]["Arn"]
        moved = cli(
            "re-encrypt", "--ciphertext-blob", blob_file("ct.bin", ct),
            "--source-encryption-context", "app=cli", "--destination-key-id", local,
        )
        assert (moved["SourceKeyId"], moved["KeyId"]) == (arn, local)
        out = cli("decrypt", "--ciphertext-blob", blob_file("moved.bin", moved["CiphertextBlob"]))
        assert (base64.b64decode(out["Plaintext"]), out["KeyId"]) == (b"cli plaintext in the token", local)
        back = cli(
            "re-encrypt", "--ciphertext-blob", blob_file("moved.bin", moved["CiphertextBlob"]),
            "--destination-key-id", arn, "--destination-encryption-context", "app=back",
        )["CiphertextBlob"]
        out = cli("decrypt", "--ciphertext-blob", blob_file("back.bin", back), "--encryption-context", "app=back")
        assert (base64.b64decode(out["Plaintext"]), out["KeyId"]) == (b"cli plaintext in the token", arn)

        # The operator looks into the token: the key, under its ARN.
        hsm.operator_reset("hsm-a", look)
        assert hsm.secret_key_labels("hsm-a", look) == [arn]

        cli("disconnect-custom-key-store", "--custom-key-store-id", store)
        assert cli_state(store)["ConnectionState"] == "DISCONNECTED"
        assert cli("describe-key", "--key-id", arn)["KeyMetadata"]["KeyState"] == "Unavailable"
        r = cli("encrypt", "--key-id", arn, "--plaintext", f"fileb://{plain}", check=False)
        assert r.returncode == 255 and "KMSInvalidStateException" in r.stderr, r.stderr
        cli("update-custom-key-store", "--custom-key-store-id", store, "--key-store-password", look)
        cli("connect-custom-key-store", "--custom-key-store-id", store)
        assert cli_state(store)["ConnectionState"] == "CONNECTED"

        sched = cli("schedule-key-deletion", "--key-id", arn, "--pending-window-in-days", "7")
        assert (sched["KeyState"], sched["PendingWindowInDays"]) == ("PendingDeletion", 7)
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            r = cli("describe-key", "--key-id", arn, check=False)
            if r.returncode != 0:
                assert r.returncode == 255 and "NotFoundException" in r.stderr, r.stderr
                break
            assert time.monotonic() < deadline, "the key was never deleted"
            time.sleep(0.1)
        # KMS rotated the reset password at the reconnect: look again to see the token.
        hsm.operator_reset("hsm-a", "operatorCliKeys2")
        assert hsm.secret_key_labels("hsm-a", "operatorCliKeys2") == []
        cli("disconnect-custom-key-store", "--custom-key-store-id", store)
        cli_state(store)
        cli("delete-custom-key-store", "--custom-key-store-id", store)
        logs = emu.output()
        for secret in (pin, look, "cli plaintext in the token"):
            assert secret not in logs
    finally:
        emu.stop()


def test_cloudhsm_store_and_rotated_password_survive_restarts(tmp_path, monkeypatch):
    """boto3 with --data-dir: a store CONNECTED at the stop is CONNECTED after the
    restart (logged in again with the rotated password, old blobs open); a store
    DISCONNECTED at the stop connects after the restart, which only the rotated
    password can do (the original no longer logs in)."""
    pin = "kmsuserRestart1"
    hsm = Hsm(tmp_path, [("hsm-a", pin)])
    path = hsm.clusters([(CLUSTER_A, "hsm-a", "[1, 1]", "lineage-1", "ACTIVE")])
    monkeypatch.setenv("SOFTHSM2_CONF", hsm.conf)
    data = tmp_path / "data"

    def run():
        return start_emulator(9, "--cloudhsm-clusters", str(path), data_dir=data)

    emu = run()
    try:
        kms = kms_client(emu)
        store = create(kms, "restart", CLUSTER_A, pin)
        assert connect(kms, store)["ConnectionState"] == "CONNECTED"
        arn = kms.create_key(Origin="AWS_CLOUDHSM", CustomKeyStoreId=store)["KeyMetadata"]["Arn"]
        blob = kms.encrypt(KeyId=arn, Plaintext=b"before the restart")["CiphertextBlob"]
    finally:
        emu.stop()
    assert not hsm.user_pin_works("hsm-a", pin), "the password was not rotated"

    emu = run()
    try:
        kms = kms_client(emu)
        assert describe_store(kms, store)["ConnectionState"] == "CONNECTED"
        assert kms.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Enabled"
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"before the restart"
        disconnect(kms, store)
    finally:
        emu.stop()

    emu = run()
    try:
        kms = kms_client(emu)
        assert describe_store(kms, store)["ConnectionState"] == "DISCONNECTED"
        assert kms.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Unavailable"
        s = connect(kms, store)
        assert s["ConnectionState"] == "CONNECTED", s
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"before the restart"
        assert pin not in emu.output()
    finally:
        emu.stop()
