-- Signups are counted per service type over a rolling day.
CREATE INDEX users_signups ON users (service_type, auth_method, created_at);
