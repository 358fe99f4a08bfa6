#!/bin/sh
# Demo stack only: gives the edge_gateway role (created without a password
# by sql/roles.sql) the password from EDGE_GATEWAY_PASSWORD.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v pw="$EDGE_GATEWAY_PASSWORD" <<'SQL'
ALTER ROLE edge_gateway PASSWORD :'pw';
SQL
