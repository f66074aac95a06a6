//! The benchmark's baseline: the least an HTTP proxy can do. A hyper server and a pooled
//! hyper client that forward each request's method, path, headers and body bytes to one
//! upstream and stream the answer back, parsing nothing. Whatever tollgate adds on top of this
//! is what its policies, accounting and translation cost (bench/README.md).

use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Command-line options of the bare proxy.
#[derive(Parser, Debug)]
#[command(about = "Byte-forwarding HTTP/1.1 proxy: the benchmark's baseline")]
struct Args {
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// The upstream, as host:port.
    #[arg(long)]
    upstream: SocketAddr,
    /// Tokio worker threads (0: one per CPU the process may run on).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

fn error(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let Ok(uri) = format!("http://{upstream}{path}").parse::<Uri>() else {
        return Ok(error(StatusCode::BAD_REQUEST, "bad path"));
    };
    *req.uri_mut() = uri;
    if let Ok(host) = HeaderValue::from_str(&upstream.to_string()) {
        req.headers_mut().insert(HOST, host);
    }
    Ok(match client.request(req).await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(_) => error(StatusCode::BAD_GATEWAY, "upstream failed"),
    })
}

async fn serve(listener: TcpListener, upstream: SocketAddr) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends are transient under load; back off briefly.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| forward(client.clone(), upstream, req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
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
        let listener = TcpListener::bind(args.addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        // First stdout line is the contract with run.sh; flush so it is seen at once.
        println!("listening {addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = serve(listener, args.upstream) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    });
}
