//! Assembles the process: store, metrics, ledger, core, and both listeners; shuts them down
//! gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::config::Config;
use crate::core::admin::Admin;
use crate::core::ledger::Ledger;
use crate::core::{ConfigSource, Gateway, GatewayParts, Runtime};
use crate::metrics::Metrics;
use crate::routing::health::HealthRegistry;
use crate::routing::ProviderDeps;
use crate::store::{Store, StoreError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened, migrated or seeded.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The configuration could not be turned into providers and routes.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The gRPC services could not be assembled.
    #[error("gRPC setup failed: {0}")]
    Grpc(String),
    /// The OTLP trace exporter could not be built.
    #[error(transparent)]
    Tracing(#[from] crate::core::trace::ExporterError),
}

/// How to start: the clock, and where reloads read the configuration.
#[derive(Default)]
pub struct ServeOptions {
    pub clock: Clock,
    pub source: Option<ConfigSource>,
}

/// A serving gateway: both listeners bound, background writers running.
pub struct RunningServer {
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
    gateway: Arc<Gateway>,
    stop: watch::Sender<bool>,
    http_task: JoinHandle<()>,
    grpc_task: JoinHandle<()>,
    reload_task: JoinHandle<()>,
    idle_db_task: Option<JoinHandle<()>>,
    grace: Duration,
    delay: Duration,
}

impl RunningServer {
    /// Opens the store (migrating unless disabled), seeds configured keys, binds both listeners
    /// and starts serving.
    pub async fn start(config: Config) -> Result<RunningServer, ServerError> {
        Self::start_with(config, ServeOptions::default()).await
    }

    /// As [`RunningServer::start`], with a clock that tests can move forward.
    pub async fn start_with_clock(
        config: Config,
        clock: Clock,
    ) -> Result<RunningServer, ServerError> {
        Self::start_with(
            config,
            ServeOptions {
                clock,
                source: None,
            },
        )
        .await
    }

    /// As [`RunningServer::start`], with a clock and the file that reloads re-read.
    pub async fn start_with(
        config: Config,
        options: ServeOptions,
    ) -> Result<RunningServer, ServerError> {
        let ServeOptions { clock, source } = options;
        let store = Store::connect(
            &config.database.url,
            config.database.max_connections,
            clock.clone(),
        )
        .await?;
        if config.database.run_migrations {
            store.migrate().await?;
        }
        Admin::new(store.clone())
            .sync_static_keys(&config.auth.static_keys)
            .await?;
        let metrics = Arc::new(Metrics::new());
        let ledger = Ledger::start(
            store.clone(),
            config.database.ledger_batch_size,
            Duration::from_millis(config.database.ledger_flush_ms),
        );
        let server_cfg = config.server.clone();
        let config_idle_db = config.database.idle_connection_timeout_secs;
        let deps = ProviderDeps {
            health: Arc::new(HealthRegistry::new(clock.clone(), metrics.clone())),
            clock,
            observer: metrics.clone(),
        };
        let tracer = crate::core::trace::Tracer::start(&config.telemetry, &metrics)?;
        let runtime = Runtime::new(config, &deps).map_err(ServerError::Config)?;
        let gateway = Arc::new(Gateway::new(
            runtime,
            GatewayParts {
                store: store.clone(),
                metrics: metrics.clone(),
                ledger,
                deps,
                source,
                tracer,
            },
        ));
        let reload_task = tokio::spawn(reload_on_sighup(gateway.clone()));
        let idle_db_task = (config_idle_db > 0).then(|| {
            tokio::spawn(close_idle_db_connections(
                store.clone(),
                Duration::from_secs(config_idle_db),
            ))
        });

        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })
        };
        let http_listener = bind(server_cfg.http_addr).await?;
        let grpc_listener = bind(server_cfg.grpc_addr).await?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| ServerError::Bind {
                addr: server_cfg.http_addr,
                source,
            })?;
        let grpc_addr = grpc_listener
            .local_addr()
            .map_err(|source| ServerError::Bind {
                addr: server_cfg.grpc_addr,
                source,
            })?;
        let (stop, stopped) = watch::channel(false);

        let app = crate::http::router(gateway.clone());
        let http_task = tokio::spawn(serve_http(
            http_listener,
            app,
            Duration::from_millis(server_cfg.header_read_timeout_ms),
            server_cfg.max_header_bytes,
            stopped.clone(),
        ));

        let routes = crate::grpc::routes(gateway.clone())
            .await
            .map_err(|e| ServerError::Grpc(e.to_string()))?;
        let grpc_task = {
            let mut stopped = stopped.clone();
            let incoming =
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
            let layer = crate::grpc::GrpcTelemetryLayer::new(metrics);
            let limit = crate::grpc::GrpcMessageLimitLayer::new(gateway.clone());
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                let result = tonic::transport::Server::builder()
                    .layer(crate::request_context::RequestContextLayer::new(
                        crate::core::Protocol::Grpc,
                    ))
                    .layer(layer)
                    .layer(limit)
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "gRPC server failed");
                }
            })
        };
        tracing::info!(
            store = store.backend(),
            "tollgate listening http={http_addr} grpc={grpc_addr}"
        );
        Ok(RunningServer {
            http_addr,
            grpc_addr,
            gateway,
            stop,
            http_task,
            grpc_task,
            reload_task,
            idle_db_task,
            grace: Duration::from_secs(server_cfg.shutdown_grace_secs),
            delay: Duration::from_millis(server_cfg.shutdown_delay_ms),
        })
    }

    /// Where HTTP is served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where gRPC is served.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The core, for embedding.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Turns unready, keeps serving for `shutdown_delay_ms`, stops accepting, lets in-flight
    /// requests and streams finish up to the grace period, ends the streams still running
    /// (each with an error event, recorded), then flushes the usage ledger and settlements and
    /// hands the budget leases back.
    pub async fn shutdown(self) {
        self.gateway.start_draining();
        if !self.delay.is_zero() {
            tracing::info!(
                delay_ms = self.delay.as_millis() as u64,
                "not ready; serving until the load balancers notice"
            );
            tokio::time::sleep(self.delay).await;
        }
        let _ = self.stop.send(true);
        self.reload_task.abort();
        if let Some(t) = &self.idle_db_task {
            t.abort();
        }
        let mut both = Box::pin(async {
            let _ = self.http_task.await;
            let _ = self.grpc_task.await;
        });
        if tokio::time::timeout(self.grace, &mut both).await.is_err() {
            tracing::warn!(
                grace_secs = self.grace.as_secs(),
                "in-flight requests outlived the shutdown grace period; ending their streams"
            );
            self.gateway.cut_streams();
            // A cut stream sends its error event and records its row within milliseconds;
            // what still runs then (a non-streamed request) is abandoned.
            if tokio::time::timeout(CUT_WAIT, &mut both).await.is_err() {
                tracing::warn!("requests still running after their streams were ended");
            }
        }
        self.gateway.flush_ledger().await;
        self.gateway.flush_traces().await;
        tracing::info!("tollgate stopped; usage ledger flushed");
    }

    /// Serves until `stop` hears SIGTERM or ctrl-c, then shuts down gracefully.
    pub async fn run_until_signal(self, stop: StopSignal) {
        // This runs on the thread that started the server, which allocates little from now on:
        // what startup left free in its heap goes back to the system instead of staying in RSS.
        crate::allocator::release_free_memory();
        stop.recv().await;
        tracing::info!("shutdown signal received");
        self.shutdown().await;
    }
}

