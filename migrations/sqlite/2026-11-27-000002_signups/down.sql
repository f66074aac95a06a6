DROP INDEX users_signups;
