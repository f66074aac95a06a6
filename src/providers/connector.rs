//! The connector of every upstream client: rustls over hyper's HTTP connector, but without the
//! connection facts (`HttpInfo`: its two addresses) that the HTTP connector attaches and hyper's
//! client then inserts into the extensions of every response, three allocations a response
//! for data tollgate never reads.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::{MapOk, TryFutureExt};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;

type Inner = HttpsConnector<HttpConnector>;
type Stream = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// [`HttpsConnector`] whose connections carry no extras.
#[derive(Clone)]
pub struct Connector(pub Inner);

impl tower::Service<http::Uri> for Connector {
    type Response = NoExtras<Stream>;
    type Error = <Inner as tower::Service<http::Uri>>::Error;
    type Future =
        MapOk<<Inner as tower::Service<http::Uri>>::Future, fn(Stream) -> NoExtras<Stream>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        self.0
            .call(uri)
            .map_ok(NoExtras as fn(Stream) -> NoExtras<Stream>)
    }
}

/// A connection that reports what hyper's pool needs of it (proxied, HTTP/2) and nothing else.
pub struct NoExtras<S>(S);

impl<S: Connection> Connection for NoExtras<S> {
    fn connected(&self) -> Connected {
        let inner = self.0.connected();
        let bare = Connected::new().proxy(inner.is_proxied());
        if inner.is_negotiated_h2() {
            bare.negotiated_h2()
        } else {
            bare
        }
    }
}

impl<S: Read + Unpin> Read for NoExtras<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: Write + Unpin> Write for NoExtras<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::Connector;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::connect::{HttpConnector, HttpInfo};
    use hyper_util::client::legacy::Client;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn answers_come_back_without_the_connection_facts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await.unwrap();
            tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
        });
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client: Client<_, Empty<bytes::Bytes>> =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build(Connector(https));
        let resp = client
            .get(format!("http://{addr}/").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.extensions().get::<HttpInfo>().is_none());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }
}