/// How long a connection accepted just before the stop may take to send its first request.
const FIRST_REQUEST_WAIT: Duration = Duration::from_millis(500);

/// How long streams ended at the grace period's end get to send their error event.
const CUT_WAIT: Duration = Duration::from_secs(2);

/// Serves HTTP/1.1 on `listener` until `stopped`, then lets open connections finish. hyper's
/// own connection loop rather than `axum::serve`, which cannot set `header_read_timeout`: a
/// client that trickles its headers is cut off after `header_timeout`, and a head larger than
/// `max_header_bytes` is refused.
async fn serve_http(
    listener: TcpListener,
    app: crate::http::App,
    header_timeout: Duration,
    max_header_bytes: usize,
    stopped: watch::Receiver<bool>,
) {
    use tower::ServiceExt;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        // The read buffer bounds the head: a larger one is refused with 431 (validated >= 8192).
        .max_buf_size(max_header_bytes);
    let mut conns = tokio::task::JoinSet::new();
    let serve = |conns: &mut tokio::task::JoinSet<()>, tcp: tokio::net::TcpStream| {
        // Nagle plus delayed ACK would hold back small SSE frames by tens of milliseconds.
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        // Set once the connection's first request arrives (see below).
        let first = Arc::new(tokio::sync::Notify::new());
        let first_seen = first.clone();
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                first_seen.notify_one();
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
        let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
        let mut stopped = stopped.clone();
        conns.spawn(async move {
            tokio::pin!(conn);
            let mut started = std::pin::pin!(first.notified());
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { let _ = stopped.wait_for(|s| *s).await; } => {
                    // A connection accepted just before the stop has its request on the way:
                    // hyper would close it unread (it is idle), and the client would see a
                    // request dropped after it was accepted. Give it its first request
                    // (answered with `Connection: close`); an idle keep-alive connection that
                    // already served one is closed at once.
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = &mut started => {}
                        _ = tokio::time::sleep(FIRST_REQUEST_WAIT) => {}
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    };
    let mut stop_watch = stopped.clone();
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop_watch.wait_for(|s| *s).await; } => break,
        };
        while conns.try_join_next().is_some() {}
        serve(&mut conns, tcp);
    }
    // Connections whose handshake the kernel already completed wait in the accept queue, their
    // requests possibly sent: closing the listener would reset them. Take every one of them
    // (straight from the socket, not through the reactor's possibly stale readiness) first.
    if let Ok(std_listener) = listener.into_std() {
        while let Ok((tcp, _)) = std_listener.accept() {
            let _ = tcp.set_nonblocking(true);
            match tokio::net::TcpStream::from_std(tcp) {
                Ok(tcp) => serve(&mut conns, tcp),
                Err(e) => tracing::warn!(error = %e, "HTTP accept at shutdown failed"),
            }
        }
    }
    while conns.join_next().await.is_some() {}
}

