//! The HTTP endpoints: `GET /metrics` (Prometheus text), `GET /alerts` (the
//! last committed alerts as a JSON array, oldest first, for `top`),
//! `GET /healthz` (the process is up), `GET /readyz` (subscribed to the broker, the
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
        "/alerts" => respond(
            StatusCode::OK,
            "application/json",
            metrics.render_recent_alerts(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client that never finishes its request head is cut off after
    /// [`HEADER_TIMEOUT`], and connections past [`MAX_CONNECTIONS`] are
    /// closed at once while the endpoint keeps answering.
    #[tokio::test]
    async fn slow_and_surplus_clients_are_bounded() {
        let stop = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let (addr, serve) = bind("127.0.0.1:0".parse().expect("addr"), metrics, stop.clone())
            .await
            .expect("bind");
        tokio::spawn(serve);
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\n")
                .await
                .expect("partial head");
            idle.push(s);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut surplus = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), surplus.read(&mut buf))
            .await
            .expect("closed at once")
            .unwrap_or(0);
        assert_eq!(n, 0, "over the cap: closed without an answer");
        // The slow clients are cut after the header timeout.
        let started = std::time::Instant::now();
        let n = tokio::time::timeout(HEADER_TIMEOUT * 2, idle[0].read(&mut buf))
            .await
            .expect("cut off")
            .unwrap_or(0);
        assert!(started.elapsed() < HEADER_TIMEOUT * 2);
        let _ = n;
        drop(idle);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut fresh = tokio::net::TcpStream::connect(addr).await.expect("connect");
        fresh
            .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
            .await
            .expect("request");
        let mut text = String::new();
        let _ = fresh.read_to_string(&mut text).await;
        assert!(
            text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
            "{text}"
        );
        stop.cancel();
    }
}
