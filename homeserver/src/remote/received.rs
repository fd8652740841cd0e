//! Transactions received from other servers: one at a time per origin (a server's events
//! depend on its earlier ones), and a transaction sent again (its answer was lost) answered as
//! the first time, without taking its events again.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use ruma::{OwnedEventId, OwnedServerName, OwnedTransactionId};

/// How many answered transactions are remembered, across all origins.
const REMEMBERED: usize = 10_000;

/// What a transaction's PDUs came to: each event's id, and why it was refused.
pub type Outcome = BTreeMap<OwnedEventId, Result<(), String>>;

type Key = (OwnedServerName, OwnedTransactionId);

#[derive(Default)]
pub struct Received {
    answers: Mutex<(HashMap<Key, Outcome>, VecDeque<Key>)>,
    origins: Mutex<HashMap<OwnedServerName, Arc<tokio::sync::Mutex<()>>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Received {
    /// Waits for `origin`'s transaction being taken, if any: the guard lets the next one in.
    pub async fn one_at_a_time(&self, origin: &OwnedServerName) -> tokio::sync::OwnedMutexGuard<()> {
        let turn = lock(&self.origins).entry(origin.clone()).or_default().clone();
        turn.lock_owned().await
    }

    /// The answer given to the transaction, if it was taken before.
    pub fn answered(&self, origin: &OwnedServerName, transaction: &OwnedTransactionId) -> Option<Outcome> {
        lock(&self.answers).0.get(&(origin.clone(), transaction.clone())).cloned()
    }

    pub fn remember(&self, origin: OwnedServerName, transaction: OwnedTransactionId, outcome: Outcome) {
        let mut guard = lock(&self.answers);
        let (answers, order) = &mut *guard;
        let key = (origin, transaction);
        if answers.insert(key.clone(), outcome).is_none() {
            order.push_back(key);
        }
        while order.len() > REMEMBERED {
            if let Some(oldest) = order.pop_front() {
                answers.remove(&oldest);
            }
        }
    }
}
