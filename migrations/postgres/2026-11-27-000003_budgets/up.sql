-- Budgets: one row per scope (a user or an API key) holding its limit, its period and the
-- period's counters. A period rolls over when a reservation or settlement finds an older
-- period_start (no background job, no scan). Money is integer micro-dollars, times unix ms.
CREATE TABLE budgets (
    id BIGSERIAL PRIMARY KEY,
    scope TEXT NOT NULL,
    subject_id BIGINT NOT NULL,
    -- Set through the admin API or CLI; false: the service type's default, kept in step with
    -- the configuration.
    explicit BOOLEAN NOT NULL,
    limit_micros BIGINT NOT NULL,
    -- daily | weekly | monthly | total | a duration such as 12h
    period TEXT NOT NULL,
    period_start BIGINT NOT NULL,
    spent_micros BIGINT NOT NULL DEFAULT 0,
    -- Maximum costs of requests in flight; carried over a rollover.
    reserved_micros BIGINT NOT NULL DEFAULT 0,
    updated_at BIGINT NOT NULL,
    UNIQUE (scope, subject_id)
);

-- One row per scope a request reserved in; deleted by its settlement, or released by anyone
-- once expired (a crashed replica never settles).
CREATE TABLE budget_reservations (
    id TEXT NOT NULL,
    budget_id BIGINT NOT NULL REFERENCES budgets (id) ON DELETE CASCADE,
    request_id TEXT NOT NULL,
    amount_micros BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (id, budget_id)
);
CREATE INDEX budget_reservations_expiry ON budget_reservations (expires_at);
CREATE INDEX budget_reservations_budget_expiry ON budget_reservations (budget_id, expires_at);

-- Per-scope rate limits set through the admin API (a user's override of the service type's
-- default, or a key's own).
CREATE TABLE rate_limits (
    scope TEXT NOT NULL,
    subject_id BIGINT NOT NULL,
    rpm BIGINT,
    tpm BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (scope, subject_id)
);

CREATE INDEX usage_ledger_key_time ON usage_ledger (key_id, started_at);
CREATE INDEX usage_ledger_time ON usage_ledger (started_at);
