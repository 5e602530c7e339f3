# Sourced by benches/overload.sh and benches/idle.sh: the real `xks-proxy serve` as an
# operator would set it up (a generated master key and credential, `keys create`,
# `config check`), software keystore, dev TLS certificate, pinned to CPU 1.
#
# bench_proxy_start XKS_PROXY OUT PREFIX KEY_ID SERVER_EXTRA BACKEND_EXTRA EXTRA_TABLES
# sets: work (the proxy's directory), port, akid, PROXY_PID; the secret is $work/secret.
# The proxy is stopped and $work removed when the script exits.
# shellcheck shell=bash

PROXY_PID=
work=
bench_proxy_cleanup() {
  [[ -n "$PROXY_PID" ]] && kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null
  [[ -n "$work" ]] && rm -rf "$work"
  return 0
}
trap bench_proxy_cleanup EXIT

bench_proxy_start() {
  local proxy=$1 out=$2 prefix=$3 key=$4 server_extra=$5 backend_extra=$6 extra_tables=$7
  work=$(mktemp -d)
  port=$((20000 + RANDOM % 20000))
  XKS_MASTER_KEY=$("$proxy" keys generate-master-key)
  export XKS_MASTER_KEY
  local creds
  creds=$("$proxy" credentials new --json)
  akid=$(jq -r .AccessKeyId <<<"$creds")
  jq -r .RawSecretAccessKey <<<"$creds" >"$work/secret"
  chmod 600 "$work/secret"
  cat >"$work/proxy.toml" <<CONFIG
[server]
listen = "127.0.0.1:$port"
$server_extra
[server.tls]
certificate = "$PWD/certs/server-ecdsa.pem"
private_key = "$PWD/certs/server-ecdsa.key"

[backend]
kind = "software"
keystore = "keystore.json"
master_key_env = "XKS_MASTER_KEY"
$backend_extra

$extra_tables

[logging]
level = "warn"

[[keystores]]
path_prefix = "$prefix"
[[keystores.credentials]]
access_key_id = "$akid"
secret_file = "secret"
CONFIG
  "$proxy" keys create --config "$work/proxy.toml" "$key" >/dev/null 2>&1
  "$proxy" config check --config "$work/proxy.toml" >/dev/null
  taskset -c 1 "$proxy" serve --config "$work/proxy.toml" 2>"$out/proxy.log" &
  PROXY_PID=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "the proxy did not start; see $out/proxy.log" >&2
  return 1
}
