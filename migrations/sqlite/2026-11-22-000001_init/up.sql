CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    external_id TEXT NOT NULL UNIQUE,
    name TEXT,
    auth_method TEXT NOT NULL,
    service_type TEXT,
    blocked BOOLEAN NOT NULL DEFAULT FALSE,
    blocked_reason TEXT,
    blocked_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX users_created_at ON users (created_at);

CREATE TABLE api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id BIGINT NOT NULL REFERENCES users (id),
    name TEXT,
    key_hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    source TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX api_keys_user ON api_keys (user_id);

CREATE TABLE usage_ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    user_id BIGINT,
    key_id BIGINT,
    protocol TEXT NOT NULL,
    requested_model TEXT NOT NULL,
    resolved_model TEXT,
    service_type TEXT,
    purpose TEXT,
    stream BOOLEAN NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost_micros BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    finished_at BIGINT NOT NULL
);
CREATE INDEX usage_ledger_request ON usage_ledger (request_id);
CREATE INDEX usage_ledger_user_time ON usage_ledger (user_id, started_at);
