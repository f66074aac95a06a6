//! What every HTTP upstream shares: a pooled client, the key-pool walk on 429/401/403, the
//! three deadlines (first byte, idle between chunks, total), and reading SSE `data` payloads.
//!
//! The client is hyper's pooled client with a rustls connector, not reqwest: on the request
//! path reqwest parsed the URL twice a request and ran redirect and retry layers that an
//! upstream call never uses (bench/README.md, "Where the CPU goes").

mod failure;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use http_body_util::{BodyDataStream, BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::key_pool::{KeyPoolSettings, KeyVerdict};
use super::sse::{EventSplitter, SseParser, SseTooLong};
use super::{KeyPool, KeyPoolObserver, UpstreamError};
use crate::clock::Clock;
use crate::config::HttpUpstreamConfig;
use failure::{classify, deepest_cause, error_message, retry_after};

/// An upstream's answer, its body not read yet.
pub type UpstreamResponse = http::Response<hyper::body::Incoming>;

use super::connector::Connector;

/// How a pool key is presented to the upstream.
#[derive(Debug, Clone, Copy)]
pub enum KeyHeader {
    /// `Authorization: Bearer <key>` (OpenAI and compatible servers).
    Bearer,
    /// `x-api-key: <key>` (Anthropic).
    XApiKey,
}

impl KeyHeader {
    fn name(self) -> HeaderName {
        match self {
            KeyHeader::Bearer => AUTHORIZATION,
            KeyHeader::XApiKey => HeaderName::from_static("x-api-key"),
        }
    }

    /// The header value of `secret`, marked sensitive (kept out of hyper's debug output).
    fn value(self, secret: &str) -> Option<HeaderValue> {
        let mut v = match self {
            KeyHeader::Bearer => HeaderValue::try_from(format!("Bearer {secret}")).ok()?,
            KeyHeader::XApiKey => HeaderValue::from_str(secret).ok()?,
        };
        v.set_sensitive(true);
        Some(v)
    }
}

/// An upstream endpoint: its URL and the `Host` header that goes with it, both made once.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    uri: http::Uri,
    /// `host[:port]` as hyper's client would format it for every request (the port only when
    /// it is not the scheme's default), made once here instead.
    host: HeaderValue,
}

/// Parses an upstream URL built from a validated `base_url`.
pub fn upstream_url(name: &str, url: String) -> Result<UpstreamUrl, String> {
    let bad = |e: &dyn std::fmt::Display| format!("providers.{name}: bad upstream URL: {e}");
    let uri = http::Uri::try_from(url).map_err(|e| bad(&e))?;
    let host = uri.host().ok_or_else(|| bad(&"no host"))?;
    let default_port = match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    };
    let host = match uri.port_u16() {
        Some(port) if Some(port) != default_port => format!("{host}:{port}"),
        _ => host.to_string(),
    };
    let host = HeaderValue::try_from(host).map_err(|e| bad(&e))?;
    Ok(UpstreamUrl { uri, host })
}

/// A pooled HTTP client for one provider, with its key pool and deadlines.
pub struct HttpUpstream {
    client: Client<Connector, Full<Bytes>>,
    keys: KeyPool,
    key_header: KeyHeader,
    /// The header value of each pool key, by its index in the pool, made once.
    key_values: Vec<HeaderValue>,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    total_timeout: Duration,
    /// The most bytes of one whole answer or one SSE event (`max_response_bytes`).
    max_response_bytes: usize,
    clock: Clock,
}

// Made at compile time: a `&str` name is parsed and checked again on every insert.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// `User-Agent` of every upstream call.
const AGENT: &str = concat!("tollgate/", env!("CARGO_PKG_VERSION"));

