#!/usr/bin/env bash
# 10× overload (issue 11 §3): the real `xks-proxy serve` in front of a key manager that
# takes SERVICE_MS an operation (the software keystore's simulated_latency_ms: a slow
# network HSM). An Encrypt with a CDIV is two operations (encrypt, then the self-check
# decrypt) in one call, and there are 64 call threads: a capacity of
# 64 / (2 × SERVICE_MS) Encrypts per second. Offered FACTOR × that as an open-loop load
# (no coordinated omission) over 256 HTTP/1.1 keep-alive connections, the most one
# source address may hold. Proxy pinned to CPU 1, generator to CPU 0. Reports, per round, what was
# admitted (200: count, p50/p99/max) and how fast the excess was refused (429/503: count,
# p50/p99/max), and the proxy's RSS before, at the peak and after the load.
#
# Usage: benches/overload.sh [XKS_PROXY] [XKS_BENCH] [OUT] [ROUNDS] [DURATION]
#   defaults: target/release/xks-proxy target/release/xks-bench target/xks-overload 3 10
#   env: SERVICE_MS (50), FACTOR (10), MAX_WAITING (the proxy's default unless set)
# Needs taskset and jq. Loopback only; every run is bounded (--duration, a kill at exit).
set -euo pipefail
cd "$(dirname "$0")/.."

P=${1:-target/release/xks-proxy}
B=${2:-target/release/xks-bench}
OUT=${3:-target/xks-overload}
ROUNDS=${4:-3}
DURATION=${5:-10}
SERVICE_MS=${SERVICE_MS:-50}
FACTOR=${FACTOR:-10}
mkdir -p "$OUT"
# shellcheck source=benches/bench-proxy.sh
. benches/bench-proxy.sh

capacity=$((64 * 1000 / (2 * SERVICE_MS)))
rate=$((capacity * FACTOR))
waiting=""
[[ -n "${MAX_WAITING:-}" ]] && waiting="backend_max_waiting = $MAX_WAITING"
bench_proxy_start "$P" "$OUT" /overload overload-key "" \
  "simulated_latency_ms = $SERVICE_MS" "[limits]
$waiting"
rss() { awk '/^VmRSS/ {print $2}' "/proc/$PROXY_PID/status"; }
rss_before=$(rss)
echo "capacity $capacity Encrypts/s (64 threads, 2 × $SERVICE_MS ms each), offered $rate/s; proxy RSS before: $rss_before KiB" >&2

for round in $(seq 1 "$ROUNDS"); do
  # 1 s of warm-up sets the key manager's pace.
  taskset -c 0 "$B" run --url "https://localhost:$port" --connect-to "127.0.0.1:$port" \
    --prefix /overload --key-id overload-key --access-key-id "$akid" \
    --secret-file "$work/secret" --ca certs/ca.pem --server-pid "$PROXY_PID" \
    --op encrypt -c 256 --rate "$rate" \
    --warmup 1 --duration "$DURATION" --label "overload-$round" \
    --json >"$OUT/round-$round.json" 2>"$OUT/round-$round.log"
done
rss_after=$(rss)
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$PROXY_PID/status")

{
  echo "Capacity $capacity Encrypts/s (simulated ${SERVICE_MS} ms an operation, 2 per Encrypt with CDIV, 64 call threads), offered $rate Encrypt/s (${FACTOR}×) open loop for ${DURATION} s, ${ROUNDS} rounds; load average $(cut -d' ' -f1 /proc/loadavg)."
  echo
  echo "| round | offered/s | admitted (200)/s | admitted p50 / p99 / max ms | refused | refused p50 / p99 / max ms | proxy CPU cores | proxy RSS max MiB |"
  echo "|---|---:|---:|---:|---|---:|---:|---:|"
  for round in $(seq 1 "$ROUNDS"); do
    jq -r --arg r "$round" --arg rate "$rate" '
      def ms: if . == null then "–" else (. * 100 | round / 100 | tostring) end;
      "| \($r) | \($rate) | \(.throughput_rps | round) | \(.latency.p50_ms | ms) / \(.latency.p99_ms | ms) / \(.latency.max_ms | ms) | \(.errors_by_name | to_entries | map("\(.key)×\(.value)") | join(" ")) | \(.error_latency.p50_ms | ms) / \(.error_latency.p99_ms | ms) / \(.error_latency.max_ms | ms) | \(.server.cpu_utilization * 100 | round / 100) | \(.server.rss_max_kib / 1024 | round) |"
    ' "$OUT/round-$round.json"
  done
  echo
  echo "Proxy RSS: $((rss_before / 1024)) MiB before, peak $((hwm / 1024)) MiB, $((rss_after / 1024)) MiB after the rounds."
} | tee "$OUT/summary.md"
