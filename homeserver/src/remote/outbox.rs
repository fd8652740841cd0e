//! Sends events and EDUs ([`super::edu`]) to the other servers: a queue per destination, kept
//! in the database ([`crate::storage::outbox`]) before the request that made them answers, sent
//! in order as transactions of up to 50 PDUs and 100 EDUs (`/_matrix/federation/v1/send`), each
//! retried with backoff until the destination takes it; only then are its items removed. So a
//! restart loses nothing queued: senders start again for every destination with items waiting.
//!
//! - One worker sends a destination's queue at a time: it holds a lease on the destination in
//!   the database, renewed with every transaction and released when the queue is empty; another
//!   worker with items for it looks every second and takes over once the lease is free. A
//!   worker is known by its host and data directory, so that one restarted (after `kill -9`,
//!   say) takes its own leases back at once.
//! - A transaction's id is made of its first and last items' ids: sent again after a restart, it
//!   is the same transaction to the destination, which answers it from memory.
//! - A failed transaction waits 1 s, doubling to 10 minutes, with jitter, before it is sent
//!   again; a transaction from the destination ends the wait at once (it is back).
//! - A destination away for long does not make its queue grow without end: after each failure,
//!   and when a sender starts (a restart), beyond its newest [`MAX_BACKLOG_PDUS`] events the
//!   oldest go (it fetches them with `get_missing_events` when newer ones name them, as a server
//!   catching up does), and beyond [`MAX_BACKLOG_EDUS`] EDUs the oldest EDUs go
//!   (`federation.max_backlog_pdus`, `max_backlog_edus`).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Weak},
    time::Duration,
};

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedServerName, OwnedTransactionId, ServerName,
    api::federation::transactions::send_transaction_message,
};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::{
    error::Result,
    state::AppState,
    storage::{
        StoredEvent,
        outbox::{OutboxItem, OutboxKind},
    },
};

/// Most PDUs and EDUs in one transaction (the spec's limits).
const MAX_PDUS_PER_TRANSACTION: usize = 50;
const MAX_EDUS_PER_TRANSACTION: usize = 100;
/// The first wait before a failed transaction is sent again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// What a destination's queue keeps while it fails (see the module's comment).
pub const MAX_BACKLOG_PDUS: usize = 10_000;
pub const MAX_BACKLOG_EDUS: usize = 100_000;
/// How long a worker's hold on a destination lasts without being renewed: longer than one
/// transaction may take.
const LEASE: Duration = Duration::from_secs(120);
/// How often a worker with items for a destination another worker holds looks again.
const ELSEWHERE_LOOK: Duration = Duration::from_secs(1);

/// Why a destination's sender is woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// Something was queued for it.
    Queued,
    /// It sent us a transaction: it is back, whatever its backoff said.
    HeardFrom,
}

/// Queues what is to be sent; a task per destination sends it.
pub struct Outbox {
    wake: mpsc::UnboundedSender<(OwnedServerName, Wake)>,
}

