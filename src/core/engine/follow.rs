//! Following an engine's KV events without ever trusting a view that missed some.
//!
//! A consumer that falls more than the channel's capacity behind loses the oldest events. `KvFollower` turns
//! that loss into a `Cleared` (forget the worker: incomplete, never wrong) and, once the consumer has caught
//! up, asks the engine to send its whole state again. Not at once: a lagging receiver's channel is full, so a
//! state sent then would push out the next unread event and cause another lag, for ever.
use super::Engine;
use crate::core::protocol::{KvEvent, KvEventBatch, WorkerId};
use std::sync::{Arc, Weak};
use tokio::sync::broadcast::{self, error::RecvError};

pub struct KvFollower {
    events: broadcast::Receiver<KvEventBatch>,
    worker: WorkerId,
    /// Weak: a follower must not keep a departed worker's engine (and so its channel) alive.
    engine: Weak<dyn Engine>,
    resend_when_caught_up: bool,
}

impl KvFollower {
    /// Follows the engine's events from now on.
    pub fn new(engine: &Arc<dyn Engine>) -> Self {
        Self {
            events: engine.subscribe_kv_events(),
            worker: engine.worker_id(),
            engine: Arc::downgrade(engine),
            resend_when_caught_up: false,
        }
    }

    /// The next batch, a `Cleared` in place of events that were lost; `None` once the engine is gone.
    pub async fn next(&mut self) -> Option<KvEventBatch> {
        if self.resend_when_caught_up && self.events.is_empty() {
            self.resend_when_caught_up = false;
            let resent = self.engine.upgrade().is_some_and(|engine| engine.resend_kv_state());
            if !resent {
                tracing::warn!(
                    worker = self.worker,
                    "this worker's KV cache stays unknown until it stores blocks again"
                );
            }
        }
        match self.events.recv().await {
            Ok(batch) => Some(batch),
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(worker = self.worker, missed, "fell behind this worker's KV events; resyncing");
                self.resend_when_caught_up = true;
                Some(KvEventBatch { worker_id: self.worker, events: vec![KvEvent::Cleared] })
            }
            Err(RecvError::Closed) => None,
        }
    }
}
