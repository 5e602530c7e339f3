#!/usr/bin/env bash
# tests/conformance-client.sh [MODE...]
#
# Runs AWS's XKS proxy conformance client (vendored, unmodified, in
# ../shared/xks-test-client; see its PROVENANCE.md) against real `xks-proxy serve`
# processes on 127.0.0.1. MODE is any of (default: all three, in this order):
#
#   software  `-a` (49 tests) against the software keystore
#   softhsm   `-a` (49 tests) against a SoftHSMv2 token (PKCS#11 backend)
#   mtls      `-a` plus the client's negative mTLS tests (51) against a proxy that
#             requires a client certificate (certs/kms-client.pem, CA certs/ca.pem)
#
# Keys are made with the proxy's own CLI (`xks-proxy keys create --usage ...`): one
# ENCRYPT+DECRYPT key, an encrypt-only, a decrypt-only and an "impotent" one (no usage).
# A mode passes only if the client prints "All N tests PASSED." with the expected N
# (its exit code is not a verdict). Failing tests are printed with their curl output;
# SECURE carries --show-error besides --cacert so a curl-level failure (e.g. "curl: (92)")
# is in that output rather than an empty answer (it cannot turn a failure into a pass).
#
# Everything of a run lives in target/conformance/MODE/ (config, keystore or token,
# proxy.log, client.log) and is kept for diagnosis. Needs: curl, jq, xxd, uuidgen,
# openssl; softhsm2 for the softhsm mode (tests/run-all.sh installs them).
#
# Environment:
#   XKS_PROXY_BIN        the proxy binary (default: target/debug/xks-proxy, which must
#                        be built with the default features for the softhsm mode)
#   XKS_TEST_CLIENT_DIR  the client (default: ../shared/xks-test-client)
#   CONFORMANCE_TIMEOUT  seconds one client run may take (default 600)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root=$(pwd)

bin=${XKS_PROXY_BIN:-$root/target/debug/xks-proxy}
client_src=${XKS_TEST_CLIENT_DIR:-$root/../shared/xks-test-client}
client_timeout=${CONFORMANCE_TIMEOUT:-600}
work="$root/target/conformance"
start_timeout=60 # seconds for a proxy to log its address and answer /ping
prefix="xks-conformance/a"

die() {
    echo "conformance-client: $*" >&2
    exit 2
}

[[ -x "$bin" ]] || die "$bin is not an executable (cargo build --locked --bins)"
[[ -x "$client_src/test-xks-proxy" ]] || die "no conformance client at $client_src"
for cmd in curl jq xxd uuidgen openssl timeout; do
    command -v "$cmd" >/dev/null || die "$cmd not found (Debian: curl jq xxd uuid-runtime openssl coreutils)"
done