impl Outbox {
    /// Starts the senders, with one for each destination an earlier run left items for; they
    /// end once the server's state is dropped.
    pub fn start(state: &Arc<AppState>) -> Self {
        let (wake, receiver) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(Arc::downgrade(state), receiver, worker_id(&state.config.data_dir)));
        let (store, waking) = (state.store.clone(), wake.clone());
        tokio::spawn(async move {
            match store.outbound_destinations().await {
                Ok(destinations) => {
                    for destination in destinations {
                        if let Ok(destination) = OwnedServerName::try_from(destination) {
                            let _ = waking.send((destination, Wake::Queued));
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "the federation outbox could not be read"),
            }
        });
        Self { wake }
    }

    /// Queues `event` for each of `servers`.
    pub async fn send(
        &self,
        state: &AppState,
        servers: BTreeSet<OwnedServerName>,
        event: &StoredEvent,
    ) -> Result<()> {
        self.queue(state, servers, OutboxKind::Pdu, Some(event.stream_ordering), &event.json).await
    }

    /// Queues an EDU (its JSON) for each of `servers`.
    pub async fn send_edu(
        &self,
        state: &AppState,
        servers: BTreeSet<OwnedServerName>,
        edu: &str,
    ) -> Result<()> {
        self.queue(state, servers, OutboxKind::Edu, None, edu).await
    }

    async fn queue(
        &self,
        state: &AppState,
        servers: BTreeSet<OwnedServerName>,
        kind: OutboxKind,
        position: Option<i64>,
        body: &str,
    ) -> Result<()> {
        let destinations: Vec<&str> = servers.iter().map(|server| server.as_str()).collect();
        state.store.queue_outbound(&destinations, kind, position, body).await?;
        for server in servers {
            // Only fails once the dispatcher is gone, when the server is stopping.
            let _ = self.wake.send((server, Wake::Queued));
        }
        Ok(())
    }

    /// `server` sent us a transaction: what waits for it is sent now, not after its backoff.
    pub fn heard_from(&self, server: &ServerName) {
        let _ = self.wake.send((server.to_owned(), Wake::HeardFrom));
    }
}

/// This worker's name in leases: the same after a restart, another for each worker (a host
/// and data directory each).
fn worker_id(data_dir: &std::path::Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    let id = crate::auth::tokens::sha256_hex(&format!("{}\n{}", host.trim(), dir.display()));
    id[..16].to_owned()
}

async fn dispatch(
    state: Weak<AppState>,
    mut wakes: mpsc::UnboundedReceiver<(OwnedServerName, Wake)>,
    worker: String,
) {
    let mut senders: HashMap<OwnedServerName, mpsc::UnboundedSender<Wake>> = HashMap::new();
    while let Some((server, wake)) = wakes.recv().await {
        let sender = senders.entry(server.clone()).or_insert_with(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(deliver(state.clone(), server, receiver, worker.clone()));
            sender
        });
        let _ = sender.send(wake);
    }
}

fn now_ms() -> i64 {
    i64::from(MilliSecondsSinceUnixEpoch::now().get())
}

/// Sends one destination's queue, a transaction at a time.
async fn deliver(
    state: Weak<AppState>,
    destination: OwnedServerName,
    mut wakes: mpsc::UnboundedReceiver<Wake>,
    worker: String,
) {
    let mut backoff: Option<Duration> = None;
    if let Some(state) = state.upgrade() {
        trim(&state, &destination).await;
    }
    loop {
        let Some(state) = state.upgrade() else { return };
        let now = now_ms();
        let until = now + i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX);
        let items = match state.store.lease_destination(destination.as_str(), &worker, now, until).await {
            // Another worker sends this destination's queue: look again once its hold may have run out.
            Ok(false) => None,
            Ok(true) => {
                match state
                    .store
                    .outbound(destination.as_str(), MAX_PDUS_PER_TRANSACTION, MAX_EDUS_PER_TRANSACTION)
                    .await
                {
                    Ok(items) => Some(items),
                    Err(error) => {
                        tracing::warn!(%destination, %error, "the federation outbox could not be read");
                        None
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%destination, %error, "the federation outbox could not be read");
                None
            }
        };
        let Some(items) = items else {
            drop(state);
            // Items queued here are in the same table: the other worker sends them, unless it
            // has gone idle or away, which this worker finds out at its next look.
            if !wait(&mut wakes, ELSEWHERE_LOOK, false).await {
                return;
            }
            continue;
        };
        let Some(last) = items.last().map(|item| item.id) else {
            // Nothing waits: another worker that queues something for the destination may send
            // it, and this one waits until something is queued here.
            if let Err(error) = state.store.release_destination(destination.as_str(), &worker).await {
                tracing::warn!(%destination, %error, "a federation sender's hold was not released");
            }
            drop(state);
            if wakes.recv().await.is_none() {
                return;
            }
            continue;
        };
        match send(&state, &destination, &items).await {
            Ok(()) => {
                backoff = None;
                if let Err(error) = state.store.sent_outbound(destination.as_str(), last).await {
                    // Sent again later: the destination answers a transaction it has from memory.
                    tracing::warn!(%destination, %error, "a sent transaction stayed in the outbox");
                }
            }
            Err(error) => {
                let delay = backoff.map_or(FIRST_BACKOFF, |delay| (delay * 2).min(MAX_BACKOFF));
                backoff = Some(delay);
                // Up to a quarter more, so that the destinations of one outage are not all
                // tried again at the same moment.
                let jitter = delay.mul_f64(rand::random::<f64>() / 4.0);
                tracing::warn!(%destination, %error, retry_in = ?delay + jitter, "a federation transaction was not taken");
                trim(&state, &destination).await;
                drop(state);
                if !wait(&mut wakes, delay + jitter, true).await {
                    return;
                }
            }
        }
    }
}

