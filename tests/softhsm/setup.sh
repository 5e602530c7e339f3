#!/usr/bin/env bash
# tests/softhsm/setup.sh DIR [LABEL] [SO_PIN] [USER_PIN]
#
# Owns: a throw-away SoftHSMv2 environment for the PKCS#11 backend tests.
#
# Writes DIR/softhsm2.conf (tokendir DIR/tokens, file object store, removable slots
# off), initialises one token in it with the given label / SO PIN / user PIN
# (defaults: xks-test / 12345678 / 1234) and prints the `export` lines a test runner
# evaluates:
#
#   eval "$(tests/softhsm/setup.sh "$(mktemp -d)")"
#   cargo test --test backend_pkcs11
#
# The PINs are test-only values for a token that lives in a temporary directory; no
# real key ever goes into a token made by this script.
#
# Printed variables:
#   SOFTHSM2_CONF                 the config SoftHSM reads at C_Initialize
#   XKS_TEST_PKCS11_MODULE        the module path found on this machine
#   XKS_TEST_SOFTHSM_TOKEN_LABEL  the token made here
#   XKS_TEST_SOFTHSM_USER_PIN     its user PIN (test value)
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 DIR [LABEL] [SO_PIN] [USER_PIN]" >&2
    exit 2
fi
dir=$1
label=${2:-xks-test}
so_pin=${3:-12345678}
user_pin=${4:-1234}

if ! command -v softhsm2-util >/dev/null 2>&1; then
    echo "softhsm2-util not found: apt-get install -y softhsm2 (or your distro's package)" >&2
    exit 1
fi

module=""
for candidate in \
    "${XKS_TEST_PKCS11_MODULE:-}" \
    /usr/lib/softhsm/libsofthsm2.so \
    /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
    /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so \
    /usr/local/lib/softhsm/libsofthsm2.so \
    /usr/lib64/pkcs11/libsofthsm2.so \
    /opt/homebrew/lib/softhsm/libsofthsm2.so; do
    if [[ -n "$candidate" && -f "$candidate" ]]; then
        module=$candidate
        break
    fi
done
if [[ -z "$module" ]]; then
    echo "libsofthsm2.so not found; set XKS_TEST_PKCS11_MODULE" >&2
    exit 1
fi

mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
conf="$dir/softhsm2.conf"
cat >"$conf" <<CONF
# Written by tests/softhsm/setup.sh: a throw-away token directory for tests.
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
slots.mechanisms = ALL
library.reset_on_fork = false
CONF

SOFTHSM2_CONF="$conf" softhsm2-util --init-token --free --label "$label" \
    --so-pin "$so_pin" --pin "$user_pin" >/dev/null

printf 'export SOFTHSM2_CONF=%q\n' "$conf"
printf 'export XKS_TEST_PKCS11_MODULE=%q\n' "$module"
printf 'export XKS_TEST_SOFTHSM_TOKEN_LABEL=%q\n' "$label"
printf 'export XKS_TEST_SOFTHSM_USER_PIN=%q\n' "$user_pin"
