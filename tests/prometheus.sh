#!/usr/bin/env bash
# tests/prometheus.sh — the alerting rules (deploy/prometheus/) and the Grafana dashboard
# (deploy/grafana/) against real Prometheus, from Debian's `prometheus` package:
#
#   1. `promtool check rules` and `promtool test rules`: every alert fires and clears on
#      its input series, nothing fires on a healthy idle proxy; and every alert has such
#      a test case (checked here, so a new rule cannot ship untested).
#   2. A real `xks-proxy serve` (software keystore, admin listener) scraped every second
#      by a real Prometheus server loaded with the rules, all on 127.0.0.1 with ports
#      picked free. Through Prometheus's HTTP API: the counters exist at 0 on the fresh
#      proxy and no rule is pending or failing on it; then after signed requests sent with
#      `curl --aws-sigv4` (an independent signer), bad signatures, strangers, a refused
#      handshake and a throttled prefix, every counter equals what was sent; a refused
#      reload puts XksConfigReloadFailed in pending, a good one clears it.
#   3. Every panel query of deploy/grafana/xks-proxy-dashboard.json (variables
#      substituted) and its prefix variable return data from that Prometheus.
#
# Every wait polls with a deadline; nothing sleeps and then asserts. The proxy and
# Prometheus run under `timeout` and are stopped when the script exits. The files of a run
# go to a fresh target/prometheus-test.XXXXXX/, removed if all passed, kept if not.
#
# Environment: XKS_PROXY_BIN, the proxy binary (default: `cargo build --release` and
# target/release/xks-proxy; tests/run-all.sh passes its debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

rules=deploy/prometheus/xks-proxy-alerts.yml
rule_tests=deploy/prometheus/xks-proxy-alerts.test.yml
dashboard=deploy/grafana/xks-proxy-dashboard.json
wait_secs=30      # the longest any one expectation may take to come true
server_life=300   # hard bound on the proxy's and Prometheus's lifetime (timeout)

say() { printf '\n==> %s\n' "$*"; }

# --- what it needs ------------------------------------------------------------------------
missing=()
{ command -v promtool && command -v prometheus; } >/dev/null || missing+=(prometheus)
command -v curl >/dev/null || missing+=(curl)
command -v jq >/dev/null || missing+=(jq)
command -v openssl >/dev/null || missing+=(openssl)
command -v pgrep >/dev/null || missing+=(procps)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import yaml' 2>/dev/null || missing+=(python3-yaml)
tests/apt-install.sh ${missing[@]+"${missing[@]}"}

if [[ -n "${XKS_PROXY_BIN:-}" ]]; then
  bin=$XKS_PROXY_BIN
else
  say "cargo build --release --bin xks-proxy"
  cargo build --release --locked --bin xks-proxy
  bin="$root/target/release/xks-proxy"
fi
[[ -x "$bin" ]] || { echo "prometheus.sh: $bin is not an executable" >&2; exit 2; }
started=$SECONDS # the figure in the summary: the tests, not the build

# --- results --------------------------------------------------------------------------------
passed=0
failures=()
ok() { passed=$((passed + 1)); }
fail() {
  failures+=("$*")
  echo "FAIL: $*" >&2
}

# --- 1. promtool ----------------------------------------------------------------------------
say "promtool check rules / test rules"
if promtool check rules "$rules"; then ok; else fail "promtool check rules $rules"; fi
if promtool test rules "$rule_tests"; then ok; else fail "promtool test rules $rule_tests"; fi

# Every alert in the rules has a case named after it (or "NAME (...)") that expects it to
# fire, and before and after that firing an evaluation expecting it absent; and the
# "healthy idle proxy" case expects it absent.
if python3 - "$rules" "$rule_tests" <<'PY'; then ok; else fail "alert test coverage (above)"; fi
import sys, yaml
rules = yaml.safe_load(open(sys.argv[1]))
tests = yaml.safe_load(open(sys.argv[2]))["tests"]
names = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
def evals(case, name):
    return [(t["eval_time"], bool(t["exp_alerts"])) for t in case.get("alert_rule_test", [])
            if t["alertname"] == name]
