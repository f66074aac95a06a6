//! Reserving: a request's maximum cost added to `reserved` of every budget that applies, with
//! one conditional UPDATE each, or to none. A scope whose UPDATE matched nothing is looked at
//! ([`Budgets::diagnose`]) and fixed (a default's row created or brought in step, a period
//! rolled over, expired reservations released) before the next attempt.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::settle::Reservation;
use super::{headers, remaining_of, Applied, Period, Rfc3339, ScopeKey, ScopeKind};
use crate::core::policy::{lookup_failed, store_failed, AdmitArgs, Budgets};
use crate::core::pricing::{micros_to_usd, Usd};
use crate::core::{Reason, Rejection};
use crate::error::PolicyHeaders;
use crate::short_text::ShortText;
use crate::store::{
    BudgetRow, ReserveOutcome, ReserveRequest, ReserveScope, Settlement, StoreError,
};

/// How many times a reservation is tried before the request gets an internal error: each miss
/// fixes what it found, so a few attempts settle any race.
const ATTEMPTS: usize = 8;

/// What to do after a scope's UPDATE matched nothing.
enum Step {
    Retry,
    Reload,
    Ahead(i64),
    Exceeded(BudgetRow),
}

impl Budgets {
    /// Reserves `max_cost` in every budget of `applied`, retrying after each fix; returns the
    /// reservation (none if no budget applies after all) and the tightest budget's headers.
    pub(in crate::core::policy) async fn reserve(
        self: &Arc<Self>,
        a: &AdmitArgs<'_>,
        mut applied: Vec<Applied>,
        max_cost: i64,
    ) -> Result<(Option<Reservation>, PolicyHeaders), Rejection> {
        let reservation_id = uuid::Uuid::new_v4().simple().to_string();
        let ttl_ms = (a.config.reservation_ttl_secs as i64).saturating_mul(1000);
        // A row found ahead of our clock (another replica's clock is later) sets the period.
        let mut starts: HashMap<ScopeKey, i64> = HashMap::new();
        let mut waited = false;
        let failed = |e: StoreError| store_failed("budget reservation", e);
        for _ in 0..ATTEMPTS {
            let now = self.clock.now_ms();
            let attempt = ReserveRequest {
                scopes: reserve_scopes(&applied, &starts, now),
                amount: max_cost,
                reservation_id: reservation_id.clone(),
                request_id: a.request_id.to_string(),
                now,
                expires_at: now.saturating_add(ttl_ms),
                durable: !a.config.fast_reservations,
            };
            let tried = attempt.scopes.clone();
            let i = match self.reserve_detached(attempt, applied.clone()).await {
                Ok(ReserveOutcome::Reserved(rows)) => {
                    return Ok(reserved(reservation_id, &rows, &applied, now))
                }
                Ok(ReserveOutcome::Missed(i)) => i,
                Err(e) => return Err(failed(e)),
            };
            let ap = applied[i].clone();
            match self
                .diagnose(&ap, &tried[i], max_cost, now, &mut waited)
                .await
                .map_err(failed)?
            {
                Step::Retry => {}
                Step::Ahead(start) => {
                    starts.insert(ap.key, start);
                }
                Step::Reload => {
                    self.forget(ap.key);
                    applied = self
                        .load_scopes(a.principal, 0)
                        .await
                        .map_err(lookup_failed)?
                        .applied(a.service_type);
                    if applied.is_empty() {
                        return Ok((None, Vec::new()));
                    }
                }
                Step::Exceeded(row) => return Err(exceeded(&row, &ap, max_cost, now)),
            }
        }
        Err(Rejection::internal(
            "budget reservation did not settle after repeated attempts",
        ))
    }

