//! The gRPC benchmark's baseline: the least a gRPC-to-OpenAI gateway can do. A tonic server for
//! `tollgate.v1.Gateway` whose `Complete` and `StreamComplete` build the upstream
//! chat-completions JSON from the request, POST it with a pooled hyper client, and turn the
//! answer into messages with a small typed parse: no auth, no policy, no ledger. Whatever
//! tollgate's gRPC API adds on top of this is what its policies, accounting and translation
//! cost (bench/README.md).

use std::net::SocketAddr;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use clap::Parser;
use futures_util::Stream;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tollgate::proto;
use tollgate::proto::gateway_server::{Gateway, GatewayServer};
use tonic::{Response, Status};

/// Command-line options of the bare gRPC gateway.
#[derive(Parser, Debug)]
#[command(about = "Minimal tonic gRPC-to-OpenAI pass-through: the gRPC benchmark's baseline")]
struct Args {
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// The OpenAI-compatible upstream, as host:port.
    #[arg(long)]
    upstream: SocketAddr,
    /// Tokio worker threads (0: one per CPU the process may run on).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

/// The upstream request: only the fields a `CompleteRequest` can fill without extras.
#[derive(Serialize)]
struct UpstreamRequest<'a> {
    model: &'a str,
    messages: Vec<UpstreamMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct UpstreamMessage<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Deserialize, Default)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    total_tokens: u32,
}

impl From<Usage> for proto::Usage {
    fn from(u: Usage) -> Self {
        proto::Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            ..Default::default()
        }
    }
}

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    id: String,
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Option<Text>,
    delta: Option<Text>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Text {
    content: Option<String>,
}

type Pool = Client<HttpConnector, Full<Bytes>>;
type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::CompleteChunk, Status>> + Send>>;

/// The gateway: an upstream address and a connection pool, nothing else.
struct Bare {
    client: Pool,
    uri: Uri,
    host: HeaderValue,
}

impl Bare {
    /// POSTs the request upstream; the answer's body if it is a 200.
    async fn call(&self, req: &proto::CompleteRequest, stream: bool) -> Result<Incoming, Status> {
        // `provider/model` names the upstream's model after the slash; that is all the
        // routing a one-upstream gateway needs.
        let model = req.model.split_once('/').map_or(&*req.model, |(_, m)| m);
        let body = UpstreamRequest {
            model,
            messages: req
                .messages
                .iter()
                .map(|m| UpstreamMessage {
                    role: &m.role,
                    content: &m.content,
                })
                .collect(),
            max_tokens: req.max_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            stop: &req.stop,
            stream,
        };
        let json = serde_json::to_vec(&body).map_err(|e| Status::internal(e.to_string()))?;
        let mut up = Request::new(Full::new(Bytes::from(json)));
        *up.method_mut() = Method::POST;
        *up.uri_mut() = self.uri.clone();
        up.headers_mut().insert(HOST, self.host.clone());
        up.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let resp = self
            .client
            .request(up)
            .await
            .map_err(|e| Status::unavailable(format!("upstream: {e}")))?;
        if resp.status() != StatusCode::OK {
            return Err(Status::unavailable(format!(
                "upstream answered {}",
                resp.status()
            )));
        }
        Ok(resp.into_body())
    }
}

fn bad_upstream(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("upstream answer: {e}"))
}

/// One SSE `data:` line as a chunk message; `None` for `[DONE]`.
fn chunk(line: &[u8], model: &str) -> Option<Result<proto::CompleteChunk, Status>> {
    if line == b"[DONE]" {
        return None;
    }
    let parsed: Completion = match serde_json::from_slice(line) {
        Ok(c) => c,
        Err(e) => return Some(Err(bad_upstream(e))),
    };
    let first = parsed.choices.into_iter().next();
    let (content, finish) = first.map_or((None, None), |c| {
        (c.delta.and_then(|d| d.content), c.finish_reason)
    });
    Some(Ok(proto::CompleteChunk {
        id: parsed.id,
        resolved_model: model.to_string(),
        delta_content: content.unwrap_or_default(),
        finish_reason: finish.unwrap_or_default(),
        usage: parsed.usage.map(Into::into),
        chunk_json: String::from_utf8_lossy(line).into_owned(),
        ..Default::default()
    }))
}