def minutes(d):
    return int(d[:-1]) if d.endswith("m") else int(d[:-1]) * 60
bad = []
idle = [c for c in tests if c["name"] == "healthy idle proxy"]
for name in sorted(names):
    if not idle or not evals(idle[0], name) or any(f for _, f in evals(idle[0], name)):
        bad.append(f"{name}: not expected absent in 'healthy idle proxy'")
    cases = [c for c in tests if c["name"] == name or c["name"].startswith(name + " (")]
    good = False
    for c in cases:
        ev = sorted((minutes(t), f) for t, f in evals(c, name))
        fired = [t for t, f in ev if f]
        if fired and any(t < min(fired) and not f for t, f in ev) \
                and any(t > max(fired) and not f for t, f in ev):
            good = True
    if not good:
        bad.append(f"{name}: no case '{name}' where it is absent, fires, then is absent again")
for b in bad:
    print("  " + b)
print(f"  {len(names)} alerts, each with a fire-and-clear case and absent on an idle proxy"
      if not bad else f"  {len(bad)} problem(s)")
sys.exit(1 if bad else 0)
PY

# --- 2. a proxy and a Prometheus server -----------------------------------------------------
say "xks-proxy + Prometheus on 127.0.0.1"
mkdir -p "$root/target"
work=$(mktemp -d "$root/target/prometheus-test.XXXXXX")
mkdir "$work/tsdb"
proxy_pid=""
prom_pid=""
stop() { # stop PID: SIGTERM, bounded wait, SIGKILL
  local pid=$1 i
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  { wait "$pid" || true; } 2>/dev/null
}
cleanup() {
  stop "$prom_pid"
  stop "$proxy_pid"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

XKS_MASTER_KEY=$("$bin" keys generate-master-key)
export XKS_MASTER_KEY
for who in live throttled; do
  "$bin" credentials new --json >"$work/$who.json"
  jq -r .RawSecretAccessKey "$work/$who.json" >"$work/$who.secret"
  chmod 600 "$work/$who.secret"
done
live_akid=$(jq -r .AccessKeyId "$work/live.json")
live_secret=$(cat "$work/live.secret")
thr_akid=$(jq -r .AccessKeyId "$work/throttled.json")
thr_secret=$(cat "$work/throttled.secret")

cat >"$work/proxy.toml" <<TOML
# Written by tests/prometheus.sh.
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 2000

[server.tls]
certificate = "$root/certs/server-ecdsa.pem"
private_key = "$root/certs/server-ecdsa.key"

[backend]
kind = "software"
keystore = "keystore.json"
master_key_env = "XKS_MASTER_KEY"

[admin]
listen = "127.0.0.1:0"

[logging]
level = "info"

[[keystores]]
path_prefix = "/live"
allowed_keys = ["live-key"]
[[keystores.credentials]]
access_key_id = "$live_akid"
secret_file = "live.secret"

# One request a second: the second of two quick ones gets 429 ThrottlingException.
[[keystores]]
path_prefix = "/throttled"
allowed_keys = []
quota_rps = 1
quota_burst = 1
[[keystores.credentials]]
access_key_id = "$thr_akid"
secret_file = "throttled.secret"
TOML
cp "$work/proxy.toml" "$work/proxy.toml.good"
"$bin" keys create --config "$work/proxy.toml" live-key >"$work/keys.log" 2>&1
"$bin" config check --config "$work/proxy.toml" >>"$work/keys.log" 2>&1

timeout --kill-after=5 "$server_life" "$bin" serve --config "$work/proxy.toml" \
  >"$work/proxy.log" 2>&1 </dev/null &
proxy_pid=$!
deadline=$((SECONDS + wait_secs))
xks_port="" admin_port=""
until [[ -n "$xks_port" && -n "$admin_port" ]]; do
  xks_port=$(sed -n 's|.*listening on https://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$work/proxy.log" | head -1)
  admin_port=$(sed -n 's|.*metrics listening on http://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$work/proxy.log" | head -1)
  if ! kill -0 "$proxy_pid" 2>/dev/null || ((SECONDS >= deadline)); then
    echo "the proxy did not log its two addresses:" >&2
    sed 's/^/  | /' "$work/proxy.log" >&2
    exit 1
  fi
  sleep 0.05
done
echo "proxy: https://127.0.0.1:$xks_port, metrics http://127.0.0.1:$admin_port/metrics"

cat >"$work/prometheus.yml" <<YAML
# Written by tests/prometheus.sh.
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $root/$rules
scrape_configs:
  - job_name: xks-proxy
    static_configs:
      - targets: ["127.0.0.1:$admin_port"]
YAML

# A free port, then Prometheus on it; another port if it was taken in between.
prom=""
for attempt in 1 2 3; do
  prom_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  timeout --kill-after=5 "$server_life" prometheus \
    --config.file="$work/prometheus.yml" \
    --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" \
    --log.level=warn >"$work/prometheus.log" 2>&1 </dev/null &
  prom_pid=$!
  deadline=$((SECONDS + wait_secs))
  while kill -0 "$prom_pid" 2>/dev/null && ((SECONDS < deadline)); do
    if curl -fsS --max-time 2 "http://127.0.0.1:$prom_port/-/ready" >/dev/null 2>&1; then
      prom="http://127.0.0.1:$prom_port"
      break 2
    fi
    sleep 0.1
  done
  echo "Prometheus did not become ready (attempt $attempt):" >&2
  sed 's/^/  | /' "$work/prometheus.log" >&2
  stop "$prom_pid"
  prom_pid=""
done
[[ -n "$prom" ]] || exit 1
echo "Prometheus: $prom ($(prometheus --version 2>&1 | head -1))"

# query Q: the API's JSON answer for the instant query Q (empty on an HTTP error).
query() {
  curl -sS --max-time 5 -G --data-urlencode "query=$1" "$prom/api/v1/query" 2>/dev/null || true
}
# value Q: the value of Q's only series; "" if there is no series (or several, or an
# error).
value() {
  query "$1" | jq -r 'if .status == "success" and (.data.result | length) == 1
    then .data.result[0].value[1] else "" end' 2>/dev/null || true
}
# expect Q OP WANT: polls Q until its value compares OP (== >= > <=) to WANT.
expect() {
  local q=$1 op=$2 want=$3 got deadline=$((SECONDS + wait_secs))
  while :; do
    got=$(value "$q")
    if [[ -n "$got" ]] && awk -v a="$got" -v b="$want" -v op="$op" 'BEGIN {
        a += 0; b += 0
        exit !((op == "==" && a == b) || (op == ">=" && a >= b) || (op == ">" && a > b) || (op == "<=" && a <= b))
      }'; then
      ok
      printf '  ok  %-100s %s\n' "$q" "$got"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      fail "$q = ${got:-<no single series>}, want $op $want (waited ${wait_secs}s)"
      return 0
    fi
    sleep 0.2
  done
}
# expect_none Q: polls Q until it returns no series.
expect_none() {
  local q=$1 n deadline=$((SECONDS + wait_secs))
  while :; do
    n=$(query "$q" | jq -r 'if .status == "success" then .data.result | length else "error" end' 2>/dev/null || echo error)
    if [[ "$n" == 0 ]]; then
      ok
      printf '  ok  %-100s (none)\n' "$q"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      fail "$q: $n series, want none (waited ${wait_secs}s)"
      return 0
    fi
    sleep 0.2
  done
}
# rules_settled SINCE: waits until every rule group was evaluated after epoch SINCE,
# then fails for every rule whose health is not "ok" (an evaluation error on real data:
# a bad vector match, say).
rules_settled() {
  local since=$1 deadline=$((SECONDS + wait_secs)) verdict
  while :; do
    verdict=$(curl -sS --max-time 5 "$prom/api/v1/rules" 2>/dev/null | python3 -c '
import datetime, json, sys
since = float(sys.argv[1])
groups = json.load(sys.stdin)["data"]["groups"]
def t(s):
    # RFC 3339 with nanoseconds; Python takes microseconds.
    s = s.replace("Z", "+00:00")
    if "." in s:
        head, rest = s.split(".", 1)
        frac, tz = rest[:rest.index("+")], rest[rest.index("+"):]
        s = head + "." + frac[:6].ljust(6, "0") + tz
    return datetime.datetime.fromisoformat(s).timestamp()
if not groups or any(t(g["lastEvaluation"]) <= since for g in groups):
    print("wait")
else:
    bad = [r["name"] + ": " + r["health"] + " " + r.get("lastError", "") for g in groups
           for r in g["rules"] if r["health"] != "ok"]
    print("\n".join(bad) if bad else "ok")
' "$since" 2>/dev/null || echo wait)
    if [[ "$verdict" == ok ]]; then
      ok
      echo "  ok  every rule evaluated on this data without error"
      return 0
    fi
    if [[ "$verdict" != wait ]]; then
      fail "rules failing on real data: $verdict"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      fail "the rule groups were not evaluated within ${wait_secs}s"
      return 0
    fi
    sleep 0.2
  done
}

# --- 2a. the fresh proxy: counters at 0, no alert ----------------------------------------------
say "fresh proxy, before any request"
expect 'up{job="xks-proxy"}' == 1
fresh_at=$(date +%s.%N)
for op in Encrypt Decrypt GetKeyMetadata GetHealthStatus; do
  expect "xks_requests_total{prefix=\"/live\", operation=\"$op\", outcome=\"ok\"}" == 0
done
expect 'count(xks_unauthenticated_rejections_total)' == 5
expect 'sum(xks_unauthenticated_rejections_total)' == 0
for reason in signature unknown_path method_not_allowed body_too_large body_unreadable; do
  expect "xks_unauthenticated_rejections_total{reason=\"$reason\"}" == 0
done
expect 'xks_reloads_total{outcome="ok"}' == 0
expect 'xks_reloads_total{outcome="failed"}' == 0
expect 'xks_config_last_reload_successful' == 1
expect 'count(xks_tls_handshake_failures_total{listener="xks"})' '>=' 8
expect 'sum(xks_tls_handshake_failures_total)' == 0
expect 'xks_connections_refused_total{listener="xks", reason="total"}' == 0
expect 'xks_connections_refused_total{listener="xks", reason="per_source"}' == 0
expect 'sum(xks_connections_refused_total)' == 0
expect 'xks_backend_calls_skipped_total' == 0
expect 'xks_ekm_health_status{status="ACTIVE"}' == 1
expect 'xks_ekm_health_status{status="UNAVAILABLE"}' == 0
expect 'xks_credential_age_days{prefix="/live"}' == 0
# What the leaf certificate says, by openssl: whole days left.
not_after=$(date -d "$(openssl x509 -in certs/server-ecdsa.pem -noout -enddate | cut -d= -f2)" +%s)
cert_days=$(((not_after - $(date +%s)) / 86400))
expect 'xks_tls_certificate_days_to_expiry' '>=' $((cert_days - 1))
expect 'xks_tls_certificate_days_to_expiry' '<=' "$cert_days"
rules_settled "$fresh_at"
expect_none 'ALERTS'

# --- 2b. requests -----------------------------------------------------------------------------------
say "requests: curl --aws-sigv4, strangers, a refused handshake, a throttled prefix"
base="https://localhost:$xks_port"
meta() { # meta OP: requestMetadata as KMS sends it
  printf '"requestMetadata": {"kmsRequestId": "prometheus-sh-%s", "kmsOperation": "%s", "awsPrincipalArn": "arn:aws:iam::111122223333:role/prometheus-test", "kmsKeyArn": "arn:aws:kms:us-east-1:111122223333:key/00000000-0000-0000-0000-000000000000"}' "$RANDOM" "$1"
}
# signed CREDENTIAL PATH BODY: POSTs BODY signed by curl; prints the body, then the
# HTTP status on the last line.
signed() {
  curl -sS --max-time 10 --aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" --user "$1" \
    --cacert "$root/certs/ca.pem" -H 'Content-Type: application/json' \
    -w '\n%{http_code}' -d "$3" "$base$2"
}
status() { tail -n1 <<<"$1"; }
# sent WHAT WANT GOT: counts a request whose status must be WANT.
sent() {
  if [[ "$3" == "$2" ]]; then ok; else fail "$1: HTTP $3, want $2"; fi
}
live="$live_akid:$live_secret"
plaintext=$(printf 'metrics an operator can trust' | base64)

encrypt() {
  out=$(signed "$live" /live/kms/xks/v1/keys/live-key/encrypt \
    "{$(meta Encrypt), \"plaintext\": \"$plaintext\", \"encryptionAlgorithm\": \"AES_GCM\"}")
  sent "Encrypt $1" 200 "$(status "$out")"
  ciphertext=$(sed '$d' <<<"$out")
}
# The latency histograms' series are born with their first observation, and rate() sees
# only what changes after a series' first scrape (src does not export them at 0 from the
# start). So one Encrypt, a scrape of it, then the rest: the dashboard's latency panels
# then have a rate to show.
n_encrypt=5
encrypt 0
expect "xks_request_duration_seconds_count{prefix=\"/live\", operation=\"Encrypt\", outcome=\"ok\"}" == 1
expect 'sum(xks_backend_call_duration_seconds_count)' '>=' 1
for ((i = 1; i < n_encrypt; i++)); do
  encrypt "$i"
done
decrypt_body() { # decrypt_body TAG: a Decrypt request for the last ciphertext
  jq -c --argjson m "{$(meta Decrypt)}" --arg tag "$1" \
    '$m + {encryptionAlgorithm: "AES_GCM"} + . + (if $tag == "" then {} else {authenticationTag: $tag} end)' \
    <<<"$ciphertext"
}
n_decrypt=3
for ((i = 0; i < n_decrypt; i++)); do
  out=$(signed "$live" /live/kms/xks/v1/keys/live-key/decrypt "$(decrypt_body "")")
  sent "Decrypt $i" 200 "$(status "$out")"
  [[ "$(sed '$d' <<<"$out" | jq -r .plaintext)" == "$plaintext" ]] || fail "Decrypt $i: wrong plaintext"
done
out=$(signed "$live" /live/kms/xks/v1/keys/live-key/metadata "{$(meta DescribeKey)}")
sent GetKeyMetadata 200 "$(status "$out")"
for i in 1 2; do
  out=$(signed "$live" /live/kms/xks/v1/health "{$(meta KmsHealthCheck)}")
  sent "GetHealthStatus $i" 200 "$(status "$out")"
done
# A tag that does not authenticate: InvalidCiphertextException.
out=$(signed "$live" /live/kms/xks/v1/keys/live-key/decrypt "$(decrypt_body AAAAAAAAAAAAAAAAAAAAAA==)")
sent "Decrypt, wrong tag" 400 "$(status "$out")"
# A key this prefix does not serve: KeyNotFoundException.
out=$(signed "$live" /live/kms/xks/v1/keys/no-such-key/encrypt \
  "{$(meta Encrypt), \"plaintext\": \"$plaintext\", \"encryptionAlgorithm\": \"AES_GCM\"}")
sent "Encrypt, unknown key" 404 "$(status "$out")"
# A wrong secret, twice: AuthenticationFailedException, refused before verification.
for i in 1 2; do
  out=$(signed "$live_akid:x$live_secret" /live/kms/xks/v1/keys/live-key/encrypt \
    "{$(meta Encrypt), \"plaintext\": \"$plaintext\", \"encryptionAlgorithm\": \"AES_GCM\"}")
  sent "Encrypt, wrong secret $i" 401 "$(status "$out")"
done
# Strangers: no such path; the wrong method.
code=$(curl -sS --max-time 10 --cacert certs/ca.pem -o /dev/null -w '%{http_code}' -d '{}' "$base/no/such/path")
sent "POST to an unknown path" 404 "$code"
code=$(curl -sS --max-time 10 --cacert certs/ca.pem -o /dev/null -w '%{http_code}' "$base/live/kms/xks/v1/health")
sent "GET of an XKS URI" 405 "$code"
# A client that does not trust the proxy's certificate (no --cacert): its handshake fails.
if curl -sS --max-time 10 -o /dev/null "$base/ping" 2>"$work/untrusting-curl.log"; then
  fail "curl without the CA completed a handshake"
else
  ok
fi
# The throttled prefix: quick health checks until one gets 429 (the second does, at one
# request a second; at most 20 tries).
thr_ok=0 thr_429=0
for ((i = 0; i < 20 && thr_429 == 0; i++)); do
  code=$(status "$(signed "$thr_akid:$thr_secret" /throttled/kms/xks/v1/health "{$(meta KmsHealthCheck)}")")
  case $code in
  200) thr_ok=$((thr_ok + 1)) ;;
  429) thr_429=$((thr_429 + 1)) ;;
  *) fail "throttled prefix: HTTP $code" ;;
  esac
