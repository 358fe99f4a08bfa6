-- Least-privilege roles for edge-gateway, part 2: run as a superuser after
-- `edge-gateway migrate` ran as edge_gateway (which then owns every table).
-- Hands everything but edge.readings to edge_owner and grants back only
-- what the gateway does.
ALTER TABLE edge.alerts OWNER TO edge_owner;
ALTER TABLE edge.rollups_1m OWNER TO edge_owner;
ALTER TABLE edge.dead_letters OWNER TO edge_owner;
ALTER TABLE edge.device_watermarks OWNER TO edge_owner;
ALTER TABLE edge.message_ids OWNER TO edge_owner;
ALTER TABLE edge.applied_batches OWNER TO edge_owner;
ALTER TABLE edge.gateway_meta OWNER TO edge_owner;

-- Rows in, and the bookkeeping the gateway keeps up to date.
-- DELETE: the gateway applies [retention] to alerts, dead letters and
-- rollups, and prunes its bookkeeping past dedup.horizon_secs.
GRANT SELECT, INSERT, DELETE ON edge.alerts, edge.dead_letters TO edge_gateway;
GRANT SELECT, INSERT, UPDATE, DELETE ON edge.rollups_1m, edge.device_watermarks TO edge_gateway;
GRANT SELECT, INSERT, DELETE ON edge.message_ids, edge.applied_batches TO edge_gateway;
-- The schema version and the instance id spools are checked against.
GRANT SELECT ON edge.gateway_meta TO edge_gateway;

-- Readers (dashboards, analysts) get their own role.
CREATE ROLE edge_reader NOLOGIN;
GRANT USAGE ON SCHEMA edge TO edge_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA edge TO edge_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE edge_gateway IN SCHEMA edge GRANT SELECT ON TABLES TO edge_reader;
