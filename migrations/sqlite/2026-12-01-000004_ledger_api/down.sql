ALTER TABLE usage_ledger DROP COLUMN api;