done
if ((thr_429 > 0)); then ok; else fail "the throttled prefix never answered 429"; fi
echo "  sent: $n_encrypt Encrypt, $n_decrypt Decrypt, 1 GetKeyMetadata, 2 GetHealthStatus, 1 bad tag," \
  "1 unknown key, 2 bad signatures, 2 strangers, 1 untrusting client; /throttled: $thr_ok ok, $thr_429 throttled"

say "what Prometheus scraped"
l='prefix="/live"'
expect "xks_requests_total{$l, operation=\"Encrypt\", outcome=\"ok\"}" == "$n_encrypt"
expect "xks_requests_total{$l, operation=\"Decrypt\", outcome=\"ok\"}" == "$n_decrypt"
expect "xks_requests_total{$l, operation=\"GetKeyMetadata\", outcome=\"ok\"}" == 1
expect "xks_requests_total{$l, operation=\"GetHealthStatus\", outcome=\"ok\"}" == 2
expect "xks_requests_total{$l, operation=\"Decrypt\", outcome=\"InvalidCiphertextException\"}" == 1
expect "xks_requests_total{$l, operation=\"Encrypt\", outcome=\"KeyNotFoundException\"}" == 1
expect "xks_requests_total{$l, operation=\"Encrypt\", outcome=\"AuthenticationFailedException\"}" == 2
# Strangers (an unknown path; a GET of /live's health URI, unauthenticated) count under
# prefix and operation "-", never in a tenant's figures; the wrong secrets above named
# /live's access key id (KMS with a stale secret), so they count for /live.
expect "sum(xks_requests_total{$l})" == $((n_encrypt + n_decrypt + 1 + 2 + 1 + 1 + 2))
expect 'xks_requests_total{prefix="-", operation="-", outcome="InvalidUriPathException"}' == 2
expect "xks_request_duration_seconds_count{$l, operation=\"Encrypt\", outcome=\"ok\"}" == "$n_encrypt"
expect "xks_request_duration_seconds_bucket{$l, operation=\"Encrypt\", outcome=\"ok\", le=\"+Inf\"}" == "$n_encrypt"
expect 'xks_requests_total{prefix="/throttled", operation="GetHealthStatus", outcome="ok"}' == "$thr_ok"
expect 'xks_requests_total{prefix="/throttled", operation="GetHealthStatus", outcome="ThrottlingException"}' == "$thr_429"
expect 'xks_unauthenticated_rejections_total{reason="signature"}' == 2
expect 'xks_unauthenticated_rejections_total{reason="unknown_path"}' == 1
expect 'xks_unauthenticated_rejections_total{reason="method_not_allowed"}' == 1
expect 'xks_unauthenticated_rejections_total{reason="body_too_large"}' == 0
expect 'xks_tls_handshake_failures_total{listener="xks", reason="certificate_rejected_by_client"}' == 1
expect 'sum(xks_tls_handshake_failures_total)' == 1
expect 'sum(xks_backend_call_duration_seconds_count)' '>=' $((n_encrypt + n_decrypt + 1))
expect 'xks_backend_calls_in_flight' == 0
expect 'xks_requests_in_flight' == 0

