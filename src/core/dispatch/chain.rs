//! The walk along a route's targets: which comes next, which failures move on, and the
//! rejection of a chain that failed.

use std::time::Duration;

use crate::core::gateway::Gateway;
use crate::core::{Reason, Rejection};
use crate::metrics::FallbackLabels;
use crate::providers::UpstreamError;
use crate::routing::{Route, Target};

/// The order in which one request tries a route's targets, with the fallbacks it took.
pub(super) struct ChainWalk<'r> {
    targets: &'r [Target],
    healthy: Vec<bool>,
    any_healthy: bool,
    next: usize,
    /// Moves away from a target not yet attributed to the target moved to.
    pending: Vec<(&'r str, &'static str)>,
    attempts: Vec<(String, UpstreamError)>,
}

impl<'r> ChainWalk<'r> {
    pub(super) fn new(route: &'r Route) -> Self {
        let healthy: Vec<bool> = route
            .targets
            .iter()
            .map(|t| t.provider.health.is_healthy())
            .collect();
        let any_healthy = healthy.iter().any(|h| *h);
        Self {
            targets: &route.targets,
            healthy,
            any_healthy,
            next: 0,
            pending: Vec::new(),
            attempts: Vec::new(),
        }
    }

    /// The next target to try; counts the fallbacks that led to it.
    pub(super) fn next_target(&mut self, gateway: &Gateway) -> Option<&'r Target> {
        while self.next < self.targets.len() {
            let i = self.next;
            self.next += 1;
            let target = &self.targets[i];
            // When every entry is unhealthy the chain is tried anyway: failing without an
            // attempt would turn a recovering provider into a certain failure.
            if self.any_healthy && !self.healthy[i] {
                self.pending.push((&target.resolved, "unhealthy_skipped"));
                continue;
            }
            for (from, reason) in self.pending.drain(..) {
                gateway
                    .metrics()
                    .fallback
                    .get_or_create(&FallbackLabels {
                        from_model: from.to_string(),
                        to_model: target.resolved.clone(),
                        reason,
                    })
                    .inc();
            }
            return Some(target);
        }
        None
    }

    /// Records a failed attempt; returns whether the walk should go on.
    pub(super) fn failed(&mut self, target: &'r Target, e: UpstreamError) -> bool {
        match fallback_reason(&e) {
            Some(reason) => {
                self.pending.push((&target.resolved, reason));
                self.attempts.push((target.resolved.clone(), e));
                true
            }
            None => {
                self.attempts.push((target.resolved.clone(), e));
                false
            }
        }
    }

    pub(super) fn into_rejection(self) -> Rejection {
        chain_failure(self.attempts)
    }
}

/// Why a failure moves on to the next target (the `fallback_total` reason), or `None` when
/// it is the caller's doing and must not.
fn fallback_reason(e: &UpstreamError) -> Option<&'static str> {
    match e {
        UpstreamError::Connect(_) => Some("connect_error"),
        UpstreamError::Timeout(_) => Some("timeout"),
        UpstreamError::KeysExhausted { .. } => Some("keys_exhausted"),
        UpstreamError::BadResponse(_) => Some("upstream_5xx"),
        UpstreamError::Unsupported(_) => None,
        UpstreamError::Status { status: 429, .. } => Some("rate_limited"),
        UpstreamError::Status { status: 408, .. } => Some("timeout"),
        UpstreamError::Status { status, .. } if *status >= 500 => Some("upstream_5xx"),
        UpstreamError::Status { .. } => None,
    }
}

/// Whether a failure says the provider itself is in trouble (for provider health).
pub(super) fn counts_against_health(e: &UpstreamError) -> bool {
    match e {
        UpstreamError::Connect(_) | UpstreamError::Timeout(_) | UpstreamError::BadResponse(_) => {
            true
        }
        UpstreamError::Status { status, .. } => *status >= 500,
        UpstreamError::KeysExhausted { .. } | UpstreamError::Unsupported(_) => false,
    }
}

/// The reason an upstream error counts as.
pub(crate) fn upstream_reason(e: &UpstreamError) -> Reason {
    match e {
        UpstreamError::Timeout(_) => Reason::UpstreamTimeout,
        UpstreamError::KeysExhausted { retry_after } => Reason::UpstreamKeysExhausted {
            all_disabled: retry_after.is_none(),
        },
        UpstreamError::Status { status, .. }
            if (400..500).contains(status) && !matches!(status, 401 | 403 | 408 | 429) =>
        {
            Reason::UpstreamRejected
        }
        UpstreamError::Unsupported(_) => Reason::InvalidRequest,
        _ => Reason::UpstreamError,
    }
}

/// One rejection for a chain that failed: the last cause decides the reason; the message lists
/// every attempt.
fn chain_failure(attempts: Vec<(String, UpstreamError)>) -> Rejection {
    let Some((_, last)) = attempts.last() else {
        return Rejection::new(
            Reason::UpstreamError,
            "no upstream target is available for this model",
        );
    };
    let reason = upstream_reason(last);
    let retry_after = match last {
        // Whole seconds, rounded up: the caller should not come back before a key is usable.
        UpstreamError::KeysExhausted {
            retry_after: Some(d),
        } => Some(Duration::from_secs(
            d.as_secs() + u64::from(d.subsec_nanos() > 0),
        )),
        _ => None,
    };
    let rejection = chain_message(reason, &attempts);
    match retry_after {
        Some(d) => rejection.with_retry_after(d),
        None => rejection,
    }
}

fn chain_message(reason: Reason, attempts: &[(String, UpstreamError)]) -> Rejection {
    if attempts.len() == 1 {
        let (target, e) = &attempts[0];
        let message = match e {
            UpstreamError::Status { message, .. } if reason == Reason::UpstreamRejected => {
                format!("{target} rejected the request: {message}")
            }
            e => format!("{target}: {e}"),
        };
        return Rejection::new(reason, message);
    }
    let listed: Vec<String> = attempts.iter().map(|(t, e)| format!("{t}: {e}")).collect();
    Rejection::new(
        reason,
        format!(
            "all {} targets failed: {}",
            attempts.len(),
            listed.join("; ")
        ),
    )
}
