#!/bin/sh
# Start Pebble with a TLS certificate for its own HTTPS listener (Debian's package ships none).
#
# On first start, writes a throwaway CA (ca.pem) and a server certificate for the names in
# PEBBLE_TLS_NAMES into PEBBLE_TLS_DIR (a volume the certqueue containers mount read-only, with
# CERTQUEUE_ACME__CA_BUNDLE pointing at ca.pem). The certificates carry SubjectKeyIdentifier,
# AuthorityKeyIdentifier and CA key usage, which strict X.509 checks require.
# Extra arguments go to pebble (e.g. -dnsserver 172.30.77.53:8053).
set -eu

dir="${PEBBLE_TLS_DIR:-/pebble-tls}"
config="${PEBBLE_CONFIG:-/etc/pebble/pebble-config.json}"
names="${PEBBLE_TLS_NAMES:-pebble localhost 127.0.0.1}"

if [ ! -s "$dir/cert.pem" ] || [ ! -s "$dir/key.pem" ] || [ ! -s "$dir/ca.pem" ]; then
  umask 077
  work=$(mktemp -d)
  san=""
  for n in $names; do
    case "$n" in
      *[!0-9.]*) entry="DNS:$n" ;;
      *) entry="IP:$n" ;;
    esac
    san="${san:+$san,}$entry"
  done
  first=$(echo "$names" | awk '{print $1}')
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=certqueue local pebble CA" -keyout "$work/ca.key" -out "$work/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,digitalSignature,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$first" -keyout "$work/key.pem" -out "$work/req.csr" 2>/dev/null
  cat > "$work/ext.cnf" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid:always
subjectAltName=$san
EXT
  openssl x509 -req -in "$work/req.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" -CAcreateserial \
    -days 825 -sha256 -extfile "$work/ext.cnf" -out "$work/leaf.pem" 2>/dev/null
  cat "$work/leaf.pem" "$work/ca.pem" > "$dir/cert.pem"
  cp "$work/key.pem" "$dir/key.pem"
  cp "$work/ca.pem" "$dir/ca.pem"
  chmod 0644 "$dir/cert.pem" "$dir/ca.pem"
  chmod 0600 "$dir/key.pem"
  rm -rf "$work"
fi

exec pebble -config "$config" "$@"
