//! The HTTP endpoints: `GET /metrics` (Prometheus text), `GET /healthz`
//! (the process is up), `GET /readyz` (subscribed to the broker, the
//! database reachable, no writer stalled, no stage failed). Binds to
//! localhost by default.
//!
//! Bounded like any other input: at most [`MAX_CONNECTIONS`] connections at
//! once (more are closed at accept), [`HEADER_TIMEOUT`] to send the request
//! head, [`IDLE_TIMEOUT`] for a whole connection, and a growing pause after
//! accept errors (running out of file descriptors must not spin a core).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Metrics;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request head.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest life of one connection.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn route(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" if metrics.ready() => respond(StatusCode::OK, "text/plain", "ready\n"),
        "/readyz" => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n"),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Binds `addr`; the returned future serves until `shutdown`.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let serve = async move {
        let mut backoff = std::time::Duration::from_millis(10);
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, pause_ms = backoff.as_millis() as u64, "http accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                        continue;
                    }
                },
            };
            backoff = std::time::Duration::from_millis(10);
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(stream); // over the cap: closed at once
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let response = route(&metrics, &req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(IDLE_TIMEOUT, connection).await;
                drop(slot);
            });
        }
    };
    Ok((local, serve))
}
