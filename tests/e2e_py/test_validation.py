"""Every validation, uniqueness and per-state rule of the six custom-key-store
operations, checked server-side (botocore's client-side validation is off, so
invalid values reach the emulator)."""

import pytest
from botocore.exceptions import ClientError

from conftest import AKID, ENDPOINT, PATH, PATH_B, SECRET, connect, create_store, error_code

CRED = {"AccessKeyId": AKID, "RawSecretAccessKey": SECRET}
VPC_SERVICE = "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0"


def xks(**overrides):
    req = {
        "CustomKeyStoreName": "v",
        "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
        "XksProxyUriEndpoint": ENDPOINT,
        "XksProxyUriPath": PATH,
        "XksProxyConnectivity": "PUBLIC_ENDPOINT",
        "XksProxyAuthenticationCredential": CRED,
    }
    for k, v in overrides.items():
        if v is None:
            req.pop(k, None)
        else:
            req[k] = v
    return req


def vpc(name, endpoint, service):
    return xks(
        CustomKeyStoreName=name,
        XksProxyUriEndpoint=endpoint,
        XksProxyUriPath="/kms/xks/v1",
        XksProxyConnectivity="VPC_ENDPOINT_SERVICE",
        XksProxyVpcEndpointServiceName=service,
    )


def expect(kms, code, fn, **kwargs):
    with pytest.raises(ClientError) as e:
        fn(**kwargs)
    assert error_code(e) == code, e.value.response
    return e.value.response["Error"]["Message"]


BAD_CREATE = [
    ({"CustomKeyStoreName": ""}, "customKeyStoreName"),
    ({"CustomKeyStoreName": "n" * 257}, "customKeyStoreName"),
    ({"CustomKeyStoreName": None}, "customKeyStoreName"),
    ({"CustomKeyStoreType": "SOMETHING"}, "customKeyStoreType"),
    ({"XksProxyUriEndpoint": "https://xks.test.example:8443"}, "xksProxyUriEndpoint"),
    ({"XksProxyUriEndpoint": "http://xks.test.example"}, "xksProxyUriEndpoint"),
    ({"XksProxyUriEndpoint": "https://x.io/path"}, "xksProxyUriEndpoint"),
    ({"XksProxyUriEndpoint": "https://a"}, "xksProxyUriEndpoint"),
    ({"XksProxyUriEndpoint": "https://" + "a" * 121}, "xksProxyUriEndpoint"),
    ({"XksProxyUriEndpoint": None}, "xksProxyUriEndpoint"),
    ({"XksProxyUriPath": "/kms/xks/v"}, "xksProxyUriPath"),
    ({"XksProxyUriPath": "/tenant/kms/xks/v123"}, "xksProxyUriPath"),
    ({"XksProxyUriPath": "/tenant.a/kms/xks/v1"}, "xksProxyUriPath"),
    ({"XksProxyUriPath": "tenant/kms/xks/v1"}, "xksProxyUriPath"),
    ({"XksProxyUriPath": "/" + "p" * 120 + "/kms/xks/v1"}, "xksProxyUriPath"),
    ({"XksProxyUriPath": None}, "xksProxyUriPath"),
    ({"XksProxyConnectivity": "PRIVATE"}, "xksProxyConnectivity"),
    ({"XksProxyConnectivity": None}, "xksProxyConnectivity"),
    ({"XksProxyAuthenticationCredential": None}, "xksProxyAuthenticationCredential"),
    ({"XksProxyAuthenticationCredential": {"AccessKeyId": "AKIASHORT", "RawSecretAccessKey": SECRET}}, "accessKeyId"),
    ({"XksProxyAuthenticationCredential": {"AccessKeyId": "A" * 31, "RawSecretAccessKey": SECRET}}, "accessKeyId"),
    ({"XksProxyAuthenticationCredential": {"AccessKeyId": "AKIA0189PYTHONCREDENT", "RawSecretAccessKey": SECRET}}, "accessKeyId"),
    ({"XksProxyAuthenticationCredential": {"AccessKeyId": AKID, "RawSecretAccessKey": "s" * 42}}, "rawSecretAccessKey"),
    ({"XksProxyAuthenticationCredential": {"AccessKeyId": AKID, "RawSecretAccessKey": "s" * 65}}, "rawSecretAccessKey"),
    ({"XksProxyAuthenticationCredential": {"AccessKeyId": AKID, "RawSecretAccessKey": "-" * 50}}, "rawSecretAccessKey"),
    ({"XksProxyAuthenticationCredential": {"AccessKeyId": AKID}}, "rawSecretAccessKey"),
    ({"XksProxyAuthenticationCredential": {"RawSecretAccessKey": SECRET}}, "accessKeyId"),
    ({"XksProxyConnectivity": "VPC_ENDPOINT_SERVICE"}, "xksProxyVpcEndpointServiceName"),
    ({"XksProxyVpcEndpointServiceName": VPC_SERVICE}, "xksProxyVpcEndpointServiceName"),
    ({"XksProxyConnectivity": "VPC_ENDPOINT_SERVICE", "XksProxyVpcEndpointServiceName": "com.amazonaws.vpce.bad"}, "xksProxyVpcEndpointServiceName"),
    ({"XksProxyConnectivity": "VPC_ENDPOINT_SERVICE", "XksProxyVpcEndpointServiceName": VPC_SERVICE, "XksProxyVpcEndpointServiceOwner": "12345"}, "xksProxyVpcEndpointServiceOwner"),
    ({"CloudHsmClusterId": "cluster-234567abcdefg"}, "cloudHsmClusterId"),
    ({"KeyStorePassword": "kmsuser-password"}, "keyStorePassword"),
]


