#!/bin/sh
# docker-compose.yml's CA service: initialise /data once, then serve.
# `meshbridge-ca init` refuses to overwrite an existing CA, so it runs only while /data/ca.json is
# absent; the passphrase (MESHBRIDGE_CA_KEY_PASSPHRASE) and the PostgreSQL URL
# (MESHBRIDGE_DATABASE_URL) come from the environment and are never written to ca.json.
set -eu

DATA_DIR=${MESHBRIDGE_DATA_DIR:-/data}
: "${MESHBRIDGE_CA_KEY_PASSPHRASE:?set MESHBRIDGE_CA_KEY_PASSPHRASE (the root key passphrase)}"

if [ -f "$DATA_DIR/ca.json" ]; then
  echo "compose-entrypoint: $DATA_DIR already holds a CA; skipping init"
else
  echo "compose-entrypoint: initialising the CA in $DATA_DIR"
  meshbridge-ca init --data-dir "$DATA_DIR" \
    --key-type "${MESHBRIDGE_CA_KEY_TYPE:-ecdsa-p256}" --org "${MESHBRIDGE_CA_ORG:-meshbridge}"
fi

# The first --server-name goes into $DATA_DIR/server-url: the name other containers use.
# localhost is there for the health check, which verifies the certificate against root-cert.pem.
exec meshbridge-ca serve --data-dir "$DATA_DIR" --listen 0.0.0.0:8443 \
  --server-name "${MESHBRIDGE_SERVER_NAME:-ca}" --server-name localhost "$@"
