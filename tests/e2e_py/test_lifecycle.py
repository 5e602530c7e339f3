"""The external-key-store lifecycle end to end with boto3: kms-emulator calling the
real xks-proxy, from CreateCustomKeyStore to DeleteCustomKeyStore."""

import signal
import time

import pytest
from botocore.exceptions import ClientError

from conftest import (
    AKID,
    AKID2,
    ENDPOINT,
    PATH,
    SECRET,
    SECRET2,
    connect,
    create_store,
    describe_store,
    error_code,
)

EC = {"purpose": "pytest", "tenant": "a"}


def wait_for(fn, seconds=10):
    """Retries fn until it returns a truthy value (bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_full_lifecycle(kms, proxy, proxy_setup, emulator):
    # Create → DISCONNECTED; the secret is never returned.
    store = create_store(kms, "pytest-store")
    s = describe_store(kms, store)
    assert s["ConnectionState"] == "DISCONNECTED"
    assert s["CustomKeyStoreType"] == "EXTERNAL_KEY_STORE"
    assert s["XksProxyConfiguration"] == {
        "Connectivity": "PUBLIC_ENDPOINT",
        "AccessKeyId": AKID,
        "UriEndpoint": ENDPOINT,
        "UriPath": PATH,
    }
    assert "ConnectionErrorCode" not in s
    assert SECRET not in str(kms.describe_custom_key_stores())
    # botocore's paginator works with the emulator's markers.
    pages = list(kms.get_paginator("describe_custom_key_stores").paginate(PaginationConfig={"PageSize": 1}))
    assert sum(len(p["CustomKeyStores"]) for p in pages) == 1

    # Connect → CONNECTED.
    s = connect(kms, store)
    assert s["ConnectionState"] == "CONNECTED", s
    assert "ConnectionErrorCode" not in s

    # A KMS key backed by the external key, and an ordinary one.
    md = kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="key-1")["KeyMetadata"]
    assert md["Origin"] == "EXTERNAL_KEY_STORE"
    assert md["KeyState"] == "Enabled"
    assert md["XksKeyConfiguration"] == {"Id": "key-1"}
    assert md["CustomKeyStoreId"] == store
    xks = md["Arn"]
    local = kms.create_key(Description="ordinary")["KeyMetadata"]["Arn"]
    assert xks in [k["KeyArn"] for k in kms.list_keys()["Keys"]]

    # Encrypt / Decrypt / GenerateDataKey / GenerateDataKeyWithoutPlaintext / ReEncrypt.
    ct = kms.encrypt(KeyId=xks, Plaintext=b"hello from boto3", EncryptionContext=EC)
    assert ct["KeyId"] == xks and ct["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    pt = kms.decrypt(CiphertextBlob=ct["CiphertextBlob"], EncryptionContext=EC)
    assert pt["Plaintext"] == b"hello from boto3" and pt["KeyId"] == xks
    with pytest.raises(ClientError) as e:
        kms.decrypt(CiphertextBlob=ct["CiphertextBlob"], EncryptionContext={"purpose": "wrong"})
    assert error_code(e) == "KMSInvalidStateException"
    dk = kms.generate_data_key(KeyId=xks, KeySpec="AES_256", EncryptionContext=EC)
    assert len(dk["Plaintext"]) == 32
    assert kms.decrypt(CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=EC)["Plaintext"] == dk["Plaintext"]
    wp = kms.generate_data_key_without_plaintext(KeyId=xks, NumberOfBytes=64)
    assert "Plaintext" not in wp
    assert len(kms.decrypt(CiphertextBlob=wp["CiphertextBlob"])["Plaintext"]) == 64
    moved = kms.re_encrypt(
        CiphertextBlob=ct["CiphertextBlob"], SourceEncryptionContext=EC, DestinationKeyId=local
    )
    assert moved["SourceKeyId"] == xks and moved["KeyId"] == local
    home = kms.re_encrypt(CiphertextBlob=moved["CiphertextBlob"], DestinationKeyId=xks, DestinationEncryptionContext=EC)
    assert kms.decrypt(CiphertextBlob=home["CiphertextBlob"], EncryptionContext=EC)["Plaintext"] == b"hello from boto3"

    # Rotate the proxy credentials while connected: the proxy holds both.
    kms.update_custom_key_store(
        CustomKeyStoreId=store,
        XksProxyAuthenticationCredential={"AccessKeyId": AKID2, "RawSecretAccessKey": SECRET2},
    )
    assert describe_store(kms, store)["XksProxyConfiguration"]["AccessKeyId"] == AKID2
    assert kms.decrypt(CiphertextBlob=ct["CiphertextBlob"], EncryptionContext=EC)["Plaintext"] == b"hello from boto3"

    # Disable the external key in the proxy (keystore edit or disabled_keys + SIGHUP) →
    # the exact error.
    proxy_setup.set_enabled("key-1", False)
    proxy.signal(signal.SIGHUP)

    def rejected():
        try:
            kms.encrypt(KeyId=xks, Plaintext=b"x")
            return None
        except ClientError as err:
            return err

    err = wait_for(rejected)
    assert err.response["Error"]["Code"] == "KMSInvalidStateException"
    assert err.response["Error"]["Message"] == (
        "The external key associated with this KMS key in an external key store is not enabled "
        "in the external key manager. Enable the external key in the external key manager and "
        "retry the request."
    )
    assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    proxy_setup.set_enabled("key-1", True)
    proxy.signal(signal.SIGHUP)

    def works():
        try:
            return kms.encrypt(KeyId=xks, Plaintext=b"x")
        except ClientError:
            return None

    wait_for(works)

    # Disconnect → Unavailable → reconnect → works.
    kms.disconnect_custom_key_store(CustomKeyStoreId=store)
    assert describe_store(kms, store)["ConnectionState"] == "DISCONNECTED"
    md = kms.describe_key(KeyId=xks)["KeyMetadata"]
    assert md["KeyState"] == "Unavailable" and md["Enabled"] is False
    with pytest.raises(ClientError) as e:
        kms.encrypt(KeyId=xks, Plaintext=b"x")
    assert error_code(e) == "KMSInvalidStateException"
    assert connect(kms, store)["ConnectionState"] == "CONNECTED"
    assert kms.describe_key(KeyId=xks)["KeyMetadata"]["KeyState"] == "Enabled"
    assert kms.decrypt(CiphertextBlob=ct["CiphertextBlob"], EncryptionContext=EC)["Plaintext"] == b"hello from boto3"

    # Schedule deletion; the store cannot be deleted until the key is gone.
    sched = kms.schedule_key_deletion(KeyId=xks, PendingWindowInDays=7)
    assert sched["KeyState"] == "PendingDeletion" and sched["PendingWindowInDays"] == 7
    with pytest.raises(ClientError) as e:
        kms.delete_custom_key_store(CustomKeyStoreId=store)
    assert error_code(e) == "CustomKeyStoreInvalidStateException"  # still connected
    kms.disconnect_custom_key_store(CustomKeyStoreId=store)
    with pytest.raises(ClientError) as e:
        kms.delete_custom_key_store(CustomKeyStoreId=store)
    assert error_code(e) == "CustomKeyStoreHasCMKsException"

    def gone():
        try:
            kms.describe_key(KeyId=xks)
            return False
        except ClientError as err:
            return err.response["Error"]["Code"] == "NotFoundException"

    wait_for(gone)  # 7 days of 100 ms (--deletion-day-length)
    kms.delete_custom_key_store(CustomKeyStoreId=store)
    with pytest.raises(kms.exceptions.CustomKeyStoreNotFoundException):
        kms.describe_custom_key_stores(CustomKeyStoreId=store)


def test_request_ids_and_modelled_exceptions(kms):
    r = kms.list_keys()
    assert len(r["ResponseMetadata"]["RequestId"]) == 36
    # Modelled errors arrive as typed boto3 exceptions.
    with pytest.raises(kms.exceptions.NotFoundException):
        kms.describe_key(KeyId="11111111-2222-3333-4444-555555555555")
    with pytest.raises(kms.exceptions.CustomKeyStoreNotFoundException):
        kms.connect_custom_key_store(CustomKeyStoreId="cks-0000000000000000a")


def test_state_survives_an_emulator_restart(tmp_path, proxy_setup, proxy):
    from conftest import kms_client, start_emulator

    data = tmp_path / "emulator-state"
    first = start_emulator(proxy_setup.port, data_dir=data)
    kms = kms_client(first)
    store = create_store(kms, "durable")
    connect(kms, store)
    key = kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="key-1")["KeyMetadata"]["Arn"]
    blob = kms.encrypt(KeyId=key, Plaintext=b"survives", EncryptionContext=EC)["CiphertextBlob"]
    first.stop()
    second = start_emulator(proxy_setup.port, data_dir=data)
    try:
        kms = kms_client(second)
        assert describe_store(kms, store)["ConnectionState"] == "CONNECTED"
        assert kms.decrypt(CiphertextBlob=blob, EncryptionContext=EC)["Plaintext"] == b"survives"
    finally:
        second.stop()


def test_https_listener_and_caller_signature_checks(tmp_path, proxy_setup, proxy):
    """The HTTPS listener with the dev CA (boto3 verify=), and --verify-client-sigv4
    checking real botocore signatures."""
    import os

    import boto3
    from botocore.config import Config

    from conftest import CERTS, REGION, Proc

    creds = tmp_path / "callers"
    creds.write_text("# access key id, secret\nAKIDPYTHONCALLER python-caller-secret\n")
    args = [
        os.environ["KMS_EMULATOR_BIN"],
        "--tls-listen", "127.0.0.1:0",
        "--tls-cert", str(CERTS / "server-ecdsa.pem"),
        "--tls-key", str(CERTS / "server-ecdsa.key"),
        "--verify-client-sigv4",
        "--client-credentials-file", str(creds),
        "--principal", "AKIDPYTHONCALLER=arn:aws:iam::111122223333:role/pytest",
        "--xks-health-interval", "0",
    ]
    e = Proc(args, "listening on https://")
    try:
        port = e.addr[1]

        def client(secret):
            return boto3.client(
                "kms",
                endpoint_url=f"https://localhost:{port}",
                verify=str(CERTS / "ca.pem"),
                region_name=REGION,
                aws_access_key_id="AKIDPYTHONCALLER",
                aws_secret_access_key=secret,
                config=Config(retries={"total_max_attempts": 1}),
            )

        good = client("python-caller-secret")
        key = good.create_key()["KeyMetadata"]["Arn"]
        blob = good.encrypt(KeyId=key, Plaintext=b"over TLS")["CiphertextBlob"]
        assert good.decrypt(CiphertextBlob=blob)["Plaintext"] == b"over TLS"
        with pytest.raises(ClientError) as err:
            client("wrong-secret").list_keys()
        assert error_code(err) == "InvalidSignatureException"
        stranger = boto3.client(
            "kms",
            endpoint_url=f"https://localhost:{port}",
            verify=str(CERTS / "ca.pem"),
            region_name=REGION,
            aws_access_key_id="AKIDSTRANGER",
            aws_secret_access_key="x",
            config=Config(retries={"total_max_attempts": 1}),
        )
        with pytest.raises(ClientError) as err:
            stranger.list_keys()
        assert error_code(err) == "UnrecognizedClientException"
    finally:
        e.stop()
