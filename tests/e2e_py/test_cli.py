"""The README walkthrough with the AWS CLI v1 (awscli from PyPI): the exact commands a
new user copies, run against kms-emulator + xks-proxy. Also pins the CLI v1 gotcha:
without `cli_follow_urlparam = false` the CLI tries to download the endpoint URL."""

import base64
import json
import os
import subprocess
import sys

import pytest

from conftest import AKID, PATH, SECRET, WAIT_SECONDS


def aws(emulator, config_file, *args, check=True):
    host, port = emulator.addr
    env = dict(
        os.environ,
        AWS_CONFIG_FILE=str(config_file),
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_ACCESS_KEY_ID="AKIDCLICALLER",
        AWS_SECRET_ACCESS_KEY="cli-caller-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_MAX_ATTEMPTS="1",
    )
    out = subprocess.run(
        [sys.executable, "-m", "awscli", "--endpoint-url", f"http://{host}:{port}", "kms", *args, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )
    if check:
        assert out.returncode == 0, f"aws kms {args}: {out.stderr}"
        return json.loads(out.stdout) if out.stdout.strip() else {}
    return out


@pytest.fixture
def cli_config(tmp_path):
    path = tmp_path / "aws-config"
    path.write_text("[default]\nregion = us-east-1\ncli_follow_urlparam = false\n")
    return path


def test_readme_walkthrough(emulator, cli_config, tmp_path):
    store = aws(
        emulator,
        cli_config,
        "create-custom-key-store",
        "--custom-key-store-name", "cli-store",
        "--custom-key-store-type", "EXTERNAL_KEY_STORE",
        "--xks-proxy-uri-endpoint", "https://xks.test.example",
        "--xks-proxy-uri-path", PATH,
        "--xks-proxy-connectivity", "PUBLIC_ENDPOINT",
        "--xks-proxy-authentication-credential", f"AccessKeyId={AKID},RawSecretAccessKey={SECRET}",
    )["CustomKeyStoreId"]
    aws(emulator, cli_config, "connect-custom-key-store", "--custom-key-store-id", store)
    for _ in range(200):
        s = aws(emulator, cli_config, "describe-custom-key-stores", "--custom-key-store-id", store)
        if s["CustomKeyStores"][0]["ConnectionState"] != "CONNECTING":
            break
    assert s["CustomKeyStores"][0]["ConnectionState"] == "CONNECTED"
    key = aws(
        emulator,
        cli_config,
        "create-key",
        "--origin", "EXTERNAL_KEY_STORE",
        "--custom-key-store-id", store,
        "--xks-key-id", "key-1",
    )["KeyMetadata"]["KeyId"]
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"hello from the AWS CLI")
    ct = aws(
        emulator,
        cli_config,
        "encrypt",
        "--key-id", key,
        "--plaintext", f"fileb://{plain}",
        "--encryption-context", "purpose=readme",
    )["CiphertextBlob"]
    blob = tmp_path / "blob.bin"
    blob.write_bytes(base64.b64decode(ct))
    pt = aws(
        emulator,
        cli_config,
        "decrypt",
        "--ciphertext-blob", f"fileb://{blob}",
        "--encryption-context", "purpose=readme",
    )["Plaintext"]
    assert base64.b64decode(pt) == b"hello from the AWS CLI"
    dk = aws(emulator, cli_config, "generate-data-key", "--key-id", key, "--key-spec", "AES_256")
    assert len(base64.b64decode(dk["Plaintext"])) == 32
    # Errors print "An error occurred (<Code>)" and exit with 255.
    out = aws(emulator, cli_config, "create-key", "--origin", "EXTERNAL_KEY_STORE",
              "--custom-key-store-id", store, "--xks-key-id", "key-1", check=False)
    assert out.returncode == 255
    assert "An error occurred (XksKeyAlreadyInUseException)" in out.stderr


def test_cli_v1_fetches_url_parameters_unless_told_not_to(emulator, tmp_path):
    # https://localhost (nothing listens on 443 here), so the CLI's fetch attempt
    # stays on loopback.
    plain_config = tmp_path / "plain-config"
    plain_config.write_text("[default]\nregion = us-east-1\n")
    out = aws(
        emulator,
        plain_config,
        "create-custom-key-store",
        "--custom-key-store-name", "gotcha",
        "--custom-key-store-type", "EXTERNAL_KEY_STORE",
        "--xks-proxy-uri-endpoint", "https://localhost",
        "--xks-proxy-uri-path", PATH,
        "--xks-proxy-connectivity", "PUBLIC_ENDPOINT",
        "--xks-proxy-authentication-credential", f"AccessKeyId={AKID},RawSecretAccessKey={SECRET}",
        check=False,
    )
    assert out.returncode != 0
    assert "Unable to retrieve https://localhost" in out.stderr
