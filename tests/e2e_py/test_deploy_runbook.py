"""deploy/README.md (the deployment runbook): every command in it is one that works.

- Every ``sh`` block is valid bash (``bash -n``).
- Every ``xks-proxy`` command names a real subcommand and only flags its ``--help`` lists.
- Every ``aws`` command names a real operation, with only parameters of that operation
  (checked against botocore's service models, i.e. what the AWS CLI itself accepts).
- The blocks marked ``<!-- runbook-test: NAME -->`` run for real, in order, in one bash
  session under ``set -euo pipefail``: the openssl CSR, the key/credential/config
  commands against a config made from deploy/systemd/xks-proxy.toml, then the AWS CLI
  steps (create, connect, CreateKey, encrypt/decrypt, credential rotation) against
  ``kms-emulator``, which calls a real ``xks-proxy serve``.

What cannot run here (systemctl, docker, kubectl apply, CloudFormation in an account) is
checked statically by the first three tests, and the files those commands use are linted
by tests/deploy/deploy_lint.rs.
"""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import botocore.session
import pytest
from botocore import xform_name

REPO = Path(__file__).resolve().parents[2]
README = REPO / "deploy" / "README.md"
CERTS = REPO / "certs"
HOST = "xks.test.example"  # a name the dev certificate carries
WAIT = 60


def blocks():
    """[(marker or None, language, text)] for every fenced block of the runbook."""
    out, marker, lang, buf = [], None, None, None
    pending = None
    for line in README.read_text().splitlines():
        if buf is None:
            m = re.match(r"<!-- runbook-test: ([a-z-]+) -->", line.strip())
            if m:
                pending = m.group(1)
                continue
            if line.startswith("```"):
                lang, buf, marker, pending = line[3:].strip(), [], pending, None
            elif line.strip():
                pending = None
        elif line.startswith("```"):
            out.append((marker, lang, "\n".join(buf) + "\n"))
            buf = None
        else:
            buf.append(line)
    assert buf is None, "unterminated code block in deploy/README.md"
    return out


def shell_blocks():
    return [b for b in blocks() if b[1] in ("sh", "bash")]


def commands(text):
    """Logical command lines of a shell block: continuations joined, comments dropped;
    each line split on ; && || | $( and ( into simple commands."""
    text = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        for part in re.split(r"\$\(|&&|\|\||[;|()]", line):
            part = part.strip()
            if part:
                out.append(part)
    return out


def words(cmd):
    try:
        return shlex.split(cmd)
    except ValueError:
        return cmd.split()


def test_the_runbook_has_the_sections_the_issue_asks_for():
    text = README.read_text()
    for needle in [
        "PUBLIC_ENDPOINT",
        "VPC_ENDPOINT_SERVICE",
        "certificate",
        "xks-proxy credentials new",
        "kms-config",
        "create-custom-key-store",
        "connect-custom-key-store",
        "Rotating credentials without downtime",
        "Rotating certificates without downtime",
        "Scaling",
        "Troubleshooting",
    ]:
        assert needle in text, needle
    # The troubleshooting table covers every XKS ConnectionErrorCode.
    for code in [
        "INVALID_CREDENTIALS",
        "NETWORK_ERRORS",
        "INTERNAL_ERROR",
        "XKS_PROXY_ACCESS_DENIED",
        "XKS_PROXY_INVALID_CONFIGURATION",
        "XKS_PROXY_INVALID_RESPONSE",
        "XKS_PROXY_INVALID_TLS_CONFIGURATION",
        "XKS_PROXY_NOT_REACHABLE",
        "XKS_PROXY_TIMED_OUT",
        "XKS_VPC_ENDPOINT_SERVICE_NOT_FOUND",
        "XKS_VPC_ENDPOINT_SERVICE_INVALID_CONFIGURATION",
    ]:
        assert f"`{code}`" in text, f"troubleshooting table lacks {code}"
    marked = [m for m, _, _ in blocks() if m]
    assert marked == ["certificate", "prepare", "kms", "rotate"], marked


def test_every_shell_block_is_valid_bash():
    sh = shell_blocks()
    assert len(sh) >= 10
    for _, _, text in sh:
        r = subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True)
        assert r.returncode == 0, f"{r.stderr}\n---\n{text}"


def test_every_xks_proxy_command_exists_with_its_flags():
    binary = os.environ["XKS_PROXY_BIN"]
    seen = 0
    for _, _, text in shell_blocks():
        for cmd in commands(text):
            w = words(cmd)
            while w and (w[0] in ("sudo", "exec", "umask") or re.match(r"^[A-Z_]+=", w[0]) or w[0] == "077"):
                w = w[1:]
            # `xks-proxy-admin` (section 4) forwards its arguments to xks-proxy.
            if not w or not (w[0] in ("xks-proxy", "xks-proxy-admin") or w[0].endswith("/xks-proxy")):
                continue
            args = w[1:]
            if not args or args[0] == "$@":
                continue
            sub = []
            for a in args:
                if a.startswith("-") or a.startswith(">"):
                    break
                sub.append(a)
            flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
            r = subprocess.run([binary, *sub, "--help"], capture_output=True, text=True)
            assert r.returncode == 0, f"`xks-proxy {' '.join(sub)}` is not a command: {r.stderr}"
            for f in flags:
                assert re.search(rf"(^|\s){re.escape(f)}[\s,=<]", r.stdout), (
                    f"`xks-proxy {' '.join(sub)}` has no {f}:\n{r.stdout}"
                )
            seen += 1
    assert seen >= 10, seen