modes=("$@")
[[ ${#modes[@]} -gt 0 ]] || modes=(software softhsm mtls)
for m in "${modes[@]}"; do
    case $m in
    software | softhsm | mtls) ;;
    *) die "unknown mode '$m' (software, softhsm, mtls)" ;;
    esac
done

# --- the proxy process: one at a time, always stopped on exit ----------------------------
proxy_pid=""
stop_proxy() {
    [[ -n "$proxy_pid" ]] || return 0
    if kill -0 "$proxy_pid" 2>/dev/null; then
        kill -TERM "$proxy_pid" 2>/dev/null
        # Bounded: SIGTERM drains within shutdown_grace_ms (2 s here); then SIGKILL.
        local i
        for ((i = 0; i < 100; i++)); do
            kill -0 "$proxy_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$proxy_pid" 2>/dev/null && kill -KILL "$proxy_pid" 2>/dev/null
    fi
    wait "$proxy_pid" 2>/dev/null
    proxy_pid=""
}
trap stop_proxy EXIT
trap 'exit 130' INT TERM

# start_proxy DIR [CURL_TLS_ARGS...]: starts `serve` on DIR/proxy.toml (listen port 0),
# waits for the "listening on https://127.0.0.1:PORT" line and then for GET /ping over
# TLS to answer 200; sets $port. All waits bounded by $start_timeout.
start_proxy() {
    local dir=$1
    shift
    : >"$dir/proxy.log"
    "$bin" serve --config "$dir/proxy.toml" >>"$dir/proxy.log" 2>&1 </dev/null &
    proxy_pid=$!
    local deadline=$((SECONDS + start_timeout)) addr=""
    while [[ -z "$addr" ]]; do
        addr=$(grep -o -m1 'listening on https://127\.0\.0\.1:[0-9]*' "$dir/proxy.log" | sed 's/.*https:\/\///')
        [[ -n "$addr" ]] && break
        if ! kill -0 "$proxy_pid" 2>/dev/null; then
            echo "the proxy exited before listening:" >&2
            sed 's/^/  | /' "$dir/proxy.log" >&2
            proxy_pid=""
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "the proxy did not log its address within ${start_timeout}s:" >&2
            sed 's/^/  | /' "$dir/proxy.log" >&2
            return 1
        fi
        sleep 0.05
    done
    port=${addr##*:}
    local code=""
    while :; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
            --cacert "$root/certs/ca.pem" "$@" "https://localhost:$port/ping") || true
        [[ "$code" == 200 ]] && return 0
        if ! kill -0 "$proxy_pid" 2>/dev/null || ((SECONDS >= deadline)); then
            echo "GET https://localhost:$port/ping never answered 200 (last: '$code'):" >&2
            sed 's/^/  | /' "$dir/proxy.log" >&2
            return 1
        fi
        sleep 0.1
    done
}

# write_config DIR BACKEND_TOML TLS_EXTRA: the proxy's config with one keystore under
# /$prefix and one credential whose secret is in $XKS_CONFORMANCE_SECRET.
write_config() {
    local dir=$1 backend_toml=$2 tls_extra=$3
    cat >"$dir/proxy.toml" <<TOML
# Written by tests/conformance-client.sh.
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 2000

[server.tls]
certificate = "$root/certs/server-ecdsa.pem"
private_key = "$root/certs/server-ecdsa.key"
$tls_extra

[backend]
$backend_toml

[[keystores]]
path_prefix = "/$prefix"

[[keystores.credentials]]
access_key_id = "$akid"
secret_env = "XKS_CONFORMANCE_SECRET"
TOML
}

# make_keys DIR: the four keys the client's -a run needs, via the proxy's CLI.
make_keys() {
    local dir=$1 id usage
    for id in conformance-key:encrypt,decrypt encrypt-only:encrypt decrypt-only:decrypt impotent:; do
        usage=${id#*:}
        if ! "$bin" keys create --config "$dir/proxy.toml" --label "${id%%:*}" --usage "$usage" \
            >>"$dir/keys.log" 2>&1; then
            echo "xks-proxy keys create --label ${id%%:*} --usage '$usage' failed:" >&2
            sed 's/^/  | /' "$dir/keys.log" >&2
            if grep -q 'unknown variant .pkcs11.' "$dir/keys.log"; then
                echo "  $bin has no PKCS#11 backend (built with --no-default-features?):" \
                    "cargo build --locked --bins" >&2
            fi
            return 1
        fi
    done
    "$bin" keys list --config "$dir/proxy.toml" >>"$dir/keys.log" 2>&1
}

# report_failures LOG: each failed test's block (header, request, curl output, verdict).
report_failures() {
    awk '
        function flush() { if (failed) printf "%s\n", block; block = ""; failed = 0 }
        /^ ?Testing .* \.\.\. ?$/ { flush() }
        { block = block "  | " $0 "\n" }
        /^=> Test .*FAILED/ { failed = 1 }
        END { flush() }
    ' "$1"
}

# run_client MODE DIR EXPECTED [MTLS]: runs the client from a private copy; 0 if it
# printed "All EXPECTED tests PASSED."
run_client() {
    local mode=$1 dir=$2 expected=$3 mtls=${4:-}
    rm -rf "$dir/client"
    cp -R "$client_src" "$dir/client"
    chmod -R u+w "$dir/client"
    local rc=0
    (
        cd "$dir/client" &&
            XKS_PROXY_HOST="localhost:$port" URI_PREFIX="$prefix" \
                SIGV4_ACCESS_KEY_ID="$akid" SIGV4_SECRET_ACCESS_KEY="$secret" \
                KEY_ID=conformance-key ENCRYPT_ONLY_KEY_ID=encrypt-only \
                DECRYPT_ONLY_KEY_ID=decrypt-only IMPOTENT_KEY_ID=impotent \
                SECURE="--cacert $root/certs/ca.pem --show-error" MTLS="$mtls" ANSI_ESCAPE=0 \
                timeout --kill-after=10 "$client_timeout" ./test-xks-proxy -a 2>&1 | cat
    ) >"$dir/client.log" || rc=$?
    local summary
    summary=$(grep -E 'tests (PASSED|FAILED)' "$dir/client.log" | tail -n1 | sed 's/^ *//')
    if grep -qxE " ?All $expected tests PASSED\." "$dir/client.log"; then
        echo "[$mode] PASS: $summary"
        return 0
    fi
    echo "[$mode] FAIL: ${summary:-no verdict line} (expected: All $expected tests PASSED.; client exit $rc)"
    echo "[$mode] failing tests:"
    grep -E '^=> Test .*FAILED' "$dir/client.log" | sed 's/^=> /  - /'
    echo "[$mode] their requests and curl output:"
    report_failures "$dir/client.log"
    [[ -n "$summary" ]] || {
        echo "[$mode] last 40 lines of the client's output:"
        tail -n 40 "$dir/client.log" | sed 's/^/  | /'
    }
    echo "[$mode] proxy log ($dir/proxy.log): warnings and errors, then the last 20 lines:"
    grep -E ' (WARN|ERROR) ' "$dir/proxy.log" | head -n 40 | sed 's/^/  | /'
    echo "  | ..."
    tail -n 20 "$dir/proxy.log" | sed 's/^/  | /'
    return 1
}

# --- one mode --------------------------------------------------------------------------
run_mode() {
    local mode=$1 dir="$work/$1"
    rm -rf "$dir"
    mkdir -p "$dir"
    local backend_toml tls_extra="" expected=49 mtls="" curl_tls=()
    case $mode in
    software | mtls)
        export XKS_MASTER_KEY
        XKS_MASTER_KEY=$("$bin" keys generate-master-key) || return 1
        backend_toml=$'kind = "software"\nkeystore = "keystore.json"\nmaster_key_env = "XKS_MASTER_KEY"'
        ;;
    softhsm)
        command -v softhsm2-util >/dev/null || {
            echo "[softhsm] softhsm2-util not found (apt-get install softhsm2)" >&2
            return 1
        }
        local env
        env=$(tests/softhsm/setup.sh "$dir/softhsm" xks-conformance) || return 1
        eval "$env"
        export SOFTHSM2_CONF XKS_HSM_PIN="$XKS_TEST_SOFTHSM_USER_PIN"
        backend_toml="kind = \"pkcs11\"
module = \"$XKS_TEST_PKCS11_MODULE\"
token_label = \"$XKS_TEST_SOFTHSM_TOKEN_LABEL\"
user_pin_env = \"XKS_HSM_PIN\""
        ;;
    esac
    if [[ $mode == mtls ]]; then
        # The client's own negative tests (bogus-mtls/: an expired and a self-signed
        # certificate) must be refused; certs/kms-client.pem is the accepted one.
        local subject
        subject=$(openssl x509 -in certs/kms-client.pem -noout -subject -nameopt multiline |
            sed -n 's/^ *commonName *= *//p')
        [[ -n "$subject" ]] || {
            echo "[mtls] no CN in certs/kms-client.pem" >&2
            return 1
        }
        tls_extra="client_ca = \"$root/certs/ca.pem\"
client_subjects = [\"$subject\"]"
        mtls="--key $root/certs/kms-client.key --cert $root/certs/kms-client.pem"
        curl_tls=(--key "$root/certs/kms-client.key" --cert "$root/certs/kms-client.pem")
        expected=51
    fi
    write_config "$dir" "$backend_toml" "$tls_extra"
    make_keys "$dir" || return 1
    start_proxy "$dir" "${curl_tls[@]}" || {
        stop_proxy
        return 1
    }
    echo "[$mode] proxy on https://localhost:$port/$prefix (log: $dir/proxy.log)"
    local rc=0
    run_client "$mode" "$dir" "$expected" "$mtls" || rc=1
    stop_proxy
    return $rc
}

# One throw-away credential for every mode (KMS's format: 20-char id, 44-char secret).
cred=$("$bin" credentials new --json) || die "xks-proxy credentials new failed"
akid=$(jq -r .AccessKeyId <<<"$cred")
secret=$(jq -r .RawSecretAccessKey <<<"$cred")
export XKS_CONFORMANCE_SECRET="$secret"

mkdir -p "$work"
failed=()
for mode in "${modes[@]}"; do
    echo "==> conformance client: $mode"
    run_mode "$mode" || failed+=("$mode")
done
if ((${#failed[@]})); then
    echo "conformance client FAILED in: ${failed[*]} (logs in $work/)"
    exit 1
fi
echo "conformance client: all modes passed (${modes[*]})"
