DROP TABLE usage_ledger;
DROP TABLE api_keys;
DROP TABLE users;
