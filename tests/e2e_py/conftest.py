"""Harness for the boto3 / AWS CLI end-to-end tests of kms-emulator + xks-proxy.

Starts the real binaries (paths from XKS_PROXY_BIN and KMS_EMULATOR_BIN) on
127.0.0.1, with the proxy backend chosen by KMS_E2E_PROXY_BACKEND (``software``, the
default, or ``softhsm`` with the variables tests/softhsm/setup.sh exports), so the
same tests run against every key manager. Also a tiny XKS responder for the two
answers the software keystore cannot produce (an all-UNAVAILABLE health report and
an AES-128 key); it checks every request's SigV4 signature like a proxy.

Every wait is bounded; every process is killed at the end of its test.
"""

import hashlib
import hmac
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

REPO = Path(__file__).resolve().parents[2]
CERTS = REPO / "certs"
XKS_HOST = "xks.test.example"
ENDPOINT = "https://xks.test.example"
PREFIX = "/tenant-a"
PATH = "/tenant-a/kms/xks/v1"
# The test proxy also serves these prefixes (same credentials), for tests that need
# several stores on one proxy. Tenants are isolated: only the first prefix serves the
# keys the tests create; these have none (allowed_keys = []).
PATH_B = "/tenant-b/kms/xks/v1"
PATH_C = "/tenant-c/kms/xks/v1"
REGION = "us-east-1"
AKID = "AKIAPYTHONCREDENTIAL23"
SECRET = "pythonTestSecretAbcdefghijklmnopqrstuvwxyz0123456789+/="
AKID2 = "AKIAPYTHONROTATEDCRED2"
SECRET2 = "PythonRotatedSecret/Abcdefghijklmnopqrstuvwxyz0123456789"
WAIT_SECONDS = 60