# The AWS CLI's own options, and its customized (non-API) commands with their options.
GLOBAL = {"--query", "--output", "--region", "--profile", "--endpoint-url", "--cli-input-json", "--no-cli-pager"}
CUSTOM = {
    ("cloudformation", "deploy"): {"--stack-name", "--template-file", "--parameter-overrides", "--capabilities", "--tags"},
    ("configure", "set"): set(),
}
SERVICES = {"kms": "kms", "ec2": "ec2", "cloudformation": "cloudformation", "elbv2": "elbv2"}


def test_every_aws_command_matches_the_service_model():
    session = botocore.session.get_session()
    seen = 0
    for _, _, text in shell_blocks():
        for cmd in commands(text):
            w = words(cmd)
            if "aws" not in w:
                continue
            w = w[w.index("aws") + 1:]
            service, op = w[0], w[1]
            flags = {a.split("=", 1)[0] for a in w[2:] if a.startswith("--")}
            seen += 1
            if (service, op) in CUSTOM:
                extra = flags - CUSTOM[(service, op)] - GLOBAL
                assert not extra, f"aws {service} {op}: unknown {extra}"
                continue
            assert service in SERVICES, f"aws {service}: add its model to this test"
            model = session.get_service_model(SERVICES[service])
            ops = {xform_name(o, "-"): o for o in model.operation_names}
            assert op in ops, f"aws {service} {op} is not an operation"
            shape = model.operation_model(ops[op]).input_shape
            members = {"--" + xform_name(m, "-") for m in (shape.members if shape else {})}
            # Booleans also have a --no- form.
            members |= {"--no-" + m[2:] for m in members}
            extra = flags - members - GLOBAL
            assert not extra, f"aws {service} {op}: unknown parameters {extra}"
            required = {"--" + xform_name(m, "-") for m in (shape.required_members if shape else [])}
            if "--cli-input-json" not in flags:
                missing = required - flags
                assert not missing, f"aws {service} {op}: missing required {missing}"
    assert seen >= 12, seen


# --------------------------------------------------------------------------- end to end


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, fn, limit=WAIT):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def ping(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
            return s.recv(64).split(b" ")[1] == b"200"
    except OSError:
        return False


def run_bash(script, env, cwd, limit=120):
    r = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=limit,
    )
    assert r.returncode == 0, f"runbook step failed ({r.returncode}):\n{script}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    return r.stdout


