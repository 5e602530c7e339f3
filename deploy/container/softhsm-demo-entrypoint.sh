#!/usr/bin/env bash
# Entry point of the softhsm-demo image: a throw-away SoftHSMv2 token, one AES-256 key,
# random SigV4 credentials, then `xks-proxy serve`. NEVER for production keys.
#
# On first start it initialises token "xks-demo" (random PINs, kept in the state dir),
# creates the keys, picks credentials, and prints what to enter in KMS; later starts
# reuse all of it. Everything is overridable through the environment:
#
#   XKS_DEMO_STATE_DIR   state (config, PINs, credentials)      /var/lib/xks-proxy
#   XKS_DEMO_PREFIX      path prefix                             /demo
#   XKS_DEMO_KEY         external key id created                 demo-key-1
#   XKS_DEMO_LISTEN      XKS listener                            0.0.0.0:8443
#   XKS_DEMO_PING        plain-HTTP /ping listener               0.0.0.0:8080
#   XKS_DEMO_TLS_CERT    certificate chain (PEM)                 /etc/xks-proxy/tls/tls.crt
#   XKS_DEMO_TLS_KEY     private key (PEM)                       /etc/xks-proxy/tls/tls.key
#   XKS_ACCESS_KEY_ID, XKS_SECRET   SigV4 credentials (default: generated, then kept)
#   XKS_PROXY_BIN        the binary                              xks-proxy (on PATH)
#   SOFTHSM2_CONF        SoftHSM config (its token directory must be writable)
set -euo pipefail

state=${XKS_DEMO_STATE_DIR:-/var/lib/xks-proxy}
prefix=${XKS_DEMO_PREFIX:-/demo}
key=${XKS_DEMO_KEY:-demo-key-1}
listen=${XKS_DEMO_LISTEN:-0.0.0.0:8443}
ping=${XKS_DEMO_PING:-0.0.0.0:8080}
cert=${XKS_DEMO_TLS_CERT:-/etc/xks-proxy/tls/tls.crt}
tlskey=${XKS_DEMO_TLS_KEY:-/etc/xks-proxy/tls/tls.key}
template=${XKS_DEMO_TEMPLATE:-/etc/xks-proxy/softhsm-demo.toml}
proxy=${XKS_PROXY_BIN:-xks-proxy}
umask 077

module=""
for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
    /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so; do
    if [[ -f $m ]]; then module=$m; break; fi
done
[[ -n $module ]] || { echo "softhsm-demo: libsofthsm2.so not found" >&2; exit 1; }

mkdir -p "$state"
# Random material from the kernel, in the alphabets KMS requires: access key id 20
# chars of A-Z2-7; secret = Base64 of 32 random bytes (44 chars, 256 bits).
random_akid() { LC_ALL=C tr -dc 'A-Z2-7' </dev/urandom | head -c 20; }
random_secret() { head -c 32 /dev/urandom | base64 | tr -d '\n'; }
random_pin() { head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
keep() { # keep NAME GENERATOR: the value stored in $state/NAME, made once
    local f="$state/$1"
    [[ -s $f ]] || "$2" >"$f"
    cat "$f"
}

export XKS_HSM_PIN=${XKS_HSM_PIN:-$(keep hsm-pin random_pin)}
so_pin=$(keep hsm-so-pin random_pin)
akid=${XKS_ACCESS_KEY_ID:-$(keep access-key-id random_akid)}
export XKS_SECRET=${XKS_SECRET:-$(keep secret random_secret)}

if ! softhsm2-util --show-slots 2>/dev/null | grep -q 'Label:[[:space:]]*xks-demo[[:space:]]*$'; then
    echo "softhsm-demo: initialising token xks-demo" >&2
    softhsm2-util --init-token --free --label xks-demo --so-pin "$so_pin" --pin "$XKS_HSM_PIN" >/dev/null
fi

config="$state/xks-proxy.toml"
sed -e "s|@LISTEN@|$listen|" -e "s|@PING_LISTEN@|$ping|" \
    -e "s|@TLS_CERT@|$cert|" -e "s|@TLS_KEY@|$tlskey|" \
    -e "s|@PKCS11_MODULE@|$module|" -e "s|@PATH_PREFIX@|$prefix|" \
    -e "s|@ACCESS_KEY_ID@|$akid|" "$template" >"$config"

# The demo key, once. (Without a dedicated health-check key on the token, GetHealthStatus
# reports the token DEGRADED; /ping stays 200 and every operation works.)
if ! "$proxy" keys list --config "$config" | grep -q "^$key "; then
    "$proxy" keys create --config "$config" --label "$key" >&2
fi

cat >&2 <<EOF

xks-proxy softhsm-demo — SoftHSMv2 token, throw-away credentials. NOT for production.
  XksProxyUriPath     $prefix/kms/xks/v1
  AccessKeyId         $akid
  RawSecretAccessKey  $XKS_SECRET
  external key id     $key

EOF
exec "$proxy" serve --config "$config"
