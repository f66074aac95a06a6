-- Which inbound API a model request came in on (chat_completions, messages); rows written
-- before the column existed were all chat completions.
ALTER TABLE usage_ledger ADD COLUMN api TEXT NOT NULL DEFAULT 'chat_completions';
