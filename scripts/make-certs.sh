#!/usr/bin/env bash
# Certificates for a production broker (docker-compose.production.yml): a CA of your own and the
# broker's certificate for the names sites reach it by, signed by that CA. With openssl alone.
#   scripts/make-certs.sh DIR HOST [HOST...]      e.g. scripts/make-certs.sh certs broker.example.org
# Writes DIR/ca.pem (give it to sites: fedq provision --ca-file DIR/ca.pem), DIR/ca.key (the CA's
# key: keep it offline, it signs anything), DIR/server.pem and DIR/server.key (the broker's).
# An existing DIR/ca.key is kept, so a new broker certificate is trusted by sites that have ca.pem.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DIR HOST [HOST...] (the names or addresses sites connect to)" >&2; exit 2; }
dir=$1; shift
mkdir -p "$dir"
umask 077
if [ ! -f "$dir/ca.key" ]; then
  openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -subj "/CN=fedq CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
fi
names=""
for host in "$@"; do
  if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then names+="IP:$host,"; else names+="DNS:$host,"; fi
done
openssl req -newkey rsa:3072 -nodes -subj "/CN=$1" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "${names%,}" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial -days 825 \
  -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext"
# The broker reads its key as its own user inside its container, which is not yours on the host.
chmod 644 "$dir/ca.pem" "$dir/server.pem" "$dir/server.key"
echo "certificates in $dir for ${names%,}: ca.pem for sites, server.pem and server.key for the broker; keep ca.key offline"
