//! Builds the HTTP server from a configuration and runs it.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use actix_web::{
    App, HttpResponse, HttpServer,
    dev::{Service, ServiceResponse},
    http::Method,
    middleware::DefaultHeaders,
    web,
};
use anyhow::Context;
use futures_util::future::{Either, ready};

use crate::{api, config::Config, ruma_wrapper::unrecognized, state::AppState, storage::SqlStore};

/// A server that is accepting connections.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: web::Data<AppState>,
    handle: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Push-rule evaluation and delivery to push gateways.
    push: crate::push::Background,
    /// The federation listener, when the server federates.
    federation: Option<Listener>,
}

/// A second listener: its address and how to stop it.
struct Listener {
    addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Where the federation listener listens, when the server federates.
    pub fn federation_addr(&self) -> Option<SocketAddr> {
        match self.state.config.federation_on_client_listener() {
            true => Some(self.addr),
            false => self.federation.as_ref().map(|listener| listener.addr),
        }
    }

    /// Waits until the server stops (a signal, or [`RunningServer::stop`]).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("server task")?.context("server")
    }

    pub async fn stop(self) {
        // First, while the pool's connections (made on the server's threads) still work: the
        // push and appservice senders hand their leases back.
        self.push.stop(&self.state).await;
        self.state.appservices.stop().await;
        self.handle.stop(true).await;
        let _ = self.task.await;
        if let Some(federation) = self.federation {
            federation.handle.stop(true).await;
            let _ = federation.task.await;
        }
        if let Err(error) = self.state.stream.stop().await {
            tracing::warn!(%error, "could not retire the stream writer");
        }
    }
}

/// Names this worker across restarts: its host and client listener (see `storage/stream.rs`).
fn instance_name(config: &Config) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}|{}", host.trim(), config.listen.client)
}

