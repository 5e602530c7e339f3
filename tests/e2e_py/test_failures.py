"""Failure paths with boto3, each asserted by exception name (Create/Update, CreateKey,
crypto) and by ConnectionErrorCode (Connect)."""

import signal
import time

import pytest
from botocore.exceptions import ClientError

from conftest import (
    AKID,
    AKID2,
    PATH_B,
    SECRET,
    SECRET2,
    ProxySetup,
    connect,
    create_store,
    error_code,
    kms_client,
    start_emulator,
)


def disconnect(kms, store):
    kms.disconnect_custom_key_store(CustomKeyStoreId=store)


def test_wrong_credentials(kms, proxy, proxy_setup):
    with pytest.raises(kms.exceptions.XksProxyIncorrectAuthenticationCredentialException):
        create_store(kms, "wrong-secret", secret=SECRET2)
    # A store using the second credential; then the proxy drops that credential.
    store = create_store(kms, "rotating", akid=AKID2, secret=SECRET2)
    proxy_setup.credentials = [(AKID, "XKS_SECRET_A")]
    proxy_setup.write()
    proxy.signal(signal.SIGHUP)
    for _ in range(100):
        s = connect(kms, store)
        if s["ConnectionState"] == "FAILED":
            break
        disconnect(kms, store)  # the reload had not happened yet
    assert s["ConnectionState"] == "FAILED"
    assert s["ConnectionErrorCode"] == "INVALID_CREDENTIALS"
    # A FAILED store must be disconnected before it can connect again.
    with pytest.raises(kms.exceptions.CustomKeyStoreInvalidStateException):
        kms.connect_custom_key_store(CustomKeyStoreId=store)
    disconnect(kms, store)
    assert "ConnectionErrorCode" not in kms.describe_custom_key_stores(CustomKeyStoreId=store)["CustomKeyStores"][0]
    # Updating to credentials the proxy rejects is refused; the old ones stay.
    with pytest.raises(kms.exceptions.XksProxyIncorrectAuthenticationCredentialException):
        kms.update_custom_key_store(
            CustomKeyStoreId=store,
            XksProxyAuthenticationCredential={"AccessKeyId": AKID, "RawSecretAccessKey": SECRET2},
        )
    kms.update_custom_key_store(
        CustomKeyStoreId=store,
        XksProxyAuthenticationCredential={"AccessKeyId": AKID, "RawSecretAccessKey": SECRET},
    )
    assert connect(kms, store)["ConnectionState"] == "CONNECTED"


def test_wrong_path(kms, proxy, proxy_setup):
    with pytest.raises(kms.exceptions.XksProxyInvalidConfigurationException):
        create_store(kms, "wrong-path", path="/nobody/kms/xks/v1")
    store = create_store(kms, "moving")
    # The proxy comes back serving another prefix.
    proxy.stop()
    proxy_setup.prefixes = ["/tenant-z"]
    proxy_setup.write()
    moved = proxy_setup.start()
    try:
        s = connect(kms, store)
        assert s["ConnectionState"] == "FAILED"
        assert s["ConnectionErrorCode"] == "XKS_PROXY_INVALID_CONFIGURATION"
    finally:
        moved.stop()


def test_proxy_down(kms, proxy):
    store = create_store(kms, "soon-down")
    proxy.stop()
    with pytest.raises(kms.exceptions.XksProxyUriUnreachableException):
        create_store(kms, "down", path="/tenant-a/other/kms/xks/v1")
    s = connect(kms, store)
    assert s["ConnectionState"] == "FAILED"
    assert s["ConnectionErrorCode"] == "XKS_PROXY_NOT_REACHABLE"