/// Drops what `destination`'s queue holds beyond the backlog (see the module's comment).
async fn trim(state: &AppState, destination: &ServerName) {
    // From the configuration, not the outbox: a sender may start before the outbox is in place.
    let (pdus, edus) = (state.config.federation.max_backlog_pdus, state.config.federation.max_backlog_edus);
    match state.store.trim_outbound(destination.as_str(), pdus, edus).await {
        Ok(0) => {}
        Ok(dropped) => {
            tracing::warn!(%destination, dropped, "the oldest of a lagging server's queue were dropped")
        }
        Err(error) => tracing::warn!(%destination, %error, "the federation outbox could not be trimmed"),
    }
}

/// Waits `delay`, or until woken (by anything, or with `only_when_heard_from` by the destination
/// itself). False once the outbox is gone.
async fn wait(
    wakes: &mut mpsc::UnboundedReceiver<Wake>,
    delay: Duration,
    only_when_heard_from: bool,
) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return true,
            wake = wakes.recv() => match wake {
                None => return false,
                Some(Wake::Queued) if only_when_heard_from => continue,
                Some(_) => return true,
            },
        }
    }
}

async fn send(state: &AppState, destination: &OwnedServerName, items: &[OutboxItem]) -> Result<(), String> {
    let remote = state.remote().map_err(|e| e.to_string())?;
    let (first, last) = match (items.first(), items.last()) {
        (Some(first), Some(last)) => (first.id, last.id),
        _ => return Ok(()),
    };
    let transaction_id = OwnedTransactionId::from(format!("q{first}-{last}"));
    let mut request = send_transaction_message::v1::Request::new(
        transaction_id,
        state.server_name.clone(),
        MilliSecondsSinceUnixEpoch::now(),
    );
    let mut pdus: Vec<&OutboxItem> = items.iter().filter(|item| item.kind == OutboxKind::Pdu).collect();
    // Two requests' events can reach the queue in the other order than they were stored.
    pdus.sort_by_key(|item| item.position);
    let raw = |item: &OutboxItem| RawValue::from_string(item.body.clone()).map_err(|e| e.to_string());
    request.pdus = pdus.into_iter().map(raw).collect::<Result<_, _>>()?;
    request.edus = items
        .iter()
        .filter(|item| item.kind == OutboxKind::Edu)
        .map(|item| raw(item).map(ruma::serde::Raw::from_json))
        .collect::<Result<_, _>>()?;
    let response = match remote
        .send(&state.server_name, state.signing_key.key_pair(), destination, request)
        .await
    {
        Ok(response) => response,
        // A success whose body is not the spec's (SyTest answers `{}`, without `pdus`) still
        // means the destination has the transaction: sending it again would only hold back
        // what comes after it.
        Err(crate::remote::RemoteError::Unreadable { why, .. }) => {
            tracing::info!(%destination, %why, "a federation transaction was taken with an answer not as the spec says");
            return Ok(());
        }
        Err(error) => return Err(error.to_string()),
    };
    for (event_id, result) in response.pdus {
        if let Err(why) = result {
            // Taken, but not accepted: the destination will not ask for it again.
            tracing::info!(%destination, %event_id, %why, "another server refused an event of ours");
        }
    }
    Ok(())
}
