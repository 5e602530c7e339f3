#!/usr/bin/env bash
# The "Unauthenticated flood" scenarios of benches/README.md: for each, a fresh
# `xks-bench proxy-server` (software keystore, request log at info to /dev/null) pinned
# to CPU 1, and `xks-bench flood` pinned to CPU 0 — the signed Encrypt client measured
# unloaded, then under attack, --rounds times. Writes one markdown and one JSON report
# per scenario to OUT and a summary table (summary.md) built from the JSON.
#
# Usage: benches/flood.sh [XKS_BENCH] [OUT] [ROUNDS] [DURATION]
#   defaults: target/release/xks-bench target/xks-bench-flood 3 10
# Needs taskset and jq. Loopback only; every run is bounded (--duration, --max-secs).
# SCENARIOS="all slow-body-h2" benches/flood.sh ... runs a subset.
set -euo pipefail

B=${1:-target/release/xks-bench}
OUT=${2:-target/xks-bench-flood}
ROUNDS=${3:-3}
DURATION=${4:-10}
mkdir -p "$OUT"

# name | proxy-server options | flood options (besides target, rounds, duration).
# The signed client: open loop at KMS's default quota per key store (1800/s), up to 256
# in flight, so a stall of the server (not a lack of generator workers) is what delays
# requests; all-closed-c8 instead measures what share of the capacity is left.
SIGNED_OPEN="--rate 1800 -c 256"
SCENARIO_TABLE=(
  "all||$SIGNED_OPEN"
  "all-closed-c8||-c 8"
  "slow-body-h2||$SIGNED_OPEN --attack slow-body=16 --attack-http 2 --attack-streams 256"
  "slow-body-h1||$SIGNED_OPEN --attack slow-body=256 --attack-http 1.1"
  "slow-body-h1-4k||$SIGNED_OPEN --attack slow-body=4200 --attack-http 1.1 --attack-connect-rate 2000 --attack-ramp 4"
  "fast-unsigned||$SIGNED_OPEN --attack fast-unsigned=64"
  "slow-head-idle||$SIGNED_OPEN --attack slow-head,idle --attack-connections 1024"
  "idle-10k||$SIGNED_OPEN --attack idle=10000 --attack-connect-rate 5000 --attack-ramp 6"
  "mif2-slow-body-h1|--max-in-flight 2|$SIGNED_OPEN --attack slow-body=2 --attack-http 1.1"
  "mif2-all|--max-in-flight 2|$SIGNED_OPEN"
)
WANT=${SCENARIOS:-}

SERVER_PID=
stop_server() {
  if [[ -n "$SERVER_PID" ]]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
  fi
}
trap stop_server EXIT

for row in "${SCENARIO_TABLE[@]}"; do
  IFS='|' read -r name server_opts flood_opts <<<"$row"
  if [[ -n "$WANT" && " $WANT " != *" $name "* ]]; then
    continue
  fi
  info="$OUT/$name.server.json"
  : >"$info"
  # shellcheck disable=SC2086 # the option strings are word lists on purpose
  taskset -c 1 "$B" proxy-server --max-secs 900 $server_opts >"$info" 2>/dev/null &
  SERVER_PID=$!
  for _ in $(seq 1 300); do
    [[ -s "$info" ]] && break
    sleep 0.1
  done
  [[ -s "$info" ]] || { echo "proxy-server did not start for $name" >&2; exit 1; }
  sleep 0.5
  j() { jq -r ".$1" "$info"; }
  echo "== $name: proxy-server $server_opts; flood $flood_opts" >&2
  # shellcheck disable=SC2086
  taskset -c 0 "$B" flood --url "$(j url)" --prefix "$(j prefix)" --key-id "$(j key_id)" \
    --access-key-id "$(j access_key_id)" --secret-file "$(j secret_file)" --ca certs/ca.pem \
    --server-pid "$(j pid)" --rounds "$ROUNDS" --duration "$DURATION" --label "$name" \
    --json-out "$OUT/$name.json" $flood_opts >"$OUT/$name.md"
  stop_server
  tail -n 1 "$OUT/$name.md" >&2
done

{
  echo "| scenario | signed client | unloaded rps | attacked rps | ratio | p99 ms, failures = too slow | successes p50 / p99 / max ms | signed errors under attack | attackers answered/s | server RSS max MiB | verdict |"
  echo "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"
  for row in "${SCENARIO_TABLE[@]}"; do
    f="$OUT/${row%%|*}.json"
    [[ -f "$f" ]] || continue
    jq -r '
      def ms: if . == null then "–" else (. * 100 | round / 100 | tostring) end;
      def med: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
      .verdict as $v
      | (if $v.attacked_p99_ms == null then null else (.rounds | map(.attacked.latency.p50_ms // 1e18) | med) end) as $p50
      | (.rounds | map((.attackers.groups | map(.answered | to_entries | map(.value) | add // 0) | add) / .attackers.elapsed_s) | med) as $aps
      | (.rounds | map(.attacked.server.rss_max_kib // 0) | med / 1024 | round) as $rss
      | "| \(.label) | \(.rounds[0].attacked.shape | if .rate then "open \(.rate)/s" else "closed c=\(.concurrency)" end) | \($v.unloaded_rps | round) | \($v.attacked_rps | round) | \($v.ratio * 100 | round / 100) | \(if $v.attacked_p99_all_ms == null then "over" else ($v.attacked_p99_all_ms | ms) end) | \($p50 | ms) / \($v.attacked_p99_ms | ms) / \($v.attacked_max_ms | ms) | \($v.attacked_errors | to_entries | map("\(.key)×\(.value)") | join(" ") | if . == "" then "0" else . end) | \($aps | round) | \($rss) | \(if $v.holds then "holds" else "FAILS" end) |"
    ' "$f"
  done
} >"$OUT/summary.md"
cat "$OUT/summary.md"