/// State of a stream being cut into `data:` lines.
struct Lines {
    body: Incoming,
    buf: BytesMut,
    model: String,
    done: bool,
}

/// The next chunk of the stream: the next `data:` line, reading more body as needed.
async fn next_chunk(mut s: Lines) -> Option<(Result<proto::CompleteChunk, Status>, Lines)> {
    loop {
        if s.done {
            return None;
        }
        while let Some(nl) = s.buf.iter().position(|&b| b == b'\n') {
            let line = s.buf.split_to(nl + 1);
            let line = line.strip_suffix(b"\n").unwrap_or(&line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.strip_prefix(b" ").unwrap_or(data);
            match chunk(data, &s.model) {
                Some(c) => return Some((c, s)),
                None => {
                    s.done = true;
                    return None;
                }
            }
        }
        match s.body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    s.buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                s.done = true;
                return Some((Err(Status::unavailable(format!("upstream: {e}"))), s));
            }
            // A stream cut before [DONE] ends without an error here: the least a gateway does.
            None => return None,
        }
    }
}

#[tonic::async_trait]
impl Gateway for Bare {
    async fn authorize(
        &self,
        _: tonic::Request<proto::AuthorizeRequest>,
    ) -> Result<Response<proto::AuthorizeResponse>, Status> {
        Err(Status::unimplemented("not in the baseline"))
    }

    async fn complete(
        &self,
        request: tonic::Request<proto::CompleteRequest>,
    ) -> Result<Response<proto::CompleteResponse>, Status> {
        let req = request.into_inner();
        let body = self.call(&req, false).await?;
        let bytes = body
            .collect()
            .await
            .map_err(|e| Status::unavailable(format!("upstream: {e}")))?
            .to_bytes();
        let parsed: Completion = serde_json::from_slice(&bytes).map_err(bad_upstream)?;
        let first = parsed.choices.into_iter().next();
        let (content, finish) = first.map_or((None, None), |c| {
            (c.message.and_then(|m| m.content), c.finish_reason)
        });
        Ok(Response::new(proto::CompleteResponse {
            id: parsed.id,
            resolved_model: req.model,
            content: content.unwrap_or_default(),
            finish_reason: finish.unwrap_or_default(),
            usage: Some(parsed.usage.unwrap_or_default().into()),
            response_json: String::from_utf8(bytes.to_vec()).map_err(bad_upstream)?,
            ..Default::default()
        }))
    }

    type StreamCompleteStream = ChunkStream;

    async fn stream_complete(
        &self,
        request: tonic::Request<proto::CompleteRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let req = request.into_inner();
        let body = self.call(&req, true).await?;
        let lines = Lines {
            body,
            buf: BytesMut::new(),
            model: req.model,
            done: false,
        };
        Ok(Response::new(Box::pin(futures_util::stream::unfold(
            lines, next_chunk,
        ))))
    }

    async fn list_models(
        &self,
        _: tonic::Request<proto::ListModelsRequest>,
    ) -> Result<Response<proto::ListModelsResponse>, Status> {
        Err(Status::unimplemented("not in the baseline"))
    }

    async fn embed(
        &self,
        _: tonic::Request<proto::EmbedRequest>,
    ) -> Result<Response<proto::EmbedResponse>, Status> {
        Err(Status::unimplemented("not in the baseline"))
    }
}

fn main() {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.workers > 0 {
        rt.worker_threads(args.workers);
    }
    let rt = rt.enable_all().build().expect("tokio runtime");
    rt.block_on(async {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let bare = Bare {
            client: Client::builder(TokioExecutor::new()).build(connector),
            uri: format!("http://{}/v1/chat/completions", args.upstream)
                .parse()
                .expect("upstream URI"),
            host: HeaderValue::from_str(&args.upstream.to_string()).expect("host header"),
        };
        let listener = TcpListener::bind(args.addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        // First stdout line is the contract with run.sh; flush so it is seen at once.
        println!("listening {addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let server = tonic::transport::Server::builder()
            .add_service(GatewayServer::new(bare))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = tokio::signal::ctrl_c().await;
            });
        if let Err(e) = server.await {
            eprintln!("grpc-bare: {e}");
            std::process::exit(1);
        }
    });
}
