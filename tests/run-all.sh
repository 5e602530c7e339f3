#!/usr/bin/env bash
# Runs every test of the project, installing what the tests need when it is missing:
#   curl (the curl --aws-sigv4 tests), softhsm2 (the PKCS#11 backend on a real token),
#   python3 + venv with boto3/pytest/awscli (the KMS-emulator end-to-end tests).
# Usage: ./tests/run-all.sh        (from anywhere; works on a fresh Debian with Rust)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\n==> %s\n' "$*"; }

# --- system packages ------------------------------------------------------------------
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
command -v softhsm2-util >/dev/null || missing+=(softhsm2)
command -v python3 >/dev/null || missing+=(python3 python3-venv)
if command -v python3 >/dev/null && ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  missing+=(python3-venv)
fi
# Empty array safe under set -u (bash < 4.4 treats "${a[@]}" of an empty array as unset).
tests/apt-install.sh ${missing[@]+"${missing[@]}"}

# --- SoftHSMv2: a throw-away token directory for this run --------------------------------
say "preparing SoftHSMv2"
rm -rf "$root/target/softhsm" "$root/target/softhsm-e2e"
eval "$(tests/softhsm/setup.sh "$root/target/softhsm")"
export SOFTHSM2_CONF

# --- Python test dependencies (boto3, pytest, awscli) -----------------------------------
if [ -f tests/e2e_py/requirements.txt ]; then
  venv="$root/target/py-venv"
  if [ ! -x "$venv/bin/python" ] || ! cmp -s tests/e2e_py/requirements.txt "$venv/.requirements"; then
    say "installing Python test dependencies"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r tests/e2e_py/requirements.txt
    cp tests/e2e_py/requirements.txt "$venv/.requirements"
  fi
fi

# --- Deployment test tools (haproxy, systemd-analyze, linters in their own venv) ---------
say "deploy test tools (haproxy, systemd-analyze, linters)"
tests/deploy/install-tools.sh

# --- Rust: unit, integration and end-to-end tests ----------------------------------------
say "cargo test"
cargo test --all-targets --locked

if [ -f tests/e2e_py/requirements.txt ]; then
  say "boto3 / AWS CLI end-to-end tests"
  cargo build --locked --bins
  export XKS_PROXY_BIN="$root/target/debug/xks-proxy" KMS_EMULATOR_BIN="$root/target/debug/kms-emulator"
  "$venv/bin/python" -m pytest -q tests/e2e_py
  say "boto3 lifecycle again with the proxy on SoftHSM (a token per proxy)"
  (
    eval "$(tests/softhsm/setup.sh "$root/target/softhsm-e2e" xks-e2e)"
    export SOFTHSM2_CONF XKS_TEST_PKCS11_MODULE XKS_TEST_SOFTHSM_TOKEN_LABEL XKS_TEST_SOFTHSM_USER_PIN
    KMS_E2E_PROXY_BACKEND=softhsm "$venv/bin/python" -m pytest -q tests/e2e_py/test_lifecycle.py
  )
fi
say "all tests passed"