# --- 2c. reloads ------------------------------------------------------------------------------------
say "reloads: a good one, a refused one (XksConfigReloadFailed pending), a good one"
# To the proxy itself: `timeout` would relay it, but then kill the proxy 5 s later
# (--kill-after).
serve_pid=$(pgrep -P "$proxy_pid" | head -1)
[[ -n "$serve_pid" ]] || { fail "no xks-proxy process under timeout ($proxy_pid)"; exit 1; }
kill -HUP "$serve_pid"
expect 'xks_reloads_total{outcome="ok"}' == 1
echo 'this is not TOML' >>"$work/proxy.toml"
kill -HUP "$serve_pid"
expect 'xks_reloads_total{outcome="failed"}' == 1
expect 'xks_config_last_reload_successful' == 0
# Pending (its `for:` is 1m); firing too, should this machine be that slow.
expect 'ALERTS{alertname="XksConfigReloadFailed", alertstate=~"pending|firing", severity="warning", job="xks-proxy"}' == 1
cp "$work/proxy.toml.good" "$work/proxy.toml"
kill -HUP "$serve_pid"
expect 'xks_reloads_total{outcome="ok"}' == 2
expect 'xks_config_last_reload_successful' == 1
expect_none 'ALERTS{alertname="XksConfigReloadFailed"}'
rules_settled "$(date +%s.%N)"

