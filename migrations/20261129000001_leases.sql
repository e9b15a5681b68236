-- Credit leases (docs/LEASES.md): three new event kinds, and the lease a
-- row belongs to.
--
-- lease        credits a gateway took from the balance to spend locally
--              (from_monthly/from_bonus: where they came from)
-- lease_return the part of a lease not spent, given back when its gateway
--              settled it (amount: not spent; from_monthly/from_bonus: what
--              of it went back to the balance)
-- lease_lost   a lease whose gateway never settled it: its credits stay spent
--
-- The calls spent from a lease are ordinary `charge` (and `refund`) rows with
-- this lease's id and no balance after them (monthly_after IS NULL): the
-- balance moved once, with the lease. `ledger verify` checks every lease:
-- spent + returned = taken.

DO $$
DECLARE c text;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint
             WHERE conrelid = 'ledger_events'::regclass AND contype = 'c'
               AND pg_get_constraintdef(oid) LIKE '%kind%'
    LOOP
        EXECUTE format('ALTER TABLE ledger_events DROP CONSTRAINT %I', c);
    END LOOP;
END $$;

-- Validating it reads every partition once (a few seconds per ten million
-- rows); the gateway's writes wait behind that.
ALTER TABLE ledger_events ADD CONSTRAINT ledger_events_kind_check CHECK (kind IN
    ('charge', 'refund', 'grant', 'reset', 'plan_change', 'block', 'unblock',
     'lease', 'lease_return', 'lease_lost'));

ALTER TABLE ledger_events ADD COLUMN lease_id TEXT;
