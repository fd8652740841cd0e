//! A reverse proxy that sends each request to the next worker in turn, as a load balancer in
//! front of stateless workers does (`deploy/scaled/nginx.conf` with one upstream per worker).
//!
//! Per request, not per connection: a client's consecutive requests land on different workers,
//! which is what exposes a worker reading state another wrote. A request that could not reach
//! its worker (connection refused: a worker killed or stopping) goes to the next one, whatever
//! its method, since the worker never saw it; one that failed after it was sent is retried only
//! if its method is idempotent (`GET`, `HEAD`, `PUT`, `DELETE`, `OPTIONS`), as nginx's
//! `proxy_next_upstream` does. Everything else is a `502` with a Matrix error body.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, dev::ServerHandle, web};

/// Headers that belong to one connection, not to the request or response.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "content-length",
    "host",
];

/// The longest a request may take upstream: above `/sync`'s longest long-poll.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(300);

/// What the proxy did, for tests and the benchmark to report.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Requests answered by a worker.
    pub forwarded: AtomicUsize,
    /// Attempts that failed and went to the next worker.
    pub retried: AtomicUsize,
    /// Requests answered `502`: no worker could answer them.
    pub failed: AtomicUsize,
}

struct Shared {
    upstreams: Vec<String>,
    next: AtomicUsize,
    client: reqwest::Client,
    stats: Arc<ProxyStats>,
}

/// A running proxy.
pub struct Proxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub stats: Arc<ProxyStats>,
    handle: ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Proxy {
    /// Listens on `listen` (port 0: any free port) and spreads requests over `upstreams`
    /// (`http://host:port` each).
    pub fn start(listen: SocketAddr, upstreams: Vec<String>) -> anyhow::Result<Self> {
        anyhow::ensure!(!upstreams.is_empty(), "the proxy needs at least one worker");
        // reqwest is built without a default TLS provider; the workers speak plain HTTP, but the
        // client still wants one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(UPSTREAM_TIMEOUT)
            .pool_max_idle_per_host(256)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let stats = Arc::new(ProxyStats::default());
        let shared =
            web::Data::new(Shared { upstreams, next: AtomicUsize::new(0), client, stats: stats.clone() });
        let listener = std::net::TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(web::PayloadConfig::new(64 * 1024 * 1024))
                .default_service(web::to(forward))
        })
        .disable_signals()
        .client_request_timeout(Duration::from_secs(60))
        .keep_alive(Duration::from_secs(75))
        .listen(listener)?
        .run();
        let handle = server.handle();
        let task = tokio::spawn(server);
        Ok(Self { url: format!("http://{addr}"), stats, handle, task })
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
        let _ = self.task.await;
    }
}

fn is_idempotent(method: &reqwest::Method) -> bool {
    use reqwest::Method;
    [Method::GET, Method::HEAD, Method::PUT, Method::DELETE, Method::OPTIONS].contains(method)
}

async fn forward(request: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let Ok(method) = reqwest::Method::from_bytes(request.method().as_str().as_bytes()) else {
        return HttpResponse::MethodNotAllowed().finish();
    };
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let peer = request.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
    let workers = shared.upstreams.len();
    let first = shared.next.fetch_add(1, Ordering::Relaxed);
    // Two rounds over the workers, with a pause between them for one that is restarting.
    let mut last_error = String::new();
    for attempt in 0..2 * workers {
        if attempt == workers {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let upstream = &shared.upstreams[(first + attempt) % workers];
        let mut outbound = shared.client.request(method.clone(), format!("{upstream}{path}"));
        for (name, value) in request.headers() {
            if !HOP_BY_HOP.contains(&name.as_str()) && name.as_str() != "x-forwarded-for" {
                outbound = outbound.header(name.as_str(), value.as_bytes());
            }
        }
        outbound = outbound.header("x-forwarded-for", peer.as_str()).body(body.clone());
        let sent = match outbound.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let headers: Vec<(String, Vec<u8>)> = response
                    .headers()
                    .iter()
                    .filter(|(name, _)| !HOP_BY_HOP.contains(&name.as_str()))
                    .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
                    .collect();
                response.bytes().await.map(|bytes| (status, headers, bytes))
            }
            Err(error) => Err(error),
        };
        match sent {
            Ok((status, headers, bytes)) => {
                shared.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                let status = actix_web::http::StatusCode::from_u16(status)
                    .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
                let mut response = HttpResponse::build(status);
                for (name, value) in headers {
                    response.append_header((name, value));
                }
                return response.body(bytes);
            }
            // Never reached the worker: any request may go elsewhere.
            Err(error) if error.is_connect() => last_error = error.to_string(),
            Err(error) if is_idempotent(&method) => last_error = error.to_string(),
            Err(error) => {
                last_error = error.to_string();
                break;
            }
        }
        shared.stats.retried.fetch_add(1, Ordering::Relaxed);
    }
    shared.stats.failed.fetch_add(1, Ordering::Relaxed);
    HttpResponse::BadGateway().content_type("application/json").body(format!(
        "{{\"errcode\":\"M_UNKNOWN\",\"error\":\"no worker answered: {}\"}}",
        last_error.replace(['"', '\\'], "'")
    ))
}
