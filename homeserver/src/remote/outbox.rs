//! Sends events to the other servers in their rooms, and EDUs ([`super::edu`]): one queue per
//! destination, sent in order as transactions of up to 50 PDUs and 100 EDUs
//! (`/_matrix/federation/v1/send`), each retried with backoff until the destination takes it.
//!
//! The queues are in memory: what a process had not sent when it stopped is not sent (a server
//! that fetches missing events, as Synapse does, gets them when a later one names them).
//! Durable queues are federation's part 2.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Weak},
    time::Duration,
};

use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedServerName, OwnedTransactionId,
    api::federation::transactions::send_transaction_message,
};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::{state::AppState, storage::StoredEvent};

/// Most PDUs and EDUs in one transaction (the spec's limits).
const MAX_PDUS_PER_TRANSACTION: usize = 50;
const MAX_EDUS_PER_TRANSACTION: usize = 100;
/// The first wait before a failed transaction is sent again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(600);

/// An event on its way: its stream position orders a batch.
#[derive(Clone)]
struct Queued {
    position: i64,
    pdu: Arc<str>,
}

/// What a destination is sent: an event, or an EDU (its JSON).
#[derive(Clone)]
enum Item {
    Pdu(Queued),
    Edu(Arc<str>),
}

/// Takes events to send; a task per destination sends them.
pub struct Outbox {
    incoming: mpsc::UnboundedSender<(BTreeSet<OwnedServerName>, Item)>,
}

impl Outbox {
    /// Starts the dispatcher; it ends once the server's state is dropped.
    pub fn start(state: &Arc<AppState>) -> Self {
        let (incoming, receiver) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(Arc::downgrade(state), receiver));
        Self { incoming }
    }

    /// Queues `event` for each of `servers`.
    pub fn send(&self, servers: BTreeSet<OwnedServerName>, event: &StoredEvent) {
        let queued = Queued { position: event.stream_ordering, pdu: Arc::from(event.json.as_str()) };
        // Only fails once the dispatcher is gone, when the server is stopping.
        let _ = self.incoming.send((servers, Item::Pdu(queued)));
    }

    /// Queues an EDU (its JSON) for each of `servers`.
    pub fn send_edu(&self, servers: BTreeSet<OwnedServerName>, edu: String) {
        let _ = self.incoming.send((servers, Item::Edu(Arc::from(edu))));
    }
}

async fn dispatch(
    state: Weak<AppState>,
    mut incoming: mpsc::UnboundedReceiver<(BTreeSet<OwnedServerName>, Item)>,
) {
    let mut queues: HashMap<OwnedServerName, mpsc::UnboundedSender<Item>> = HashMap::new();
    // Transaction ids are unique per process run: the start time, then a count.
    let run = MilliSecondsSinceUnixEpoch::now().get();
    while let Some((servers, queued)) = incoming.recv().await {
        for server in servers {
            let queue = queues.entry(server.clone()).or_insert_with(|| {
                let (sender, receiver) = mpsc::unbounded_channel();
                tokio::spawn(deliver(state.clone(), server, receiver, run));
                sender
            });
            let _ = queue.send(queued.clone());
        }
    }
}

/// Sends one destination's queue, a transaction at a time.
async fn deliver(
    state: Weak<AppState>,
    destination: OwnedServerName,
    mut queue: mpsc::UnboundedReceiver<Item>,
    run: ruma::UInt,
) {
    let mut sent = 0u64;
    while let Some(first) = queue.recv().await {
        let (mut batch, mut edus) = (Vec::new(), Vec::new());
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Item::Pdu(queued) => batch.push(queued),
                Item::Edu(edu) => edus.push(edu),
            }
            if batch.len() < MAX_PDUS_PER_TRANSACTION && edus.len() < MAX_EDUS_PER_TRANSACTION {
                next = queue.try_recv().ok();
            }
        }
        // Two requests' events can reach the queue in the other order than they were stored.
        batch.sort_by_key(|queued| queued.position);
        sent += 1;
        let transaction_id = OwnedTransactionId::from(format!("{run}.{sent}"));
        let mut backoff = FIRST_BACKOFF;
        loop {
            let Some(state) = state.upgrade() else { return };
            match send(&state, &destination, &transaction_id, &batch, &edus).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%destination, %error, retry_in = ?backoff, "a federation transaction was not taken");
                }
            }
            drop(state);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

async fn send(
    state: &AppState,
    destination: &OwnedServerName,
    transaction_id: &OwnedTransactionId,
    batch: &[Queued],
    edus: &[Arc<str>],
) -> Result<(), String> {
    let remote = state.remote().map_err(|e| e.to_string())?;
    let mut request = send_transaction_message::v1::Request::new(
        transaction_id.clone(),
        state.server_name.clone(),
        MilliSecondsSinceUnixEpoch::now(),
    );
    request.pdus = batch
        .iter()
        .map(|queued| RawValue::from_string(queued.pdu.to_string()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    request.edus = edus
        .iter()
        .map(|edu| RawValue::from_string(edu.to_string()).map(ruma::serde::Raw::from_json))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
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