/// Open connections per client IP, so that one client cannot take every file descriptor.
#[derive(Debug, Default)]
struct ConnectionCounts {
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One open connection, kept in its connection data; dropped when the connection closes.
struct OpenConnection {
    ip: std::net::IpAddr,
    counts: Arc<ConnectionCounts>,
    /// The client already held the limit when this connection opened.
    over_limit: bool,
}

impl ConnectionCounts {
    fn open(self: &Arc<Self>, ip: std::net::IpAddr, limit: usize) -> OpenConnection {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = open.entry(ip).or_default();
        *count += 1;
        OpenConnection { ip, counts: self.clone(), over_limit: *count > limit }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Opens the database named by the config, creating the data directory for SQLite.
pub async fn open_store(config: &Config) -> anyhow::Result<SqlStore> {
    if config.database.url.is_empty() {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    }
    let store = SqlStore::connect(&config.database_url(), config.database.max_connections)
        .await
        .context("connecting to the database")?;
    Ok(store)
}

/// Refuses to start a worker whose signing key or token secret differs from what the
/// deployment's database recorded when its first worker started: with several, remote servers
/// would see events of one room signed by different keys, and tokens minted by one worker
/// would be refused by the others.
async fn check_identity(state: &AppState) -> anyhow::Result<()> {
    let key = format!("{} {}", state.signing_key.key_id(), state.signing_key.public_key_base64());
    let known = state.store.claim_identity("signing_key", &key).await?;
    if known != key {
        anyhow::bail!(
            "this worker's signing key ({}, from {}) is not the one this deployment signs with ({}): \
             give every worker the same signing_key_file (HEARTH_SIGNING_KEY_FILE)",
            key.split(' ').next().unwrap_or_default(),
            state.config.signing_key_path().display(),
            known.split(' ').next().unwrap_or_default(),
        );
    }
    let known = state.store.claim_identity("token_secret", &state.secret_fingerprint).await?;
    if known != state.secret_fingerprint {
        anyhow::bail!(
            "this worker's token secret is not the one this deployment uses: give every worker the \
             same auth.token_secret (HEARTH_AUTH__TOKEN_SECRET), or the same data_dir/token.key"
        );
    }
    Ok(())
}

/// Creates each application service's own user if missing, starts its queue at the current
/// stream position if it has none (a service sees events from its registration on), and starts
/// the senders.
async fn start_appservices(state: &web::Data<AppState>, instance: &str) -> anyhow::Result<()> {
    if state.appservices.is_empty() {
        return Ok(());
    }
    let position = state.store.persisted_upto().await?;
    for service in state.appservices.all() {
        if state.store.create_user(&service.sender, None, false).await? {
            tracing::info!(appservice = service.id(), user_id = %service.sender, "created the application service's user");
        }
        if service.url().is_some() {
            state.store.init_appservice_queue(service.id(), position).await?;
        }
    }
    // Names this run of this worker in the queues' leases.
    let owner = format!("{instance}#{}", crate::auth::tokens::random_token(9));
    state.appservices.start(&state.clone().into_inner(), &owner);
    tracing::info!(count = state.appservices.all().len(), "application services registered");
    Ok(())
}

/// Connects storage, applies migrations, binds the client listener and starts serving.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    crate::install_crypto_provider();
    let store = open_store(&config).await?;
    store.migrate().await.context("running database migrations")?;
    let listener = std::net::TcpListener::bind(config.client_listen_addr()?)
        .with_context(|| format!("binding the client listener to {}", config.listen.client))?;
    let federation_listener =
        match config.federation_listen_addr()? {
            Some(addr) => Some(std::net::TcpListener::bind(addr).with_context(|| {
                format!("binding the federation listener to {}", config.listen.federation)
            })?),
            None => None,
        };
    let federation_tls = federation_tls(&config.tls)?;
    let addr = listener.local_addr()?;
    let mut config = config;
    if config.public_baseurl.is_empty() {
        // Links the server hands out (well-known, submit_url) name the port it really got.
        config.public_baseurl = format!("http://{addr}");
    }
    let stream = crate::storage::stream::StreamWriter::start(&store, &instance_name(&config)).await?;
    let store: Arc<dyn crate::storage::Storage> = Arc::new(store);
    let channel = crate::notifier::Channel::new(&config.redis);
    let queue = crate::queue::open(&config.redis, store.clone(), &channel)
        .await
        .with_context(|| "connecting to Redis (redis.url)".to_owned())?;
    let state = web::Data::new(AppState::new(config, store, stream, queue)?);
    check_identity(&state).await?;
    if let Some(publisher) = crate::notifier::start(&state.clone().into_inner(), &channel)? {
        let _ = state.publisher.set(publisher);
    }
    let push = crate::push::start(&state.clone().into_inner());
    if state.config.federates() {
        let _ = state.outbox.set(crate::remote::outbox::Outbox::start(&state.clone().into_inner()));
    }
    if state.config.rooms.self_destructing_messages {
        // It ends by itself once the server's state is dropped.
        tokio::spawn(crate::rooms::expiry::run(Arc::downgrade(&state.clone().into_inner())));
    }
    start_appservices(&state, &instance_name(&state.config)).await?;
    let app_state = state.clone();
    let per_ip = match state.config.listen.trust_x_forwarded_for {
        // Behind a proxy every connection comes from the proxy, which must limit its clients.
        true => 0,
        false => state.config.limits.connections_per_ip,
    };
    let connections = Arc::new(ConnectionCounts::default());
    let with_federation = state.config.federation_on_client_listener();
    let server = HttpServer::new(move || {
        let router = api::client::router();
        let federation_router = with_federation.then(api::federation::router);
        App::new()
            .app_data(app_state.clone())
            .wrap_fn(|req, srv| {
                if req.conn_data::<OpenConnection>().is_some_and(|c| c.over_limit) {
                    let error = crate::error::Error::limit_exceeded(std::time::Duration::from_secs(1));
                    let mut response = actix_web::ResponseError::error_response(&error);
                    response.head_mut().set_connection_type(actix_web::http::ConnectionType::Close);
                    return Either::Left(ready(Ok(req.into_response(response))));
                }
                // CORS preflight: the spec asks every endpoint to answer OPTIONS.
                if req.method() == Method::OPTIONS {
                    return Either::Left(ready(Ok(req.into_response(HttpResponse::NoContent().finish()))));
                }
                if !tracing::enabled!(tracing::Level::DEBUG) {
                    return Either::Right(Either::Left(srv.call(req)));
                }
                let started = Instant::now();
                let (method, path) = (req.method().clone(), req.path().to_owned());
                let call = srv.call(req);
                Either::Right(Either::Right(async move {
                    let response: ServiceResponse = call.await?;
                    // The path only: query strings may carry access tokens.
                    tracing::debug!(
                        %method, %path, status = response.status().as_u16(),
                        ms = started.elapsed().as_secs_f64() * 1000.0, "request"
                    );
                    Ok(response)
                }))
            })
            .wrap(
                DefaultHeaders::new()
                    .add(("Access-Control-Allow-Origin", "*"))
                    .add(("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS"))
                    .add(("Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization"))
                    .add(("Cross-Origin-Resource-Policy", "cross-origin")),
            )
            .configure(|cfg| router.configure(cfg))
            .configure(api::client::configure_custom)
            // After the client's own routes: `openid/userinfo` is one of them, and a scope that
            // matches a path's prefix answers it.
            .configure(|cfg| {
                if let Some(federation) = federation_router {
                    api::federation::configure_deprecated(cfg);
                    federation.configure(cfg);
                }
            })
            .default_service(web::to(unrecognized))
    })
    .on_connect(move |connection, data| {
        if per_ip > 0
            && let Some(stream) = connection.downcast_ref::<actix_web::rt::net::TcpStream>()
            && let Ok(peer) = stream.peer_addr()
        {
            data.insert(connections.open(peer.ip(), per_ip));
        }
    })
    .disable_signals()
    .listen(listener)?;
    let server = server.run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    let federation = match federation_listener {
        Some(listener) => Some(start_federation(&state, listener, federation_tls)?),
        None => None,
    };
    Ok(RunningServer { addr, state, handle, task, push, federation })
}

/// The federation listener's TLS, when a certificate is configured.
fn federation_tls(tls: &crate::config::TlsConfig) -> anyhow::Result<Option<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    if tls.certificate.is_empty() {
        return Ok(None);
    }
    let certificates = CertificateDer::pem_file_iter(&tls.certificate)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("tls.certificate: reading {}", tls.certificate))?;
    anyhow::ensure!(!certificates.is_empty(), "tls.certificate: {} holds no certificate", tls.certificate);
    let key = PrivateKeyDer::from_pem_file(&tls.private_key)
        .with_context(|| format!("tls.private_key: reading {}", tls.private_key))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .context("tls: the certificate and private key do not go together")?;
    Ok(Some(config))
}

/// Serves the server-server API on its own listener: TLS itself, or plain behind a proxy.
fn start_federation(
    state: &web::Data<AppState>,
    listener: std::net::TcpListener,
    tls: Option<rustls::ServerConfig>,
) -> anyhow::Result<Listener> {
    let addr = listener.local_addr()?;
    let app_state = state.clone();
    let server = HttpServer::new(move || {
        let router = api::federation::router();
        App::new()
            .app_data(app_state.clone())
            .configure(|cfg| router.configure(cfg))
            .configure(api::federation::configure_custom)
            .default_service(web::to(unrecognized))
    })
    .disable_signals();
    let server = match tls {
        Some(tls) => server.listen_rustls_0_23(listener, tls)?,
        None => server.listen(listener)?,
    }
    .run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    tracing::info!(%addr, "federation listener started");
    Ok(Listener { addr, handle, task })
}