impl HttpUpstream {
    /// Builds the client; the base URL was validated with the config.
    pub fn new(
        name: &str,
        cfg: &HttpUpstreamConfig,
        key_header: KeyHeader,
        clock: Clock,
        observer: Arc<dyn KeyPoolObserver>,
    ) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(cfg.connect_timeout_ms)));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let connector = Connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.max_idle_connections)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        let key_values = cfg
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                key_header.value(k).ok_or_else(|| {
                    format!("providers.{name}: keys[{i}] cannot be sent in an HTTP header")
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            client,
            keys: KeyPool::new(
                name,
                cfg.keys.clone(),
                KeyPoolSettings {
                    default_cooldown: Duration::from_secs(cfg.rate_limit_cooldown_secs),
                    auth_failure_cooldown: cfg.auth_failure_cooldown_secs.map(Duration::from_secs),
                },
                clock.clone(),
                observer,
            ),
            clock,
            key_header,
            key_values,
            first_byte_timeout: Duration::from_millis(cfg.first_byte_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
            total_timeout: Duration::from_millis(cfg.total_timeout_ms),
            max_response_bytes: usize::try_from(cfg.max_response_bytes).unwrap_or(usize::MAX),
        })
    }

    /// The key pool, for operators.
    pub fn keys(&self) -> &KeyPool {
        &self.keys
    }

    /// The deadline of a call starting now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.total_timeout
    }

    /// The request of one attempt: `body` to `url` with the pool key at index `key`, if any.
    fn request(
        &self,
        url: &UpstreamUrl,
        request_id: &str,
        trace: Option<&super::TraceHeaders>,
        headers: &[(&'static str, &str)],
        key: Option<usize>,
        body: Bytes,
    ) -> Result<http::Request<Full<Bytes>>, UpstreamError> {
        let header = |name: &str, value: &str| {
            HeaderValue::from_str(value).map_err(|_| {
                UpstreamError::Unsupported(format!("`{name}` cannot be sent as an HTTP header"))
            })
        };
        let mut req = http::Request::new(Full::new(body));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = url.uri.clone();
        let h = req.headers_mut();
        h.reserve(8);
        h.insert(HOST, url.host.clone());
        h.insert(USER_AGENT, HeaderValue::from_static(AGENT));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(X_REQUEST_ID, header(X_REQUEST_ID.as_str(), request_id)?);
        for (name, value) in headers {
            h.insert(HeaderName::from_static(name), header(name, value)?);
        }
        if let Some(t) = trace {
            h.insert(TRACEPARENT, header(TRACEPARENT.as_str(), &t.traceparent)?);
            if let Some(state) = &t.tracestate {
                h.insert(TRACESTATE, header(TRACESTATE.as_str(), state)?);
            }
        }
        if let Some(index) = key {
            // The pool and `key_values` were built from the same keys, in the same order.
            let value = self.key_values.get(index).cloned().ok_or_else(|| {
                UpstreamError::Unsupported(format!("pool key {index} has no header value"))
            })?;
            h.insert(self.key_header.name(), value);
        }
        Ok(req)
    }

    /// POSTs `body` to `url`, walking the key pool: a 429, 401 or 403 marks the key and the
    /// same body goes to the next usable key. Nothing has reached the caller yet, so this is
    /// safe for streams too. `headers` and the trace context are sent with every attempt.
    pub async fn post(
        &self,
        url: &UpstreamUrl,
        request_id: &str,
        trace: Option<&super::TraceHeaders>,
        headers: &[(&'static str, &str)],
        body: Bytes,
        deadline: Instant,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let mut walk = self.keys.walk();
        let result = loop {
            let key = walk.next_key();
            if key.is_none() && !self.keys.is_keyless() {
                let (outcome, retry_after) = self.keys.exhaustion();
                self.keys
                    .observer()
                    .exhausted(self.keys.provider(), outcome);
                break Err(UpstreamError::KeysExhausted { retry_after });
            }
            let index = key.map(|(index, _)| index);
            let req = self.request(url, request_id, trace, headers, index, body.clone())?;
            let wait = self
                .first_byte_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            let resp = match tokio::time::timeout(wait, self.client.request(req)).await {
                Err(_) => break Err(UpstreamError::Timeout("first byte")),
                Ok(Err(e)) => break Err(classify(&e)),
                Ok(Ok(r)) => r,
            };
            let status = resp.status().as_u16();
            if resp.status().is_success() {
                break Ok(resp);
            }
            let retry_after = retry_after(resp.headers(), self.clock.now_ms());
            let verdict = match status {
                429 => Some(KeyVerdict::RateLimited(retry_after)),
                401 => Some(KeyVerdict::Unauthorized),
                403 => Some(KeyVerdict::Forbidden),
                _ => None,
            };
            match (key, verdict) {
                (Some((index, _)), Some(verdict)) => {
                    self.keys.report(index, verdict);
                    if let Some(t) = trace {
                        t.reject_key(index, status);
                    }
                    // Read the small error body so that the connection can be reused.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        resp.into_body().collect(),
                    )
                    .await;
                }
                _ => {
                    // An error body is only read for its message: bounded like any answer.
                    let text = tokio::time::timeout(
                        deadline.saturating_duration_since(Instant::now()),
                        read_capped(resp, self.max_response_bytes.min(1 << 20)),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                    break Err(UpstreamError::Status {
                        status,
                        message: self.keys.redact(&error_message(&text)),
                        retry_after,
                    });
                }
            }
        };
        if !self.keys.is_keyless() {
            self.keys
                .observer()
                .keys_tried(self.keys.provider(), walk.tried());
        }
        result
    }

    /// Reads a whole answer before the deadline, at most `max_response_bytes` of it: past the
    /// cap the response is dropped unread (and its connection with it), so memory stays bounded.
    pub async fn body(
        &self,
        resp: UpstreamResponse,
        deadline: Instant,
    ) -> Result<bytes::Bytes, UpstreamError> {
        tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            read_capped(resp, self.max_response_bytes),
        )
        .await
        .map_err(|_| UpstreamError::Timeout("total"))?
    }

    /// The SSE `data` payloads of a streamed answer, each within the idle deadline and all
    /// within the total one. Ends at the end of the body.
    pub fn sse_data(
        &self,
        resp: UpstreamResponse,
        deadline: Instant,
    ) -> impl Stream<Item = Result<String, UpstreamError>> + Send + 'static {
        self.sse_items(
            resp,
            deadline,
            SseParser::with_limit(self.max_response_bytes),
        )
    }

    /// The events of a streamed answer that carry data, as their exact bytes and `data`
    /// payloads (for a pass-through), with the same deadlines as [`HttpUpstream::sse_data`].
    /// A comment (`: keep-alive`) or any other event without data is not yielded, as
    /// `sse_data` yields none: passed on, it would start the caller's answer (a 200 with
    /// nothing in it, and no more fallback).
    pub fn sse_raw(
        &self,
        resp: UpstreamResponse,
        deadline: Instant,
    ) -> impl Stream<Item = Result<DataEvent, UpstreamError>> + Send + 'static {
        self.sse_items(
            resp,
            deadline,
            EventSplitter::with_limit(self.max_response_bytes),
        )
    }

    /// What `decoder` makes of a streamed body, each read within the idle deadline and all
    /// within the total one. Ends at the end of the body.
    fn sse_items<D: SseDecoder>(
        &self,
        resp: UpstreamResponse,
        deadline: Instant,
        decoder: D,
    ) -> impl Stream<Item = Result<D::Item, UpstreamError>> + Send + 'static {
        let idle = self.idle_timeout;
        let state = (
            BodyDataStream::new(resp.into_body()),
            decoder,
            VecDeque::<D::Item>::new(),
            false,
        );
        futures_util::stream::unfold(
            state,
            move |(mut bytes, mut decoder, mut pending, mut done)| async move {
                loop {
                    if let Some(item) = pending.pop_front() {
                        return Some((Ok(item), (bytes, decoder, pending, done)));
                    }
                    if done {
                        return None;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        return Some((
                            Err(UpstreamError::Timeout("total")),
                            (bytes, decoder, pending, true),
                        ));
                    }
                    let wait = idle.min(deadline - now);
                    match tokio::time::timeout(wait, bytes.next()).await {
                        Err(_) => {
                            let phase = if wait < idle { "total" } else { "next chunk" };
                            return Some((
                                Err(UpstreamError::Timeout(phase)),
                                (bytes, decoder, pending, true),
                            ));
                        }
                        Ok(Some(Ok(b))) => match decoder.push(&b) {
                            Ok(items) => pending.extend(items),
                            Err(e) => {
                                let err = UpstreamError::BadResponse(e.to_string());
                                return Some((Err(err), (bytes, decoder, pending, true)));
                            }
                        },
                        Ok(Some(Err(e))) => {
                            let err = UpstreamError::BadResponse(format!("stream broke: {e}"));
                            return Some((Err(err), (bytes, decoder, pending, true)));
                        }
                        Ok(None) => {
                            // A clean end: the provider decides whether the answer was whole.
                            pending.extend(decoder.finish());
                            done = true;
                        }
                    }
                }
            },
        )
    }
}