@pytest.mark.parametrize("overrides,member", BAD_CREATE)
def test_create_rejects_invalid_members(kms_raw, overrides, member):
    msg = expect(kms_raw, "ValidationException", kms_raw.create_custom_key_store, **xks(**overrides))
    assert member in msg
    assert SECRET not in msg and AKID not in msg, "sensitive values are never echoed"


def test_cloudhsm_stores_fail_cleanly(kms_raw):
    expect(
        kms_raw,
        "CloudHsmClusterNotFoundException",
        kms_raw.create_custom_key_store,
        CustomKeyStoreName="hsm",
        CloudHsmClusterId="cluster-234567abcdefg",
        TrustAnchorCertificate="-----BEGIN CERTIFICATE-----",
        KeyStorePassword="kmsuser-password",
    )


def test_uniqueness_and_the_limit_of_ten(kms_raw):
    kms = kms_raw
    create_store(kms, "first")
    expect(kms, "CustomKeyStoreNameInUseException", kms.create_custom_key_store, **xks(CustomKeyStoreName="first"))
    expect(kms, "XksProxyUriInUseException", kms.create_custom_key_store, **xks(CustomKeyStoreName="second"))
    # PUBLIC stores may share an endpoint when their paths differ.
    create_store(kms, "second", path=PATH_B)
    # A VPC store needs its own endpoint and its own endpoint service.
    expect(kms, "XksProxyUriEndpointInUseException", kms.create_custom_key_store, **vpc("v", ENDPOINT, VPC_SERVICE))
    kms.create_custom_key_store(**vpc("v0", "https://vpc0.example.com", VPC_SERVICE))
    expect(
        kms,
        "XksProxyVpcEndpointServiceInUseException",
        kms.create_custom_key_store,
        **vpc("v1", "https://vpc1.example.com", VPC_SERVICE),
    )
    expect(
        kms,
        "XksProxyUriEndpointInUseException",
        kms.create_custom_key_store,
        **xks(CustomKeyStoreName="pub", XksProxyUriEndpoint="https://vpc0.example.com"),
    )
    for i in range(3, 10):
        kms.create_custom_key_store(
            **vpc(f"v{i}", f"https://vpc{i}.example.com", f"com.amazonaws.vpce.us-east-1.vpce-svc-{i:04d}")
        )
    expect(
        kms,
        "LimitExceededException",
        kms.create_custom_key_store,
        **vpc("v11", "https://vpc11.example.com", "com.amazonaws.vpce.us-east-1.vpce-svc-0011"),
    )
    # Describe: pagination with Limit/Marker/NextMarker/Truncated.
    seen, marker = [], None
    for _ in range(20):
        kwargs = {"Limit": 3}
        if marker:
            kwargs["Marker"] = marker
        page = kms.describe_custom_key_stores(**kwargs)
        seen += page["CustomKeyStores"]
        if not page["Truncated"]:
            assert "NextMarker" not in page
            break
        marker = page["NextMarker"]
    assert len(seen) == 10 and len({s["CustomKeyStoreId"] for s in seen}) == 10
    vpc_entry = next(s for s in seen if s["CustomKeyStoreName"] == "v0")
    assert vpc_entry["XksProxyConfiguration"]["VpcEndpointServiceName"] == VPC_SERVICE
    assert vpc_entry["XksProxyConfiguration"]["VpcEndpointServiceOwner"] == "111122223333"