    /// Runs the reservation on a task of its own, so that a request cancelled meanwhile (its
    /// client went away) cannot cut the transaction short; a reservation nobody is left to
    /// receive is released at once.
    async fn reserve_detached(
        self: &Arc<Self>,
        attempt: ReserveRequest,
        applied: Vec<Applied>,
    ) -> Result<ReserveOutcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        let engine = self.clone();
        tokio::spawn(async move {
            let reservation_id = attempt.reservation_id.clone();
            let turn = engine.settler.write_turn(&engine.store).await;
            engine.writes.count("reserve");
            let result = engine.store.budget_reserve_with(attempt).await;
            drop(turn);
            let unknown = matches!(&result, Err(e) if engine.store.commit_unknown(e));
            if let Err(Ok(ReserveOutcome::Reserved(rows))) = tx.send(result) {
                let reservation = Reservation {
                    id: reservation_id,
                    parts: parts(&rows, &applied),
                };
                let (settlement, keys) = reservation.settlement(0, None, engine.clock.now_ms());
                engine.settler.enqueue(settlement, keys);
            } else if unknown {
                // The request is refused, but the hold may have been written: release it by id
                // (a no-op if it was not), rather than leave it until it expires.
                let keys = applied.iter().map(|ap| ap.key).collect();
                engine
                    .settler
                    .enqueue(Settlement::release_only(reservation_id), keys);
            }
        });
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(
                "budget reservation task failed".into(),
            )),
        }
    }

    /// Works out why a scope's UPDATE matched nothing, and fixes it if it can.
    async fn diagnose(
        &self,
        ap: &Applied,
        tried: &ReserveScope,
        cost: i64,
        now: i64,
        waited: &mut bool,
    ) -> Result<Step, StoreError> {
        let (scope, subject) = (ap.key.0.as_str(), ap.key.1);
        let Some(row) = self.store.budget_get(scope, subject).await? else {
            if ap.explicit {
                return Ok(Step::Reload);
            }
            let limit = ap.default_limit.unwrap_or(0);
            self.writes.count("fix");
            self.store
                .budget_insert_default(
                    scope,
                    subject,
                    limit,
                    &ap.period.name(),
                    tried.period_start,
                    now,
                )
                .await?;
            return Ok(Step::Retry);
        };
        if row.explicit != ap.explicit {
            return Ok(Step::Reload);
        }
        let name = ap.period.name();
        if !row.explicit && (Some(row.limit_micros) != ap.default_limit || row.period != name) {
            self.writes.count("fix");
            self.store
                .budget_sync_default(
                    row.id,
                    ap.default_limit.unwrap_or(0),
                    &name,
                    tried.period_start,
                    now,
                )
                .await?;
            return Ok(Step::Retry);
        }
        if row.period != name {
            return Ok(Step::Reload);
        }
        if row.period_start < tried.period_start {
            self.writes.count("fix");
            self.store
                .budget_rollover(row.id, &name, tried.period_start, now)
                .await?;
            return Ok(Step::Retry);
        }
        if row.period_start > tried.period_start {
            return Ok(Step::Ahead(row.period_start));
        }
        // The row agrees with us: there is no room. Settlements this replica still has queued
        // can only give room back; expired reservations of crashed replicas too.
        // `cost` may be i64::MAX (a saturated maximum cost): compare the room, which cannot
        // overflow, not the sum, which can.
        if cost > room(&row) {
            if !*waited && self.settler.pending(ap.key) > 0 {
                *waited = true;
                self.settler
                    .wait_settled(ap.key, Duration::from_secs(2))
                    .await;
                return Ok(Step::Retry);
            }
            if row.reserved_micros > 0 {
                let turn = self.settler.write_turn(&self.store).await;
                self.writes.count("release");
                let released = self
                    .store
                    .budget_expire_reservations(
                        Some(row.id),
                        self.clock.now_ms(),
                        1000,
                        self.charge_expired,
                    )
                    .await;
                drop(turn);
                if released? > 0 {
                    return Ok(Step::Retry);
                }
            }
            return Ok(Step::Exceeded(row));
        }
        // It fits now (a settlement landed in between): try again.
        Ok(Step::Retry)
    }
}