def pytest_configure(config):
    missing = [v for v in ("XKS_PROXY_BIN", "KMS_EMULATOR_BIN") if not os.environ.get(v)]
    if missing:
        raise pytest.UsageError(
            f"{' and '.join(missing)} not set: point them at the built binaries, e.g.\n"
            "  cargo build --bins && XKS_PROXY_BIN=target/debug/xks-proxy "
            "KMS_EMULATOR_BIN=target/debug/kms-emulator pytest tests/e2e_py\n"
            "(tests/run-all.sh does this)"
        )
    for var in ("XKS_PROXY_BIN", "KMS_EMULATOR_BIN"):
        path = Path(os.environ[var])
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise pytest.UsageError(f"{var}={path} is not an executable file")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose output is captured; killed by stop()."""

    def __init__(self, args, marker, env=None):
        self.args = args
        self.lines = []
        self.addr = None
        self._found = threading.Event()
        self.p = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        pattern = re.compile(re.escape(marker) + r"([0-9.]+:\d+)")
        for stream in (self.p.stdout, self.p.stderr):
            threading.Thread(target=self._read, args=(stream, pattern), daemon=True).start()
        if not self._found.wait(WAIT_SECONDS):
            self.stop()
            raise RuntimeError(f"{args[0]} never printed {marker!r}:\n{self.output()}")

    def _read(self, stream, pattern):
        for line in stream:
            self.lines.append(line.rstrip("\n"))
            m = pattern.search(line)
            if m and self.addr is None:
                host, port = m.group(1).rsplit(":", 1)
                self.addr = (host, int(port))
                self._found.set()

    def output(self):
        return "\n".join(self.lines)

    def signal(self, sig):
        self.p.send_signal(sig)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGCONT)
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


class ProxySetup:
    """One proxy: directory, config, environment and external keys. The port is
    fixed at creation so the proxy can be restarted at the same address."""

    def __init__(self, tmp_path, latency_ms=0, backend=None, extra_toml=""):
        self.dir = tmp_path / f"proxy-{free_port()}"
        self.dir.mkdir()
        self.port = free_port()
        self.latency_ms = latency_ms
        self.prefixes = [PREFIX, "/tenant-b", "/tenant-c"]
        self.keys = []  # created with create_key; served by the first prefix only
        self.backend = backend or os.environ.get("KMS_E2E_PROXY_BACKEND", "software")
        self.env = dict(os.environ, XKS_SECRET_A=SECRET, XKS_SECRET_B=SECRET2, RUST_LOG="info")
        if self.backend == "software":
            master = subprocess.run(
                [os.environ["XKS_PROXY_BIN"], "keys", "generate-master-key"],
                check=True,
                capture_output=True,
                text=True,
                timeout=WAIT_SECONDS,
            ).stdout.strip()
            self.env["XKS_MASTER_KEY"] = master
            self.backend_toml = (
                'kind = "software"\nkeystore = "keystore.json"\n'
                f'master_key_env = "XKS_MASTER_KEY"\nsimulated_latency_ms = {latency_ms}\n'
            )
        elif self.backend == "softhsm":
            for var in ("XKS_TEST_PKCS11_MODULE", "XKS_TEST_SOFTHSM_TOKEN_LABEL", "XKS_TEST_SOFTHSM_USER_PIN"):
                if not os.environ.get(var):
                    raise pytest.UsageError(f"KMS_E2E_PROXY_BACKEND=softhsm needs {var} (tests/softhsm/setup.sh)")
            pin = os.environ["XKS_TEST_SOFTHSM_USER_PIN"]
            self.env["XKS_HSM_PIN"] = pin
            # A token of its own per proxy (same SoftHSM config; a new process sees it),
            # so tests that create the same key ids never meet each other's keys.
            token = f"e2e-{self.port}"
            subprocess.run(
                ["softhsm2-util", "--init-token", "--free", "--label", token,
                 "--so-pin", "12345678", "--pin", pin],
                check=True, capture_output=True, timeout=WAIT_SECONDS,
            )
            self.backend_toml = (
                'kind = "pkcs11"\n'
                f'module = "{os.environ["XKS_TEST_PKCS11_MODULE"]}"\n'
                f'token_label = "{token}"\n'
                'user_pin_env = "XKS_HSM_PIN"\n'
            )
        else:
            raise pytest.UsageError(f"unknown KMS_E2E_PROXY_BACKEND={self.backend}")
        self.credentials = [(AKID, "XKS_SECRET_A"), (AKID2, "XKS_SECRET_B")]
        self.disabled_keys = []  # PKCS#11: the config's disabled_keys list
        self.extra_toml = extra_toml  # more top-level tables, e.g. [limits]
        self.write()

    @property
    def config(self):
        return self.dir / "proxy.toml"

    def write(self):
        creds = "".join(
            f'\n[[keystores.credentials]]\naccess_key_id = "{akid}"\nsecret_env = "{env}"\n'
            for akid, env in self.credentials
        )
        keystores = "".join(
            f'\n[[keystores]]\npath_prefix = "{p}"\nallowed_keys = {json.dumps(self.keys if i == 0 else [])}\n{creds}'
            for i, p in enumerate(self.prefixes)
        )
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\n\n'
            f'[server.tls]\ncertificate = "{CERTS / "server-ecdsa.pem"}"\n'
            f'private_key = "{CERTS / "server-ecdsa.key"}"\n\n'
            f"[backend]\n{self.backend_toml}{self.disabled_toml()}{keystores}{self.extra_toml}"
        )

    def disabled_toml(self):
        if self.backend != "softhsm":
            return ""
        return "disabled_keys = [" + ", ".join(f'"{k}"' for k in self.disabled_keys) + "]\n"

    def set_enabled(self, label, enabled):
        """Enables or disables an external key the way each backend's operator does: the
        CLI for the software keystore, the config's disabled_keys list for an HSM. The
        running proxy applies it on SIGHUP."""
        if self.backend == "software":
            self.cli("keys", "enable" if enabled else "disable", "--label", label)
            return
        self.disabled_keys = [k for k in self.disabled_keys if k != label]
        if not enabled:
            self.disabled_keys.append(label)
        self.write()

    def cli(self, *args):
        out = subprocess.run(
            [os.environ["XKS_PROXY_BIN"], *args, "--config", str(self.config)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
        )
        assert out.returncode == 0, f"xks-proxy {args}: {out.stderr}"
        return out.stdout

    def create_key(self, label, usage="encrypt,decrypt"):
        # Assign it to the first prefix first, so the config always names every key.
        if label not in self.keys:
            self.keys.append(label)
            self.write()
        self.cli("keys", "create", "--label", label, "--usage", usage)

    def start(self):
        return Proc(
            [os.environ["XKS_PROXY_BIN"], "serve", "--config", str(self.config)],
            "listening on https://",
            env=self.env,
        )


def start_emulator(proxy_port, *extra, data_dir=None):
    """kms-emulator on 127.0.0.1:0, dialling the proxy's port for xks.test.example."""
    args = [
        os.environ["KMS_EMULATOR_BIN"],
        "--listen",
        "127.0.0.1:0",
        "--xks-health-interval",
        "0",
        "--xks-ca-bundle",
        str(CERTS / "ca.pem"),
        "--xks-resolve",
        f"{XKS_HOST}=127.0.0.1:{proxy_port}",
        *extra,
    ]
    if data_dir:
        args += ["--data-dir", str(data_dir)]
    env = {k: v for k, v in os.environ.items() if k != "KMS_EMULATOR_XKS_RESOLVE"}
    env["RUST_LOG"] = "debug"
    return Proc(args, "listening on http://", env=env)


def kms_client(emulator, validate=True):
    """A boto3 KMS client for the emulator. validate=False turns off botocore's
    client-side checks so the server-side validation can be tested; retries are off
    so every failure is seen once."""
    host, port = emulator.addr
    return boto3.client(
        "kms",
        endpoint_url=f"http://{host}:{port}",
        region_name=REGION,
        aws_access_key_id="AKIDPYTHONCALLER",
        aws_secret_access_key="python-caller-secret",
        config=Config(parameter_validation=validate, retries={"total_max_attempts": 1, "mode": "standard"}),
    )


