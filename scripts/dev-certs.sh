#!/bin/sh
# A throwaway certificate authority and a server certificate for the broker's TLS and WSS
# listeners, for development and the compose stack (its one-shot service `certs` runs this).
#
#   scripts/dev-certs.sh [--force] [DIR]        # DIR defaults to ./certs
#
# Writes DIR/ca.crt (what clients trust: `mosquitto_pub --cafile`, `device-sim --cafile`),
# DIR/server.crt and DIR/server.key (`mqtt.tls.cert_file` and `mqtt.tls.key_file`). The server
# certificate names localhost, broker (the compose service), 127.0.0.1 and ::1; set
# DEV_CERTS_NAMES to add names, e.g. DEV_CERTS_NAMES="DNS:mqtt.lan,IP:192.168.1.20". The CA's
# private key is deleted once it has signed: nothing else can be signed with it, and nothing
# secret is left but server.key (mode 0600). Needs OpenSSL 1.1.1 or later.
#
# Idempotent: with all three files present it keeps them and exits 0; with only some of them,
# or a server certificate that expires within a day, it refuses (exit 1). --force replaces them.
set -eu

force=false
dir=
for arg in "$@"; do
    case "$arg" in
        --force) force=true ;;
        -h | --help)
            sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "dev-certs: unknown option $arg (see --help)" >&2
            exit 2
            ;;
        *)
            if [ -n "$dir" ]; then
                echo "dev-certs: one directory only (see --help)" >&2
                exit 2
            fi
            dir=$arg
            ;;
    esac
done
dir=${dir:-certs}
names="DNS:localhost,DNS:broker,IP:127.0.0.1,IP:::1${DEV_CERTS_NAMES:+,$DEV_CERTS_NAMES}"

command -v openssl >/dev/null || {
    echo "dev-certs: openssl not found: install OpenSSL 1.1.1 or later" >&2
    exit 1
}
mkdir -p "$dir"

present=0
for f in ca.crt server.crt server.key; do
    if [ -e "$dir/$f" ]; then
        present=$((present + 1))
    fi
done
if [ "$force" = false ] && [ "$present" -gt 0 ]; then
    if [ "$present" -lt 3 ]; then
        echo "dev-certs: $dir holds only some of ca.crt, server.crt, server.key; run with" \
            "--force to replace them all" >&2
        exit 1
    fi
    if ! openssl x509 -in "$dir/server.crt" -noout -checkend 86400 >/dev/null; then
        echo "dev-certs: $dir/server.crt has expired or expires within a day; run with" \
            "--force to replace it (clients then need the new ca.crt)" >&2
        exit 1
    fi
    echo "dev-certs: keeping the certificates in $dir (--force replaces them)"
    exit 0
fi

# Everything is made in a private directory next to the result, then moved into place.
umask 077
work=$(mktemp -d "$dir/.dev-certs.XXXXXX")
trap 'rm -rf "$work"' EXIT

cat >"$work/openssl.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no

[dn]
CN = Heartwire development CA

[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server_ext]
# rustls (webpki) accepts no CA certificate as a server's, and wants the serverAuth usage.
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $names
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF

# Runs openssl quietly, showing what it said only when it fails.
quiet_openssl() {
    if ! out=$(openssl "$@" 2>&1); then
        printf 'dev-certs: openssl %s failed:\n%s\n' "$1" "$out" >&2
        exit 1
    fi
}
quiet_openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/ca.key"
quiet_openssl req -new -x509 -config "$work/openssl.cnf" -extensions ca_ext \
    -key "$work/ca.key" -sha256 -days 3650 -out "$work/ca.crt"
quiet_openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/server.key"
quiet_openssl req -new -config "$work/openssl.cnf" -subj "/CN=localhost" \
    -key "$work/server.key" -out "$work/server.csr"
# 825 days: the longest validity some clients (Apple's) accept for a server certificate.
quiet_openssl x509 -req -in "$work/server.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -sha256 -days 825 \
    -extfile "$work/openssl.cnf" -extensions server_ext -out "$work/server.crt"
quiet_openssl verify -CAfile "$work/ca.crt" "$work/server.crt"

chmod 0644 "$work/ca.crt" "$work/server.crt"
chmod 0600 "$work/server.key"
for f in server.key server.crt ca.crt; do
    mv -f "$work/$f" "$dir/$f"
done
echo "dev-certs: wrote $dir/ca.crt, $dir/server.crt and $dir/server.key for $names"
