#!/usr/bin/env bash
# Runs every test of the project, installing what the tests need when it is missing:
#   curl (the curl --aws-sigv4 tests), softhsm2 (the PKCS#11 backend on a real token),
#   python3 + venv with boto3/pytest/awscli (the KMS-emulator end-to-end tests),
#   jq, xxd, uuid-runtime (AWS's XKS conformance client, tests/conformance-client.sh).
#   opensc (pkcs11-tool: an operator's tool changing a token's PIN under the proxy).
#   cargo-fuzz (the fuzz smoke stage; cached in target/tools, see fuzz/README.md).
#   cmake, golang-go (the FIPS build: aws-lc-fips-sys builds the AWS-LC FIPS module with
#   cmake, Go >= 1.17.13 and Perl; bindings are pregenerated, so no libclang).
# Usage: ./tests/run-all.sh        (from anywhere; works on a fresh Debian with Rust)
#
# Installing and preparing stop at the first error. The test stages do not: each one
# runs even when an earlier one failed, and the script ends with the list of failed
# stages and a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\n==> %s\n' "$*"; }

# --- system packages ------------------------------------------------------------------
missing=()
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
command -v softhsm2-util >/dev/null || missing+=(softhsm2)
command -v jq >/dev/null || missing+=(jq)
command -v xxd >/dev/null || missing+=(xxd)
command -v uuidgen >/dev/null || missing+=(uuid-runtime)
command -v pkcs11-tool >/dev/null || missing+=(opensc)
command -v cmake >/dev/null || missing+=(cmake)
command -v go >/dev/null || missing+=(golang-go)
command -v perl >/dev/null || missing+=(perl)
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
venv="$root/target/py-venv"
if [ -f tests/e2e_py/requirements.txt ]; then
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

# --- test stages: every one runs; failures are collected --------------------------------
failed=()
# stage NAME COMMAND...: runs COMMAND (a program or a function; a function must check
# its own steps, since `set -e` does not apply inside a condition) and records failure.
stage() {
  local name=$1 rc=0
  shift
  say "$name"
  "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    failed+=("$name (exit $rc)")
    say "FAILED: $name (exit $rc); continuing"
  fi
}
# skip NAME WHY: a stage that cannot run counts as failed.
skip() {
  failed+=("$1 (not run: $2)")
  say "NOT RUN: $1 ($2)"
}

# Rust: unit, integration and end-to-end tests; every test binary runs even when one
# fails (--no-fail-fast). `bench` adds the load generator xks-bench and the tests that
# run it (tests/bench/: bench_smoke, soak); the product is built without it below.
stage "cargo test" cargo test --all-targets --locked --features bench --no-fail-fast
# The software-only build (no PKCS#11 backend, no cryptoki).
stage "cargo test --no-default-features" \
  cargo test --all-targets --locked --no-default-features --features bench --no-fail-fast

# Coverage-guided fuzzing (fuzz/README.md): builds the cargo-fuzz targets (libFuzzer +
# AddressSanitizer, stable toolchain) and runs each 20 s from its committed seeds.
stage "fuzz smoke (every target 20 s)" tests/fuzz-smoke.sh

# The stages below drive the built binaries. Built last, with the default features, so
# target/debug/xks-proxy has the PKCS#11 backend whatever an earlier stage built.
say "cargo build --bins"
bins_ok=1
cargo build --locked --bins || bins_ok=0
export XKS_PROXY_BIN="$root/target/debug/xks-proxy" KMS_EMULATOR_BIN="$root/target/debug/kms-emulator"

softhsm_e2e() (
  env=$(tests/softhsm/setup.sh "$root/target/softhsm-e2e" xks-e2e) || exit 1
  eval "$env"
  export SOFTHSM2_CONF XKS_TEST_PKCS11_MODULE XKS_TEST_SOFTHSM_TOKEN_LABEL XKS_TEST_SOFTHSM_USER_PIN
  KMS_E2E_PROXY_BACKEND=softhsm "$venv/bin/python" -m pytest -q tests/e2e_py/test_lifecycle.py
)

if [ "$bins_ok" = 0 ]; then
  failed+=("cargo build --bins")
  skip "boto3 / AWS CLI end-to-end tests" "cargo build --bins failed"
  skip "boto3 lifecycle on SoftHSM" "cargo build --bins failed"
  skip "AWS XKS conformance client" "cargo build --bins failed"
  skip "Prometheus: alert rules, live scrape, dashboard queries" "cargo build --bins failed"
else
  if [ -f tests/e2e_py/requirements.txt ]; then
    stage "boto3 / AWS CLI end-to-end tests" "$venv/bin/python" -m pytest -q tests/e2e_py
    stage "boto3 lifecycle on SoftHSM (a token per proxy)" softhsm_e2e
  fi
  # software keystore, SoftHSM token, and mTLS (with the client's negative mTLS tests).
  stage "AWS XKS conformance client (software, softhsm, mtls)" tests/conformance-client.sh
  # deploy/prometheus rules (promtool check + test) and the Grafana dashboard's queries,
  # against a real Prometheus scraping the proxy (installs Debian's prometheus).
  stage "Prometheus: alert rules, live scrape, dashboard queries" tests/prometheus.sh
fi

# FIPS 140-3 mode (README "Compliance"), kept lean: the proxy binary, the library's unit
# tests (SigV4 and spec vectors, keystore, AES-GCM on the FIPS module) and one
# integration binary (tests/fips.rs: approved TLS parameters against openssl s_client and
# rustls clients, the config switch, what the proxy says, the request path), then the
# conformance client against that binary (software keystore, without and with mTLS: the
# client certificate checked on the FIPS module; ~10 s each). Built after the
# stages above so it does not replace target/debug/xks-proxy (default features) they use;
# the FIPS binary is copied aside first.
fips_stage() {
  local out=${CARGO_TARGET_DIR:-$root/target}
  cargo build --locked --features fips --bin xks-proxy || return 1
  mkdir -p "$out/fips" && cp "$out/debug/xks-proxy" "$out/fips/xks-proxy" || return 1
  "$out/fips/xks-proxy" --version | grep -q 'FIPS 140-3 mode' || return 1
  cargo test --locked --features fips --lib --test fips || return 1
  XKS_PROXY_BIN="$out/fips/xks-proxy" tests/conformance-client.sh software mtls
}
stage "FIPS 140-3 build: TLS policy, fips tests, conformance client (software, mtls)" fips_stage

if [ ${#failed[@]} -gt 0 ]; then
  say "FAILED stages:"
  printf '  - %s\n' "${failed[@]}"
  exit 1
fi
say "all tests passed"
