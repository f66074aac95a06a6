//! Process lifecycle on the built binary, each gateway a separate process (issue 13 items 1-3
//! and 7, issue 14 item 5): SIGTERM under load, SIGKILL and restart, a database that goes
//! away while requests flow, two replicas on one fresh database, a rolling restart. The
//! database is counted directly: every request that reached a gateway must have exactly one
//! ledger row, and no lease or reservation may be left behind.

mod crash;
mod harness;
mod outage;
mod replicas;
mod rolling;
mod shutdown;
