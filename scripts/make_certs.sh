#!/usr/bin/env bash
# A local certificate authority and a SuperLink server certificate, for tests and trials on one
# machine. Not for production: a hospital network uses certificates from its own PKI.
#
#   scripts/make_certs.sh [OUT_DIR] [EXTRA_NAME ...]
#
# OUT_DIR (default: certs/, git-ignored) receives
#   ca.crt      give to every SuperNode (--root-certificates) and to `flwr` (root-certificates)
#   ca.key      keep private (signs certificates)
#   server.crt  SuperLink certificate, valid for localhost, 127.0.0.1, ::1 and every EXTRA_NAME
#   server.key  SuperLink private key (--ssl-keyfile)
# EXTRA_NAME: more host names or IP addresses the SuperLink is reached by (e.g. superlink.example.org
# or 10.0.0.5).
set -euo pipefail

out="${1:-certs}"
shift || true
mkdir -p "$out"
days=365

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then san="$san,IP:$name"; else san="$san,DNS:$name"; fi
done

openssl req -x509 -newkey rsa:2048 -sha256 -nodes -days "$days" \
  -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=Med-StyleGAN2-FL test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

openssl req -newkey rsa:2048 -sha256 -nodes -keyout "$out/server.key" -out "$out/server.csr" \
  -subj "/CN=localhost" 2>/dev/null

ext="$out/server.ext"
cat > "$ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san
EXT
openssl x509 -req -sha256 -days "$days" -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -out "$out/server.crt" -extfile "$ext" 2>/dev/null
rm -f "$out/server.csr" "$ext" "$out/ca.srl"
chmod 600 "$out/ca.key" "$out/server.key"

openssl verify -CAfile "$out/ca.crt" "$out/server.crt" >/dev/null
echo "certificates in $out: ca.crt (for SuperNodes and flwr), server.crt + server.key (for the SuperLink); SAN $san"
