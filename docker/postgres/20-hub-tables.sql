-- The hub: a SQL database that receives Dataverse accounts and contacts and Business
-- Central customers (the links of docker/sync.yaml). Runs once, in the `hub` database.
-- Each link's key maps to the primary key, which is what upserts match on.

CREATE TABLE crm_accounts (
    accountid       UUID PRIMARY KEY,
    name            TEXT NOT NULL,
    accountnumber   TEXT,
    city            TEXT,
    revenue         NUMERIC(16, 2),
    employees       INTEGER,
    primary_contact UUID,
    modified        TIMESTAMPTZ
);

CREATE TABLE crm_contacts (
    contactid   UUID PRIMARY KEY,
    firstname   TEXT,
    lastname    TEXT,
    parent      UUID,
    parent_type TEXT,
    birthdate   DATE
);

CREATE TABLE erp_customers (
    number   TEXT PRIMARY KEY,
    name     TEXT,
    email    TEXT,
    city     TEXT,
    credit   NUMERIC(12, 2),
    blocked  TEXT,
    modified TIMESTAMPTZ
);
