#!/usr/bin/env bash
# 10 000 idle keep-alive connections (issue 11 §3): the real `xks-proxy serve` (software
# keystore, max_connections raised to hold them plus the new client), `xks-bench hold`
# opening CONNECTIONS connections of KMS's kind from 64 loopback addresses (each carries
# one signed GetHealthStatus, then stays silent), then a closed-loop Encrypt load from a
# new client (c=8, DURATION s) while they are held. Reports the proxy's RSS before /
# holding / under load / after close (4 s, and LATE_AFTER_CLOSE s more, default 15),
# KiB per idle connection, and the new client's results. Proxy pinned to CPU 1, generator to CPU 0.
#
# Usage: benches/idle.sh [XKS_PROXY] [XKS_BENCH] [OUT] [CONNECTIONS] [DURATION]
#   defaults: target/release/xks-proxy target/release/xks-bench target/xks-idle 10000 10
#   HTTP2=1 holds HTTP/2 connections instead of HTTP/1.1.
# Needs taskset and jq; raises the open-files soft limit to CONNECTIONS + 1024.
set -euo pipefail
cd "$(dirname "$0")/.."

P=${1:-target/release/xks-proxy}
B=${2:-target/release/xks-bench}
OUT=${3:-target/xks-idle}
CONNECTIONS=${4:-10000}
DURATION=${5:-10}
mkdir -p "$OUT"
# Each process holds one descriptor per connection, plus headroom.
need=$((CONNECTIONS + 1024))
hard=$(ulimit -Hn)
if [[ "$hard" != unlimited && "$hard" -lt "$need" ]]; then
  echo "open-files hard limit $hard < $need needed for $CONNECTIONS connections" >&2
  exit 1
fi
ulimit -n "$need"
# shellcheck source=benches/bench-proxy.sh
. benches/bench-proxy.sh
bench_proxy_start "$P" "$OUT" /idle idle-key "max_connections = $((CONNECTIONS + 100))" "" ""
h2=""
[[ -n "${HTTP2:-}" ]] && h2="--hold-http2"
# shellcheck disable=SC2086 # $h2 is empty or one flag
taskset -c 0 "$B" hold --url "https://localhost:$port" --connect-to "127.0.0.1:$port" \
  --prefix /idle --key-id idle-key --access-key-id "$akid" --secret-file "$work/secret" \
  --ca certs/ca.pem --server-pid "$PROXY_PID" --hold-connections "$CONNECTIONS" $h2 \
  --op encrypt -c 8 --duration "$DURATION" --label "idle-$CONNECTIONS" \
  --json >"$OUT/hold.json"
# Allocators give freed memory back on their own schedule (jemalloc's decay is 10 s;
# glibc trims only the top of each arena): read the proxy's RSS again once that has
# passed, with no traffic at all (issue 15 §4: "RSS returns close to its idle level").
sleep "${LATE_AFTER_CLOSE:-15}"
late=$(awk '/^VmRSS:/ {print $2}' "/proc/$PROXY_PID/status")
jq --argjson late "$late" '. + {rss_late_after_close_kib: $late}' "$OUT/hold.json" >"$OUT/hold.json.tmp"
mv "$OUT/hold.json.tmp" "$OUT/hold.json"
jq -r '
  def mib: if . == null then "–" else (. / 1024 * 10 | round / 10 | tostring) end;
  "| held idle connections (HTTP/\(.http)) | proxy RSS before / holding / under load / after close / LATE_AFTER_CLOSE s later MiB | KiB per idle connection | new client: ok / errors, rps | new client p50 / p99 / max ms | held ones still served |",
  "|---:|---:|---:|---:|---:|---:|",
  "| \(.held) of \(.asked) | \(.rss_before_kib | mib) / \(.rss_held_kib | mib) / \(.rss_under_load_kib | mib) / \(.rss_after_close_kib | mib) / \(.rss_late_after_close_kib | mib) | \(.kib_per_idle_connection * 10 | round / 10) | \(.new_client.requests_ok) / \(.new_client.errors), \(.new_client.throughput_rps | round) | \(.new_client.latency.p50_ms) / \(.new_client.latency.p99_ms) / \(.new_client.latency.max_ms) | \(.held_still_served) of \(.held_checked) sampled |",
  "",
  "load average \(.load_average_1m)"
' "$OUT/hold.json" | tee "$OUT/summary.md"