/// Reloads the configuration on every SIGHUP. The handler is installed before this returns,
/// so a SIGHUP sent once the server is up never falls to the default action (exit).
fn reload_on_sighup(gateway: Arc<Gateway>) -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        {
            let Ok(mut hup) = hup else {
                tracing::warn!("cannot listen for SIGHUP; reload through the admin API instead");
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading configuration");
                let _ = gateway.reload().await;
            }
        }
        #[cfg(not(unix))]
        drop(gateway);
    }
}

/// SIGTERM and ctrl-c (SIGINT), listened for from the moment this is made. `tollgate serve`
/// makes it before the server starts: a stop sent as soon as the server listens (an orchestrator that
/// replaces a replica that has only just started) is then a graceful shutdown, never the
/// signal's default action (exit at once, requests and ledger rows lost). Made afterwards it
/// left that window open (a lifecycle test hit it under load). A library user that serves
/// without it installs no handlers.
pub struct StopSignal {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignal {
    /// Installs the handlers (inside the runtime).
    pub fn listen() -> std::io::Result<StopSignal> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(StopSignal {
                term: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignal {})
    }

    /// Waits for either signal.
    async fn recv(self) {
        #[cfg(unix)]
        {
            let StopSignal {
                mut term,
                mut interrupt,
            } = self;
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Every `idle`, closes the database connections unused that long (all but one): a burst's
/// connections and their caches are given back once it is over (docs/operations.md).
async fn close_idle_db_connections(store: Store, idle: Duration) {
    let mut tick = tokio::time::interval(idle);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if store.close_idle_connections(idle).await > 0 {
            crate::allocator::release_free_memory_everywhere();
        }
    }
}
