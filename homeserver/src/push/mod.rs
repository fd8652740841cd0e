//! Push notifications: deciding from each user's push rules which events notify whom
//! ([`evaluate`]), and delivering those to push gateways ([`deliver`], [`gateway`]). The
//! client API (rules, pushers, `/notifications`) is `api::client::push`; `/sync` counts unread
//! notifications from what the evaluator stored.

pub mod deliver;
pub mod evaluate;
pub mod gateway;

use std::sync::Arc;

use tokio::sync::Notify;

pub use self::evaluate::{RoomPush, ruleset, server_default, stored_rules};
use crate::{config::PushConfig, state::AppState};

/// This process's part of push delivery, held in [`AppState`].
pub struct Push {
    pub gateway: gateway::Gateway,
    /// Wakes this process's deliverer: new notifications, a backoff that ended.
    wake: Arc<Notify>,
}

impl Push {
    pub fn new(config: &PushConfig) -> anyhow::Result<Self> {
        Ok(Self { gateway: gateway::Gateway::new(config)?, wake: Arc::new(Notify::new()) })
    }

    /// Wakes this process's deliverer.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }
}

/// The evaluator and deliverer of one worker, running in the background.
pub struct Background {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    evaluator: String,
    deliverer: String,
}

/// Starts this worker's evaluator and deliverer. Each takes part in the deployment's work only
/// as far as its leases let it (see [`crate::storage::PushStore`]).
pub fn start(state: &Arc<AppState>) -> Background {
    let evaluator = evaluate::Evaluator::new();
    let deliverer = deliver::Deliverer::new();
    let owners = (evaluator.owner().to_owned(), deliverer.owner().to_owned());
    let tasks = vec![
        tokio::spawn(evaluator.run(Arc::downgrade(state))),
        tokio::spawn(deliverer.run(Arc::downgrade(state), state.push.waker())),
    ];
    Background { tasks, evaluator: owners.0, deliverer: owners.1 }
}

impl Background {
    /// Stops both and gives their leases up, so that other workers (or this one restarted) go
    /// on at once. A request to a gateway in flight may still complete: its notification is then
    /// sent again, as after a crash.
    pub async fn stop(self, state: &AppState) {
        for task in &self.tasks {
            task.abort();
        }
        evaluate::Evaluator::release(state, &self.evaluator).await;
        if let Err(error) = state.store.release_pushers(&self.deliverer).await {
            tracing::warn!(%error, "could not release the pushers this worker delivered to");
        }
    }
}
