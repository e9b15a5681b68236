-- Monthly invoices. A closed period's invoice is stored whole (`content`,
-- what every download renders) with its number, taken from the seller's
-- counter in the same transaction: numbers are gap-free and never reused.
CREATE TABLE invoice_counters (
    seller TEXT PRIMARY KEY,               -- the seller's NIF
    last   BIGINT NOT NULL
);

CREATE TABLE invoices (
    user_id   TEXT NOT NULL,
    period    TEXT NOT NULL,               -- YYYY-MM, local
    seller    TEXT NOT NULL,
    number    BIGINT NOT NULL,
    issued_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    content   JSONB NOT NULL,
    PRIMARY KEY (user_id, period),
    UNIQUE (seller, number)
);