/// What a row has room for: its limit less its spend and holds (never overflows: all three are
/// at least 0, and the database only accepts a hold that fits).
fn room(row: &BudgetRow) -> i64 {
    row.limit_micros
        .saturating_sub(row.spent_micros)
        .saturating_sub(row.reserved_micros)
}

/// The scopes of one attempt as this replica believes them to be.
fn reserve_scopes(
    applied: &[Applied],
    starts: &HashMap<ScopeKey, i64>,
    now: i64,
) -> Vec<ReserveScope> {
    applied
        .iter()
        .map(|ap| ReserveScope {
            scope: ap.key.0.as_str(),
            subject_id: ap.key.1,
            explicit: ap.explicit,
            default_limit: ap.default_limit,
            period: ap.period.name(),
            period_start: starts
                .get(&ap.key)
                .copied()
                .unwrap_or_else(|| ap.period.start(now)),
        })
        .collect()
}

/// Each reserved row with the period and scope it was reserved under.
fn parts(rows: &[BudgetRow], applied: &[Applied]) -> Vec<(i64, Period, ScopeKey)> {
    rows.iter()
        .zip(applied)
        .map(|(r, ap)| (r.id, ap.period, ap.key))
        .collect()
}

/// The reservation made, and the headers of the budget it leaves the least room in.
fn reserved(
    id: String,
    rows: &[BudgetRow],
    applied: &[Applied],
    now: i64,
) -> (Option<Reservation>, PolicyHeaders) {
    let tightest = rows
        .iter()
        .zip(applied)
        .min_by_key(|(r, ap)| remaining_of(r, ap.period, now));
    let headers = tightest
        .map(|(row, ap)| budget_headers(row, ap, now))
        .unwrap_or_default();
    let reservation = Reservation {
        id,
        parts: parts(rows, applied),
    };
    (Some(reservation), headers)
}

fn budget_headers(row: &BudgetRow, ap: &Applied, now: i64) -> PolicyHeaders {
    budget_headers_of(
        ap,
        row.limit_micros,
        remaining_of(row, ap.period, now),
        row.period_start,
        now,
    )
}

/// The headers of a budget with `limit`, `remaining` left, in a period that started at
/// `period_start` (or later, if a new one began since).
pub(super) fn budget_headers_of(
    ap: &Applied,
    limit: i64,
    remaining: i64,
    period_start: i64,
    now: i64,
) -> PolicyHeaders {
    let mut h = Vec::with_capacity(4);
    h.push((&headers::SCOPE, ShortText::from(ap.key.0.as_str())));
    h.push((&headers::LIMIT, Usd(limit).text()));
    h.push((&headers::REMAINING, Usd(remaining.max(0)).text()));
    let start = period_start.max(ap.period.start(now));
    if let Some(end) = ap.period.end(start) {
        h.push((&headers::RESET, Rfc3339(end).text()));
    }
    h
}

fn exceeded(row: &BudgetRow, ap: &Applied, cost: i64, now: i64) -> Rejection {
    let remaining = remaining_of(row, ap.period, now).max(0);
    let whose = match ap.key.0 {
        ScopeKind::User => "this user's",
        ScopeKind::Key => "this API key's",
    };
    let period = match ap.period {
        Period::Total => "in total".to_string(),
        p => format!("per {} period", p.name()),
    };
    let mut r = Rejection::new(
        Reason::BudgetExceeded,
        format!(
            "{whose} budget of ${} {period} has ${} left (some may be held by requests in flight); this request may cost up to ${}",
            micros_to_usd(row.limit_micros),
            micros_to_usd(remaining),
            micros_to_usd(cost),
        ),
    );
    let start = row.period_start.max(ap.period.start(now));
    if let Some(end) = ap.period.end(start) {
        // Settled spend alone leaves no room: nothing changes before the period ends.
        if cost > row.limit_micros.saturating_sub(row.spent_micros) {
            r = r.with_retry_after(Duration::from_millis((end - now).max(1000) as u64));
        }
    }
    r.headers = budget_headers(row, ap, now);
    r
}