def error_code(exc_info):
    return exc_info.value.response["Error"]["Code"]


def create_store(kms, name, path=PATH, akid=AKID, secret=SECRET, **extra):
    return kms.create_custom_key_store(
        CustomKeyStoreName=name,
        CustomKeyStoreType="EXTERNAL_KEY_STORE",
        XksProxyUriEndpoint=ENDPOINT,
        XksProxyUriPath=path,
        XksProxyConnectivity="PUBLIC_ENDPOINT",
        XksProxyAuthenticationCredential={"AccessKeyId": akid, "RawSecretAccessKey": secret},
        **extra,
    )["CustomKeyStoreId"]


def describe_store(kms, store_id):
    return kms.describe_custom_key_stores(CustomKeyStoreId=store_id)["CustomKeyStores"][0]


def connect(kms, store_id):
    """ConnectCustomKeyStore, then poll (bounded) until the attempt ends."""
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        s = describe_store(kms, store_id)
        if s["ConnectionState"] != "CONNECTING":
            return s
        time.sleep(0.05)
    raise AssertionError("store stayed CONNECTING")


@pytest.fixture
def proxy_setup(tmp_path):
    setup = ProxySetup(tmp_path)
    setup.create_key("key-1")
    setup.create_key("key-enc", "encrypt")
    return setup


@pytest.fixture
def proxy(proxy_setup):
    p = proxy_setup.start()
    yield p
    p.stop()


@pytest.fixture
def emulator(proxy_setup, proxy):
    e = start_emulator(proxy_setup.port, "--deletion-day-length", "100ms")
    yield e
    e.stop()
    log = e.output()
    assert SECRET not in log and SECRET2 not in log, "an XKS secret reached the emulator's log"


@pytest.fixture
def kms(emulator):
    return kms_client(emulator)


@pytest.fixture
def kms_raw(emulator):
    return kms_client(emulator, validate=False)


# --- A tiny XKS responder --------------------------------------------------------------


def sigv4_signature(secret, path, host, amz_date, region, body):
    """SigV4 as KMS signs XKS calls (SignedHeaders host;x-amz-date), written out
    independently of both the emulator and botocore."""
    canonical = "\n".join(
        [
            "POST",
            path,
            "",
            f"host:{host}\nx-amz-date:{amz_date}\n",
            "host;x-amz-date",
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{amz_date[:8]}/{region}/kms-xks-proxy/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + secret).encode()
    for part in (amz_date[:8], region, "kms-xks-proxy", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class Responder:
    """Answers canned XKS responses over TLS for things the software keystore cannot
    produce: `health` is the list of healthStatus values, `keys` maps an external key
    ID to its GetKeyMetadata answer."""

    def __init__(self):
        self.health = ["ACTIVE"]
        self.keys = {"key-1": {"keySpec": "AES_256", "keyUsage": ["ENCRYPT", "DECRYPT"], "keyStatus": "ENABLED"}}
        self.requests = []
        responder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                responder.requests.append((self.path, json.loads(body or b"{}")))
                m = re.fullmatch(
                    r"AWS4-HMAC-SHA256 Credential=([^/]+)/\d{8}/([^/]+)/kms-xks-proxy/aws4_request, "
                    r"SignedHeaders=host;x-amz-date, Signature=([0-9a-f]{64})",
                    self.headers.get("Authorization", ""),
                )
                if not m or m.group(1) != AKID:
                    return self.reply(401, {"errorName": "AuthenticationFailedException"})
                want = sigv4_signature(
                    SECRET, self.path, self.headers["Host"], self.headers["X-Amz-Date"], m.group(2), body
                )
                if not hmac.compare_digest(want, m.group(3)):
                    return self.reply(401, {"errorName": "AuthenticationFailedException"})
                if self.path == PATH + "/health":
                    return self.reply(
                        200,
                        {
                            "xksProxyFleetSize": 1,
                            "xksProxyVendor": "pytest",
                            "xksProxyModel": "responder 1",
                            "ekmVendor": "pytest",
                            "ekmFleetDetails": [
                                {"id": f"ekm-{i}", "model": "m", "healthStatus": s}
                                for i, s in enumerate(responder.health)
                            ],
                        },
                    )
                m = re.fullmatch(re.escape(PATH) + r"/keys/([^/]+)/metadata", self.path)
                if m and m.group(1) in responder.keys:
                    return self.reply(200, responder.keys[m.group(1)])
                if m:
                    return self.reply(404, {"errorName": "KeyNotFoundException"})
                return self.reply(404, {"errorName": "InvalidUriPathException"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(CERTS / "server-ecdsa.pem", CERTS / "server-ecdsa.key")
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def responder():
    r = Responder()
    yield r
    r.stop()


@pytest.fixture
def responder_kms(responder):
    e = start_emulator(responder.port)
    yield kms_client(e)
    e.stop()


def python_executable():
    return sys.executable