# --- 3. the dashboard -------------------------------------------------------------------------------
say "dashboard: every panel query against this Prometheus"
# Grafana's variables: every prefix (the variable's All value), and a rate window that
# spans this whole run (Grafana would pick ~4 scrape intervals).
n_panels=0
while IFS=$'\t' read -r title expr; do
  q=${expr//\$\{prefix\}/.*}
  q=${q//\$prefix/.*}
  q=${q//\$__rate_interval/5m}
  q=${q//\$__interval/1m}
  q=${q//\$__range/1h}
  n_panels=$((n_panels + 1))
  got=$(query "$q" | jq -r 'if .status != "success" then "error: \(.error // "no answer")"
    elif (.data.result | length) == 0 then "no data"
    elif ([.data.result[].value[1] | select(. != "NaN" and . != "+Inf" and . != "-Inf")] | length) == 0
      then "no finite value"
    else "\(.data.result | length) series" end' 2>/dev/null || echo "error: no JSON")
  if [[ "$got" == *series ]]; then
    ok
    printf '  ok  %-60.60s %s\n' "$title" "$got"
  else
    fail "dashboard panel '$title': $q: $got"
  fi
done < <(jq -r '.. | objects | select(has("targets")) | .title as $t | .targets[] | [$t, .expr] | @tsv' "$dashboard")
((n_panels > 0)) || fail "no panel queries found in $dashboard"
# The prefix variable: label_values(xks_requests_total, prefix).
var_query=$(jq -r '.templating.list[] | select(.name == "prefix") | .query' "$dashboard")
if [[ "$var_query" =~ ^label_values\(([a-z_]+),\ *([a-z_]+)\)$ ]]; then
  prefixes=$(curl -sS --max-time 5 -G --data-urlencode "match[]=${BASH_REMATCH[1]}" \
    "$prom/api/v1/label/${BASH_REMATCH[2]}/values" | jq -r '.data[]?' | paste -sd' ')
  if [[ " $prefixes " == *" /live "* ]]; then
    ok
    echo "  ok  variable prefix = $var_query: $prefixes"
  else
    fail "dashboard variable prefix ($var_query) = '$prefixes', want /live among them"
  fi
else
  fail "dashboard variable prefix: unexpected query '$var_query'"
fi

# --- summary --------------------------------------------------------------------------------
say "summary"
echo "promtool: $(grep -cE '^\s*- alert:' "$rules") rules, $(grep -c '^  - name:' "$rule_tests") test cases;" \
  "live: $n_panels dashboard queries; $passed checks passed, ${#failures[@]} failed; $((SECONDS - started)) s (build excluded)"
if ((${#failures[@]} > 0)); then
  printf '  - %s\n' "${failures[@]}"
  echo "files of the run: $work"
  exit 1
fi
rm -rf "$work"
echo "all passed"
