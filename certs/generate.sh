#!/usr/bin/env bash
# Regenerates the DEV/TEST PKI in this folder. Never deploy these: the private keys are
# public (they are in the repository). Needs only openssl.
#
#   ca.pem / ca.key                  dev root CA (ECDSA P-256)
#   server-ecdsa.pem / .key          server cert (P-256): localhost, 127.0.0.1, ::1, xks.test.example
#   server-rsa.pem / .key            the same names with an RSA-2048 key (the spec allows both)
#   kms-client.pem / .key            a KMS-like client cert: CN=cks.kms.us-east-1.amazonaws.com
#   wrong-name-client.pem / .key     a client cert from the same CA with another name
#   expired-client.pem / .key        a KMS-named client cert that expired in 2020
#   self-signed-client.pem / .key    a KMS-named client cert not issued by the CA
set -euo pipefail
cd "$(dirname "$0")"
DAYS=3650
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

openssl ecparam -name prime256v1 -genkey -noout -out "$tmp/ca.key"
openssl pkcs8 -topk8 -nocrypt -in "$tmp/ca.key" -out ca.key
openssl req -x509 -new -key ca.key -sha256 -days $DAYS -subj "/CN=xks-proxy dev CA (never trust in production)" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.pem

server_ext() {
  cat <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,DNS:xks.test.example,IP:127.0.0.1,IP:::1
EXT
}
client_ext() {
  cat <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=DNS:$1
EXT
}

issue() { # name keyfile subject extfile [days] [startdate enddate]
  local name=$1 key=$2 subj=$3 ext=$4
  openssl req -new -key "$key" -subj "$subj" -out "$tmp/$name.csr"
  openssl x509 -req -in "$tmp/$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -CAserial "$tmp/ca.srl" \
    -sha256 -days "${5:-$DAYS}" -extfile "$ext" -out "$name.pem"
}

openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out server-ecdsa.key
server_ext > "$tmp/server.ext"
issue server-ecdsa server-ecdsa.key "/CN=localhost" "$tmp/server.ext"

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out server-rsa.key
issue server-rsa server-rsa.key "/CN=localhost" "$tmp/server.ext"

openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out kms-client.key
client_ext cks.kms.us-east-1.amazonaws.com > "$tmp/kms.ext"
issue kms-client kms-client.key "/CN=cks.kms.us-east-1.amazonaws.com" "$tmp/kms.ext"

openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out wrong-name-client.key
client_ext not-kms.example.com > "$tmp/wrong.ext"
issue wrong-name-client wrong-name-client.key "/CN=not-kms.example.com" "$tmp/wrong.ext"

# Expired: valid 2019-01-01 .. 2020-01-01, signed by the dev CA.
openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out expired-client.key
openssl req -new -key expired-client.key -subj "/CN=cks.kms.us-east-1.amazonaws.com" -out "$tmp/expired.csr"
# `openssl x509` cannot backdate (before OpenSSL 3.4); `openssl ca` can.
mkdir -p "$tmp/ca"; : > "$tmp/ca/index.txt"
cat > "$tmp/ca.cnf" <<CNF
[ca]
default_ca = dev
[dev]
dir = $tmp/ca
database = $tmp/ca/index.txt
new_certs_dir = $tmp/ca
serial = $tmp/ca.srl
default_md = sha256
policy = any
copy_extensions = none
[any]
commonName = supplied
CNF
openssl ca -batch -config "$tmp/ca.cnf" -cert ca.pem -keyfile ca.key -in "$tmp/expired.csr" \
  -startdate 20190101000000Z -enddate 20200101000000Z -extfile "$tmp/kms.ext" -notext -out expired-client.pem

openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out self-signed-client.key
openssl req -x509 -new -key self-signed-client.key -sha256 -days $DAYS -subj "/CN=cks.kms.us-east-1.amazonaws.com" \
  -addext "subjectAltName=DNS:cks.kms.us-east-1.amazonaws.com" -addext "extendedKeyUsage=clientAuth" -out self-signed-client.pem

chmod 0644 ./*.pem ./*.key
echo "regenerated dev PKI in $(pwd)"
