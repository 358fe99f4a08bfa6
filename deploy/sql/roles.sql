-- Least-privilege roles for edge-gateway, part 1: run once as a superuser,
-- before `edge-gateway migrate`. Then run migrate as edge_gateway, then
-- deploy/sql/grants.sql as a superuser.
--
-- edge_owner owns the schema and every table except edge.readings.
-- edge_gateway, the role the gateway logs in as, owns edge.readings only:
-- PostgreSQL lets only the owner of a partitioned table add partitions,
-- and the gateway creates them on demand for late or early data. On every
-- other table it may insert (and update its own bookkeeping), nothing else.
-- Known limit: CREATE on the schema (needed for partitions) also lets it
-- create unrelated tables there.
CREATE ROLE edge_owner NOLOGIN;
-- No password here: set one out of band (psql: \password edge_gateway) or
-- authenticate by client certificate; never commit one.
CREATE ROLE edge_gateway LOGIN;
CREATE SCHEMA IF NOT EXISTS edge AUTHORIZATION edge_owner;
GRANT USAGE, CREATE ON SCHEMA edge TO edge_gateway;