/// A push decoder of an SSE body: what [`HttpUpstream::sse_items`] feeds the bytes to.
trait SseDecoder: Send + 'static {
    type Item: Send + 'static;
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<Self::Item>, SseTooLong>;
    fn finish(&mut self) -> Option<Self::Item>;
}

impl SseDecoder for SseParser {
    type Item = String;
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, SseTooLong> {
        SseParser::push(self, bytes)
    }
    fn finish(&mut self) -> Option<String> {
        SseParser::finish(self)
    }
}

impl SseDecoder for EventSplitter {
    type Item = DataEvent;
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<DataEvent>, SseTooLong> {
        let events = EventSplitter::push(self, bytes)?;
        Ok(events.into_iter().filter_map(with_data).collect())
    }
    fn finish(&mut self) -> Option<DataEvent> {
        EventSplitter::finish(self).and_then(with_data)
    }
}

fn with_data((raw, data): super::sse::RawEventBytes) -> Option<DataEvent> {
    data.map(|d| (raw, d))
}

/// The whole body, refused as soon as it (or its announced length) passes `max` bytes.
async fn read_capped(resp: UpstreamResponse, max: usize) -> Result<Bytes, UpstreamError> {
    let too_large = || {
        UpstreamError::BadResponse(format!(
            "the upstream answer exceeds max_response_bytes ({max} bytes)"
        ))
    };
    let mut body = resp.into_body();
    if http_body::Body::size_hint(&body)
        .exact()
        .is_some_and(|n| n > max as u64)
    {
        return Err(too_large());
    }
    // An answer that arrives as one chunk (the usual case) is kept as it came, without a copy.
    let mut whole: Option<Bytes> = None;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| UpstreamError::BadResponse(deepest_cause(&e)))?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        let held = whole.as_ref().map_or(0, |w| w.len()) + buf.len();
        if held + chunk.len() > max {
            return Err(too_large());
        }
        if held == 0 {
            whole = Some(chunk);
            continue;
        }
        if let Some(w) = whole.take() {
            buf.reserve(w.len() + chunk.len());
            buf.extend_from_slice(&w);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(whole.unwrap_or_else(|| buf.freeze()))
}