def test_proxy_too_slow(tmp_path):
    """A key manager slower than KMS waits: key operations time out after one retry.
    Margins are wide both ways, so load on the machine cannot flip an outcome: the key
    manager takes 500 ms, the proxy's own backend deadline is raised to 3 s, the
    patient emulator that makes the store and key waits 5 s, and the hasty one gives
    up after 150 ms, which nothing can beat since the key manager sleeps 500 ms. A
    frozen proxy (accepts connections, never answers) times out the health check too:
    XKS_PROXY_TIMED_OUT."""
    setup = ProxySetup(tmp_path, latency_ms=500, extra_toml="\n[limits]\nbackend_deadline_ms = 3000\n")
    setup.create_key("key-1")
    setup.create_key("key-2")
    proxy = setup.start()
    try:  # the proxy is stopped whatever fails
        state = tmp_path / "emulator-state"
        patient = start_emulator(setup.port, "--xks-timeout-ms", "5000", data_dir=state)
        try:
            kms = kms_client(patient)
            store = None
            for _ in range(100):  # until the proxy's first deep health check is done
                try:
                    store = create_store(kms, "slow")
                    break
                except kms.exceptions.XksProxyUriUnreachableException:
                    time.sleep(0.1)
            assert store, "the slow proxy never reported healthy"
            assert connect(kms, store)["ConnectionState"] == "CONNECTED"
            key = kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="key-1")["KeyMetadata"]["Arn"]
        finally:
            patient.stop()
        hasty = start_emulator(setup.port, "--xks-timeout-ms", "150", data_dir=state)
        try:
            kms = kms_client(hasty)
            with pytest.raises(ClientError) as e:
                kms.encrypt(KeyId=key, Plaintext=b"x")
            assert error_code(e) == "KMSInvalidStateException"
            assert "did not respond in time" in e.value.response["Error"]["Message"]
            with pytest.raises(ClientError) as e:
                kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="key-2")
            assert error_code(e) == "CustomKeyStoreInvalidStateException"
            assert "did not respond in time" in e.value.response["Error"]["Message"]
            disconnect(kms, store)
            proxy.signal(signal.SIGSTOP)
            s = connect(kms, store)
            assert s["ConnectionState"] == "FAILED"
            assert s["ConnectionErrorCode"] == "XKS_PROXY_TIMED_OUT"
            with pytest.raises(kms.exceptions.XksProxyUriUnreachableException):
                create_store(kms, "frozen", path="/tenant-b/kms/xks/v1")
        finally:
            hasty.stop()
    finally:
        proxy.stop()


def test_external_key_checks(kms):
    store = create_store(kms, "keys")
    connect(kms, store)
    with pytest.raises(kms.exceptions.XksKeyNotFoundException):
        kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="no-such-key")
    with pytest.raises(kms.exceptions.XksKeyInvalidConfigurationException):
        kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="key-enc")
    kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="key-1")
    with pytest.raises(kms.exceptions.XksKeyAlreadyInUseException):
        kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="key-1")
    disconnect(kms, store)
    with pytest.raises(kms.exceptions.CustomKeyStoreInvalidStateException):
        kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="key-1")


def test_a_store_cannot_use_another_tenants_key(kms):
    # Tenants are isolated: /tenant-b's store (its credentials are valid there) asks for
    # key-1, which belongs to /tenant-a. The proxy answers 404 KeyNotFoundException, as
    # for a key that does not exist, which KMS reports as XksKeyNotFoundException.
    other = create_store(kms, "other-tenant", path=PATH_B)
    assert connect(kms, other)["ConnectionState"] == "CONNECTED"
    with pytest.raises(kms.exceptions.XksKeyNotFoundException):
        kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=other, XksKeyId="key-1")
    own = create_store(kms, "own-tenant")
    assert connect(kms, own)["ConnectionState"] == "CONNECTED"
    kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=own, XksKeyId="key-1")


# The software keystore can produce neither an all-UNAVAILABLE health report nor an
# AES-128 key, so these two use the signature-checking test responder (conftest).


def test_health_all_unavailable(responder, responder_kms):
    kms = responder_kms
    responder.health = ["UNAVAILABLE", "UNAVAILABLE"]
    with pytest.raises(kms.exceptions.XksProxyUriUnreachableException):
        create_store(kms, "unhealthy")
    responder.health = ["ACTIVE"]
    store = create_store(kms, "healthy-at-first")
    responder.health = ["UNAVAILABLE"]
    s = connect(kms, store)
    assert s["ConnectionState"] == "FAILED"
    assert s["ConnectionErrorCode"] == "XKS_PROXY_NOT_REACHABLE"
    assert responder.requests[-1][1]["requestMetadata"]["kmsOperation"] == "ConnectCustomKeyStore"


def test_aes128_external_key(responder, responder_kms):
    kms = responder_kms
    responder.keys["aes128"] = {"keySpec": "AES_128", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"}
    store = create_store(kms, "aes128")
    assert connect(kms, store)["ConnectionState"] == "CONNECTED"
    with pytest.raises(kms.exceptions.XksKeyInvalidConfigurationException) as e:
        kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="aes128")
    assert "AES" in e.value.response["Error"]["Message"]
    md = kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="key-1")["KeyMetadata"]
    assert md["KeyState"] == "Enabled"
    assert responder.requests[-1][1]["requestMetadata"]["kmsOperation"] == "CreateKey"


def test_throttling_per_store(tmp_path, proxy_setup, proxy):
    emulator = start_emulator(proxy_setup.port, "--xks-store-rps", "2")
    try:
        kms = kms_client(emulator)
        store = create_store(kms, "quota")
        connect(kms, store)
        key = kms.create_key(Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId=store, XksKeyId="key-1")["KeyMetadata"]["Arn"]
        codes = []
        for _ in range(6):
            try:
                kms.encrypt(KeyId=key, Plaintext=b"x")
                codes.append("ok")
            except ClientError as err:
                codes.append(err.response["Error"]["Code"])
                assert err.response["ResponseMetadata"]["HTTPStatusCode"] == 400
        assert "ThrottlingException" in codes, codes
    finally:
        emulator.stop()