def test_describe_rules(kms_raw):
    kms = kms_raw
    store = create_store(kms, "d")
    expect(kms, "InvalidMarkerException", kms.describe_custom_key_stores, Marker="not-a-marker")
    expect(kms, "ValidationException", kms.describe_custom_key_stores, Limit=0)
    expect(kms, "ValidationException", kms.describe_custom_key_stores, Limit=1001)
    expect(kms, "ValidationException", kms.describe_custom_key_stores, CustomKeyStoreId=store, CustomKeyStoreName="d")
    expect(kms, "CustomKeyStoreNotFoundException", kms.describe_custom_key_stores, CustomKeyStoreName="nope")
    expect(kms, "CustomKeyStoreNotFoundException", kms.describe_custom_key_stores, CustomKeyStoreId="cks-nope")
    expect(kms, "ValidationException", kms.describe_custom_key_stores, CustomKeyStoreId="")


def test_per_state_rules(kms_raw):
    kms = kms_raw
    store = create_store(kms, "states")
    # DISCONNECTED: disconnect is refused; every update and delete is allowed.
    expect(kms, "CustomKeyStoreInvalidStateException", kms.disconnect_custom_key_store, CustomKeyStoreId=store)
    for op in (kms.connect_custom_key_store, kms.disconnect_custom_key_store, kms.delete_custom_key_store):
        expect(kms, "CustomKeyStoreNotFoundException", op, CustomKeyStoreId="cks-00000000000000000")
        expect(kms, "ValidationException", op, CustomKeyStoreId="")
    connect(kms, store)
    # CONNECTED: connect again is accepted; name/credential/path may change, the rest not.
    kms.connect_custom_key_store(CustomKeyStoreId=store)
    kms.update_custom_key_store(CustomKeyStoreId=store, NewCustomKeyStoreName="states-renamed")
    kms.update_custom_key_store(CustomKeyStoreId=store, XksProxyAuthenticationCredential=CRED)
    for field in (
        {"XksProxyUriEndpoint": "https://other.example.com"},
        {"XksProxyConnectivity": "VPC_ENDPOINT_SERVICE", "XksProxyUriEndpoint": "https://o.example.com", "XksProxyVpcEndpointServiceName": VPC_SERVICE},
    ):
        expect(kms, "CustomKeyStoreInvalidStateException", kms.update_custom_key_store, CustomKeyStoreId=store, **field)
    expect(kms, "CustomKeyStoreInvalidStateException", kms.delete_custom_key_store, CustomKeyStoreId=store)
    # Update validation.
    expect(
        kms,
        "ValidationException",
        kms.update_custom_key_store,
        CustomKeyStoreId=store,
        XksProxyAuthenticationCredential={"AccessKeyId": AKID},
    )
    expect(kms, "ValidationException", kms.update_custom_key_store, CustomKeyStoreId=store, XksProxyUriPath="/bad")
    expect(kms, "ValidationException", kms.update_custom_key_store, CustomKeyStoreId=store, KeyStorePassword="password1")
    expect(kms, "ValidationException", kms.update_custom_key_store, CustomKeyStoreId=store, NewCustomKeyStoreName="")
    other = create_store(kms, "other", path=PATH_B)
    expect(
        kms,
        "CustomKeyStoreNameInUseException",
        kms.update_custom_key_store,
        CustomKeyStoreId=other,
        NewCustomKeyStoreName="states-renamed",
    )
    expect(kms, "XksProxyUriInUseException", kms.update_custom_key_store, CustomKeyStoreId=other, XksProxyUriPath=PATH)
    # Switching connectivity (DISCONNECTED only): VPC needs an endpoint and a service;
    # PUBLIC accepts an empty service name.
    expect(
        kms,
        "ValidationException",
        kms.update_custom_key_store,
        CustomKeyStoreId=other,
        XksProxyConnectivity="VPC_ENDPOINT_SERVICE",
    )
    kms.update_custom_key_store(
        CustomKeyStoreId=other,
        XksProxyConnectivity="VPC_ENDPOINT_SERVICE",
        XksProxyUriEndpoint="https://vpc.example.com",
        XksProxyVpcEndpointServiceName=VPC_SERVICE,
    )
    kms.update_custom_key_store(
        CustomKeyStoreId=other,
        XksProxyConnectivity="PUBLIC_ENDPOINT",
        XksProxyUriEndpoint=ENDPOINT,
        XksProxyVpcEndpointServiceName="",
    )
    cfg = kms.describe_custom_key_stores(CustomKeyStoreId=other)["CustomKeyStores"][0]["XksProxyConfiguration"]
    assert cfg["Connectivity"] == "PUBLIC_ENDPOINT" and "VpcEndpointServiceName" not in cfg
    # Deleting an empty, disconnected store works.
    kms.disconnect_custom_key_store(CustomKeyStoreId=store)
    kms.delete_custom_key_store(CustomKeyStoreId=store)


