-- Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d),
-- connected to the `hub` database (POSTGRES_DB) as `syncbus` (POSTGRES_USER).
--
-- The state store of the workers: detector checkpoints and leases, the id map,
-- applied versions and content hashes, sync history. syncbus creates its tables.
CREATE DATABASE syncbus_state OWNER syncbus;