def test_the_runbook_steps_work_against_the_kms_emulator(tmp_path):
    marked = {m: t for m, _, t in blocks() if m}
    proxy_bin = os.environ["XKS_PROXY_BIN"]
    emu_bin = os.environ["KMS_EMULATOR_BIN"]
    work = tmp_path / "work"
    work.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "xks-proxy").symlink_to(proxy_bin)
    # The runbook polls KMS every 15 s, as real KMS takes minutes; the emulator connects
    # at once, so waits here are cut short (the commands are what is tested).
    (bindir / "sleep").write_text("#!/bin/sh\nexec /bin/sleep 0.2\n")
    (bindir / "sleep").chmod(0o755)

    # The operator's credential and master key, as section 3 makes them, and the
    # credential the rotation (section 9) will add.
    cred = json.loads(subprocess.run([proxy_bin, "credentials", "new", "--json"], check=True,
                                     capture_output=True, text=True).stdout)
    new = json.loads(subprocess.run([proxy_bin, "credentials", "new", "--json"], check=True,
                                    capture_output=True, text=True).stdout)
    master = subprocess.run([proxy_bin, "keys", "generate-master-key"], check=True,
                            capture_output=True, text=True).stdout.strip()

    # deploy/systemd/xks-proxy.toml with this machine's paths and ports filled in.
    port, ping_port = free_port(), free_port()
    root = tmp_path / "root"
    config = (REPO / "deploy/systemd/xks-proxy.toml").read_text()
    config = config.replace('"0.0.0.0:443"', f'"127.0.0.1:{port}"')
    config = config.replace('"0.0.0.0:8080"', f'"127.0.0.1:{ping_port}"')
    config = config.replace('"127.0.0.1:9464"', '"127.0.0.1:0"')
    config = config.replace('"/etc/xks-proxy/tls/fullchain.pem"', f'"{CERTS / "server-ecdsa.pem"}"')
    config = config.replace('"/etc/xks-proxy/tls/privkey.pem"', f'"{CERTS / "server-ecdsa.key"}"')
    config = config.replace('"/var/lib/xks-proxy/', f'"{root}/')
    # Secrets are files (section 4): the master key, and the credential's secret in a
    # file named after its access key id.
    secrets = tmp_path / "secrets"
    config = config.replace('"/etc/xks-proxy/secrets/', f'"{secrets}/')
    assert 'access_key_id = "EXAMPLEEXAMPLEEXAMPL"' in config and "sigv4-EXAMPLEEXAMPLEEXAMPL" in config
    config = config.replace("EXAMPLEEXAMPLEEXAMPL", cred["AccessKeyId"])
    root.mkdir()
    secrets.mkdir(mode=0o700)
    (secrets / "master-key").write_text(master + "\n")
    (secrets / f"sigv4-{cred['AccessKeyId']}").write_text(cred["RawSecretAccessKey"] + "\n")
    for f in secrets.iterdir():
        f.chmod(0o400)
    config_path = tmp_path / "xks-proxy.toml"
    config_path.write_text(config)

    env = {
        "PATH": f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "XKS_HOST": HOST,
        "XKS_PREFIX": "/prod",
        "XKS_CONFIG": str(config_path),
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AKIDRUNBOOKTEST",
        "AWS_SECRET_ACCESS_KEY": "runbook-test-secret",
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
    }

    # Section 2: key + CSR for the endpoint name.
    run_bash(marked["certificate"], env, work)
    csr = subprocess.run(["openssl", "req", "-in", str(work / "xks.csr"), "-noout", "-text"],
                         check=True, capture_output=True, text=True).stdout
    assert f"DNS:{HOST}" in csr

    # Section 3: keys, checks, the KMS proxy configuration file. KMS here is the
    # emulator, which trusts the test CA (--xks-ca-bundle), not a public one: doctor is
    # told so, as the runbook says for a staging setup with a private CA.
    prepare = marked["prepare"].replace(
        'doctor --config "$XKS_CONFIG" --endpoint "$XKS_HOST"',
        f'doctor --config "$XKS_CONFIG" --endpoint "$XKS_HOST" --kms-ca-bundle {CERTS / "ca.pem"}',
    )
    assert prepare != marked["prepare"], "the runbook's doctor line changed"
    out = run_bash(prepare, env, work)
    assert "app-key-1" in out and "OK" in out
    console = json.loads((work / "kms-proxy-config.json").read_text())
    assert console["XksProxyUriPath"] == "/prod/kms/xks/v1"
    assert console["XksProxyAuthenticationCredential"]["AccessKeyId"] == cred["AccessKeyId"]

    # The proxy (what systemd would start) and KMS (the emulator).
    procs = []
    try:
        log = open(tmp_path / "proxy.log", "w")
        proxy = subprocess.Popen([proxy_bin, "serve", "--config", str(config_path)],
                                 env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log)
        procs.append(proxy)
        wait_for("proxy /ping", lambda: ping(ping_port))
        emu = subprocess.Popen(
            [emu_bin, "--listen", "127.0.0.1:0", "--xks-health-interval", "0",
             "--xks-ca-bundle", str(CERTS / "ca.pem"), "--xks-resolve", f"{HOST}=127.0.0.1:{port}",
             "--xks-timeout-ms", "2000"],
            stdout=subprocess.PIPE, stderr=open(tmp_path / "emulator.log", "w"), text=True)
        procs.append(emu)
        line = emu.stdout.readline()
        m = re.search(r"listening on (http://\S+)", line)
        assert m, line
        env["AWS_ENDPOINT_URL_KMS"] = m.group(1)

        # Section 8, then section 9 in the same shell (it reuses $CKS_ID). Between them,
        # the operator's manual step 1 of the rotation: the new secret in a file named
        # after its id (written beside, renamed in), a second entry naming it, reload.
        new_file = secrets / f"sigv4-{new['AccessKeyId']}"
        hook = tmp_path / "add-credential.sh"
        hook.write_text(
            "#!/bin/sh\nset -e\n"
            f"(umask 077; printf '%s\\n' '{new['RawSecretAccessKey']}' > '{new_file}.new')\n"
            f"mv '{new_file}.new' '{new_file}'\n"
            f"printf '\\n[[keystores.credentials]]\\naccess_key_id = \"{new['AccessKeyId']}\"\\n"
            f"secret_file = \"{new_file}\"\\n' >> '{config_path}'\n"
            f"kill -HUP {proxy.pid}\n"
            f"for i in $(seq 1 100); do grep -q 'configuration reloaded' '{tmp_path / 'proxy.log'}' && exit 0; /bin/sleep 0.1; done\n"
            "echo 'proxy did not reload' >&2; exit 1\n"
        )
        hook.chmod(0o755)
        script = marked["kms"] + f"\n'{hook}'\n" + marked["rotate"]
        out = run_bash(script, env, work)
        lines = out.split()
        assert "CONNECTED" in out, out
        assert "hello, external key store" in out, out
        assert lines[-1] == new["AccessKeyId"], f"KMS did not switch to the new credential:\n{out}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
    assert procs[0].returncode == 0, (tmp_path / "proxy.log").read_text()
