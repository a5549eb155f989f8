#!/usr/bin/env bash
# Generate the TLS material and SuperNode authentication keys used by
# docker/with-tls.yml (and by tests that start real flower-superlink /
# flower-supernode processes on 127.0.0.1).
#
# Usage:
#   docker/generate_certs.sh [OUT_DIR] [NUM_SUPERNODES]
#
#   OUT_DIR         folder that receives certs/ and keys/ (default: the folder
#                   holding this script, i.e. docker/)
#   NUM_SUPERNODES  number of SuperNode key pairs (default: 3)
#
# Optional environment:
#   EXTRA_SANS      extra subjectAltName entries for the SuperLink certificate,
#                   comma separated, e.g. "DNS:flower.example.org,IP:10.0.0.5"
#   CERT_DAYS       validity of the CA and server certificate (default: 365)
#
# Produces (existing files are overwritten):
#   OUT_DIR/certs/ca.crt          self-signed CA certificate (give to SuperNodes,
#                                 the ServerApp SuperExec and the flwr CLI)
#   OUT_DIR/certs/ca.key          CA private key (never mounted into a container)
#   OUT_DIR/certs/server.pem      SuperLink certificate signed by the CA, SANs:
#                                 DNS:superlink, DNS:localhost, IP:127.0.0.1, IP:::1
#   OUT_DIR/certs/server.key      SuperLink private key
#   OUT_DIR/keys/supernode-I      SuperNode I auth private key (ECDSA P-384, OpenSSH)
#   OUT_DIR/keys/supernode-I.pub  SuperNode I auth public key (register it with
#                                 `flwr supernode register`)
#   for I = 0 .. NUM_SUPERNODES-1.
#
# Needs only `openssl` (OpenSSL >= 1.1.1 or LibreSSL) and `ssh-keygen`.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
OUT_DIR="${1:-$SCRIPT_DIR}"
NUM_SUPERNODES="${2:-3}"
CERT_DAYS="${CERT_DAYS:-365}"
EXTRA_SANS="${EXTRA_SANS:-}"

if ! [[ "$NUM_SUPERNODES" =~ ^[0-9]+$ ]] || [ "$NUM_SUPERNODES" -lt 1 ]; then
    echo "error: NUM_SUPERNODES must be a positive integer, got '$NUM_SUPERNODES'" >&2
    exit 2
fi
if ! [[ "$CERT_DAYS" =~ ^[0-9]+$ ]] || [ "$CERT_DAYS" -lt 1 ]; then
    echo "error: CERT_DAYS must be a positive integer, got '$CERT_DAYS'" >&2
    exit 2
fi
for tool in openssl ssh-keygen; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "error: '$tool' is required but was not found on PATH" >&2
        exit 127
    fi
done

CERT_DIR="$OUT_DIR/certs"
KEY_DIR="$OUT_DIR/keys"
mkdir -p "$CERT_DIR" "$KEY_DIR"

WORK_DIR="$(mktemp -d)"
trap 'rm -rf "$WORK_DIR"' EXIT

SANS="DNS:superlink,DNS:localhost,IP:127.0.0.1,IP:::1"
if [ -n "$EXTRA_SANS" ]; then
    SANS="$SANS,$EXTRA_SANS"
fi

# Keys are ECDSA P-384 (fast to generate, accepted by Python's ssl/uvicorn and
# httpx). Config files instead of `-addext` keep this portable to LibreSSL (macOS).
cat >"$WORK_DIR/ca.cnf" <<CNF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = AutoFLIP Flower CA
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
CNF

cat >"$WORK_DIR/server.cnf" <<CNF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = superlink
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $SANS
CNF

umask 077  # private keys: owner-only

echo "==> CA certificate: $CERT_DIR/ca.crt"
rm -f "$CERT_DIR/ca.key" "$CERT_DIR/ca.crt"
openssl ecparam -name secp384r1 -genkey -noout -out "$CERT_DIR/ca.key"
openssl req -x509 -new -sha256 -days "$CERT_DAYS" \
    -key "$CERT_DIR/ca.key" \
    -config "$WORK_DIR/ca.cnf" -extensions v3_ca \
    -out "$CERT_DIR/ca.crt"

echo "==> SuperLink certificate: $CERT_DIR/server.pem (SANs: $SANS)"
rm -f "$CERT_DIR/server.key" "$CERT_DIR/server.pem"
openssl ecparam -name secp384r1 -genkey -noout -out "$CERT_DIR/server.key"
openssl req -new -sha256 \
    -key "$CERT_DIR/server.key" \
    -config "$WORK_DIR/server.cnf" \
    -out "$WORK_DIR/server.csr"
openssl x509 -req -sha256 -days "$CERT_DAYS" \
    -in "$WORK_DIR/server.csr" \
    -CA "$CERT_DIR/ca.crt" -CAkey "$CERT_DIR/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" \
    -extfile "$WORK_DIR/server.cnf" -extensions v3_server \
    -out "$CERT_DIR/server.pem" 2>/dev/null
chmod 644 "$CERT_DIR/ca.crt" "$CERT_DIR/server.pem"

openssl verify -CAfile "$CERT_DIR/ca.crt" "$CERT_DIR/server.pem" >/dev/null

echo "==> $NUM_SUPERNODES SuperNode key pair(s) in $KEY_DIR"
for ((i = 0; i < NUM_SUPERNODES; i++)); do
    key="$KEY_DIR/supernode-$i"
    rm -f "$key" "$key.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$key"
    chmod 644 "$key.pub"
done

echo "Done. Private keys are readable by their owner only; see docker/README.md"
echo "for the file ownership the Flower containers (uid 49999) need."
