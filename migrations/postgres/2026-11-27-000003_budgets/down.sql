DROP INDEX IF EXISTS usage_ledger_time;
DROP INDEX IF EXISTS usage_ledger_key_time;
DROP TABLE IF EXISTS rate_limits;
DROP TABLE IF EXISTS budget_reservations;
DROP TABLE IF EXISTS budgets;
