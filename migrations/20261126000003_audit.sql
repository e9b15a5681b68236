-- Who did what through the admin and service APIs. The actor is the name
-- of the admin or service key used, never the key itself.
CREATE TABLE admin_audit (
    id         BIGSERIAL PRIMARY KEY,
    at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,
    user_id    TEXT,
    details    JSONB NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX admin_audit_at_idx ON admin_audit (at DESC);
CREATE INDEX admin_audit_user_idx ON admin_audit (user_id, at DESC);