def test_key_and_crypto_input_rules(kms_raw):
    kms = kms_raw
    key = kms.create_key()["KeyMetadata"]["Arn"]
    expect(kms, "ValidationException", kms.encrypt, KeyId=key, Plaintext=b"x" * 4097)
    expect(kms, "ValidationException", kms.encrypt, KeyId=key, Plaintext=b"")
    expect(kms, "InvalidKeyUsageException", kms.encrypt, KeyId=key, Plaintext=b"x", EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    expect(kms, "ValidationException", kms.generate_data_key, KeyId=key, NumberOfBytes=1025)
    expect(kms, "ValidationException", kms.generate_data_key, KeyId=key, NumberOfBytes=16, KeySpec="AES_128")
    expect(kms, "DryRunOperationException", kms.encrypt, KeyId=key, Plaintext=b"x", DryRun=True)
    expect(kms, "InvalidCiphertextException", kms.decrypt, CiphertextBlob=b"not a blob")
    expect(kms, "NotFoundException", kms.encrypt, KeyId="alias/missing", Plaintext=b"x")
    expect(kms, "InvalidArnException", kms.describe_key, KeyId="arn:aws:kms:broken")
    expect(kms, "ValidationException", kms.schedule_key_deletion, KeyId=key, PendingWindowInDays=6)
    expect(kms, "KMSInvalidStateException", kms.cancel_key_deletion, KeyId=key)
    kms.disable_key(KeyId=key)
    expect(kms, "DisabledException", kms.encrypt, KeyId=key, Plaintext=b"x")
    expect(kms, "ValidationException", kms.create_key, XksKeyId="k")
    expect(kms, "ValidationException", kms.create_key, Origin="EXTERNAL_KEY_STORE")
    expect(kms, "CustomKeyStoreNotFoundException", kms.create_key, Origin="EXTERNAL_KEY_STORE", CustomKeyStoreId="cks-00000000000000000", XksKeyId="k")