/// One SSE event with data, as sent: its bytes and its `data` payload.
pub type DataEvent = (Bytes, String);

#[cfg(test)]
mod tests {
    use super::upstream_url;

    #[test]
    fn the_host_header_is_made_as_hyper_would_make_it() {
        for (url, host) in [
            (
                "http://127.0.0.1:8080/v1/chat/completions",
                "127.0.0.1:8080",
            ),
            (
                "https://api.openai.com/v1/chat/completions",
                "api.openai.com",
            ),
            ("http://vllm/v1/chat/completions", "vllm"),
            ("http://vllm:80/v1/embeddings", "vllm"),
            (
                "https://api.anthropic.com:443/v1/messages",
                "api.anthropic.com",
            ),
            ("https://gateway.internal:80/v1", "gateway.internal:80"),
            ("http://[::1]:9000/v1/responses", "[::1]:9000"),
        ] {
            let made = upstream_url("up", url.to_string()).expect(url);
            assert_eq!(made.host, host, "{url}");
            assert_eq!(made.uri.to_string(), url);
        }
    }

    #[test]
    fn a_url_without_a_host_is_refused_with_the_provider_named() {
        let err = upstream_url("up", "/v1/chat/completions".to_string()).unwrap_err();
        assert!(err.starts_with("providers.up: bad upstream URL"), "{err}");
    }
}
