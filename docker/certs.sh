#!/usr/bin/env bash
# Credentials for a SuperLink with TLS and authenticated SuperNodes, for local use
# and testing (as Flower's guides make them; a real deployment uses certificates
# from its own CA and keeps the private keys on their hosts).
#
#   docker/certs.sh [OUT_DIR [SUPERNODES [EXTRA_SAN...]]]
#
# OUT_DIR (default docker/certs) receives:
#   ca.crt, ca.key            a self-signed CA (the root certificate clients trust:
#                             `fedsim run --root-certificates OUT_DIR/ca.crt`)
#   superlink.crt/.key        the SuperLink's certificate, signed by the CA, valid for
#                             localhost, 127.0.0.1, ::1, `superlink` (the Compose
#                             service) and every EXTRA_SAN (a DNS name or an IP)
#   supernode-N, .pub         SUPERNODES (default 3) ECDSA P-384 key pairs in OpenSSH
#                             format: the private key for
#                             `flower-supernode --auth-supernode-private-key`, the
#                             public key to register with the SuperLink
#                             (`fedsim supernodes --register supernode-N.pub`)
# Existing files are kept (re-running adds what is missing), so keys registered
# once stay valid. Needs openssl and ssh-keygen.
set -euo pipefail
out=${1:-"$(dirname "$0")/certs"}
nodes=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "certs.sh: $tool not found" >&2; exit 1; }
done
mkdir -p "$out"
cd "$out"
umask 077

if [ ! -f ca.crt ]; then
  openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes -keyout ca.key \
    -out ca.crt -subj "/O=fedsim/CN=fedsim local root CA" 2>/dev/null
fi

if [ ! -f superlink.crt ]; then
  sans="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:superlink"
  for san in "$@"; do
    if [[ $san =~ ^[0-9.]+$ || $san == *:* ]]; then sans+=",IP:$san"; else sans+=",DNS:$san"; fi
  done
  openssl req -newkey rsa:4096 -sha256 -nodes -keyout superlink.key \
    -out superlink.csr -subj "/O=fedsim/CN=superlink" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$sans" > superlink.ext
  openssl x509 -req -in superlink.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out superlink.crt -days 365 -sha256 -extfile superlink.ext 2>/dev/null
  rm -f superlink.csr superlink.ext
fi

for ((i = 0; i < nodes; i++)); do
  [ -f "supernode-$i" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "supernode-$i"
done
# Certificates and public keys are public; private keys stay readable by their
# owner only (the containers run as root).
chmod 644 ca.crt superlink.crt supernode-*.pub
echo "certs.sh: wrote $(pwd)"
