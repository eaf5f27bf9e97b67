//! Following a namespace's workers, for every process that watches a cluster (`dynamo route`, `dynamo top`,
//! and the planner and endpoint picker to come): discovery says where workers are, a request-plane
//! connection to each says whether it answers and who it is, and an event-plane subscription to each one
//! its owner accepts brings what it publishes. `Members::next` hands over each change; what a change means
//! (join a router, fill a table) is the owner's.
//!
//! Members that are not workers (planners, routers) announce themselves with `announce`.
//!
//! Endpoints nobody answers at are closed and probed now and then (`dormant`), so a cluster file full of
//! dead entries costs neither descriptors nor pings.
//!
//! Each subscribed worker gets a subscriber socket of its own, so a message is known by the connection it
//! came over, not by the worker id it claims: a message under another id than the worker's at that endpoint
//! is dropped as malformed. (One socket for all would deliver a member's forgeries as another worker's: in
//! a keyed cluster every member holds the key, so only the connection tells who spoke.)
pub mod announce;
mod dormant;

use crate::core::discovery::{Discovery, DiscoveryEvent};
use crate::core::plane::request::{WorkerClient, WorkerStatus};
use crate::core::plane::{Context, Delivery, EventSubscriber, HIGH_WATER_MARK, PlaneError};
use crate::core::protocol::WorkerId;
use crate::core::protocol::discovery::Instance;
use crate::core::protocol::plane::{FrameError, Topic};
use dormant::Dormancy;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often quiet connections are checked and dropped-message counts collected.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What happened to a namespace's workers.
#[derive(Debug)]
pub enum Change {
    /// Discovery named an endpoint; a connection to it is open and pinging.
    Found(String),
    /// Discovery dropped it: its connection and subscription are gone.
    Left(String),
    /// A worker answered there (first time, again after a loss, or restarted under a new id). Its events
    /// come once the owner calls `subscribe`.
    Answered { endpoint: String, instance: Instance },
    /// It stopped answering for `dead_after`; its streams in flight ended without a finish reason.
    Lost(String),
    /// It speaks another request-plane version.
    Incompatible { endpoint: String, theirs: u32 },
    /// A message from the event plane of a subscribed worker.
    Delivered { endpoint: String, delivery: Delivery },
    /// An event-plane message that was not a frame of ours (or not sealed with the cluster key, or sent
    /// under another worker's id).
    Malformed(PlaneError),
    /// Request-plane answers dropped unread since the last report, by reason (`WorkerClient::take_dropped`).
    Dropped([(&'static str, u64); 3]),
}

pub struct Members {
    context: Context,
    namespace: String,
    dead_after: Duration,
    found: mpsc::UnboundedReceiver<DiscoveryEvent>,
    topics: Vec<Topic>,
    /// What every subscription's task has received, labelled with its endpoint and generation.
    deliveries: mpsc::Sender<(String, u64, Result<Delivery, PlaneError>)>,
    delivered: mpsc::Receiver<(String, u64, Result<Delivery, PlaneError>)>,
    generations: u64,
    /// One connection per discovered endpoint, alive or not (dormant ones are closed).
    clients: HashMap<String, Arc<WorkerClient>>,
    /// Every connection's status reports, labelled with its endpoint.
    statuses: mpsc::UnboundedSender<(String, WorkerStatus)>,
    status_reports: mpsc::UnboundedReceiver<(String, WorkerStatus)>,
    /// Endpoint → what is subscribed to for it.
    subscribed: HashMap<String, Subscription>,
    dormancy: Dormancy,
    check: tokio::time::Interval,
}

/// Deliveries waiting for the owner, from every subscription's task together: past it the tasks wait, the
/// event plane's own high-water mark bounds what queues behind them, and a gap there is resynced like any
/// other.
const DELIVERIES: usize = 4096;

/// One worker's event subscription: its own socket, read by its own task.
struct Subscription {
    id: WorkerId,
    events: String,
    generation: u64,
    _task: crate::core::AbortOnDrop,
}

impl Members {
    /// Starts following `namespace`; subscriptions will be to `topics`. Must run inside a tokio runtime.
    pub fn watch(
        discovery: &dyn Discovery,
        namespace: &str,
        dead_after: Duration,
        key: Option<&crate::core::trust::ClusterKey>,
        topics: &[Topic],
    ) -> Result<Self, PlaneError> {
        let context = Context::with_key(key);
        let (statuses, status_reports) = mpsc::unbounded_channel();
        let (deliveries, delivered) = mpsc::channel(DELIVERIES);
        Ok(Self {
            context,
            namespace: namespace.to_string(),
            dead_after,
            found: discovery.watch(namespace),
            topics: topics.to_vec(),
            deliveries,
            delivered,
            generations: 0,
            clients: HashMap::new(),
            statuses,
            status_reports,
            subscribed: HashMap::new(),
            dormancy: Dormancy::default(),
            check: tokio::time::interval(CHECK_INTERVAL),
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The next change; `None` once discovery has stopped. Cancel-safe: a change is taken from its source
    /// only when it is returned.
    pub async fn next(&mut self) -> Option<Change> {
        loop {
            tokio::select! {
                event = self.found.recv() => match event? {
                    DiscoveryEvent::Added(endpoint) => {
                        self.dormancy.quiet(&endpoint, Instant::now());
                        self.connect(&endpoint);
                        return Some(Change::Found(endpoint));
                    }
                    DiscoveryEvent::Removed(endpoint) => {
                        self.forget(&endpoint);
                        return Some(Change::Left(endpoint));
                    }
                },
                _ = self.check.tick() => {
                    let due = self.dormancy.due(Instant::now());
                    for endpoint in due.close {
                        tracing::debug!("no worker answers at {endpoint}; its connection is closed until the next probe");
                        self.clients.remove(&endpoint);
                    }
                    for endpoint in due.reconnect {
                        self.connect(&endpoint);
                    }
                    let mut dropped = [("", 0); 3];
                    for client in self.clients.values() {
                        for (sum, (reason, count)) in dropped.iter_mut().zip(client.take_dropped()) {
                            *sum = (reason, sum.1 + count);
                        }
                    }
                    if dropped.iter().any(|(_, count)| *count > 0) {
                        return Some(Change::Dropped(dropped));
                    }
                }
                Some((endpoint, status)) = self.status_reports.recv() => {
                    // A status can trail its endpoint's removal from discovery: nothing to say of it then.
                    if !self.clients.contains_key(&endpoint) {
                        continue;
                    }
                    return Some(match status {
                        WorkerStatus::Alive(instance) => {
                            self.dormancy.alive(&endpoint);
                            Change::Answered { endpoint, instance }
                        }
                        WorkerStatus::Lost => {
                            self.dormancy.quiet(&endpoint, Instant::now());
                            Change::Lost(endpoint)
                        }
                        WorkerStatus::Incompatible { theirs } => Change::Incompatible { endpoint, theirs },
                    });
                }
                Some((endpoint, generation, delivery)) = self.delivered.recv() => {
                    // Only from the subscription still open: what a replaced one queued is history.
                    if self.subscribed.get(&endpoint).is_none_or(|s| s.generation != generation) {
                        continue;
                    }
                    return Some(match delivery {
                        Ok(delivery) => Change::Delivered { endpoint, delivery },
                        Err(error) => Change::Malformed(error),
                    });
                }
            }
        }
    }

    /// The connection to the worker at `endpoint`, while it is open.
    pub fn client(&self, endpoint: &str) -> Option<Arc<WorkerClient>> {
        self.clients.get(endpoint).cloned()
    }

    /// Delivers the events `instance` publishes, as the worker at `endpoint`, from now on (replacing what
    /// was subscribed to for that endpoint before).
    pub fn subscribe(&mut self, endpoint: &str, instance: &Instance) -> Result<(), PlaneError> {
        let events = instance.event_endpoint_from(endpoint);
        if self.subscribed.get(endpoint).is_some_and(|s| s.id == instance.id && s.events == events) {
            return Ok(());
        }
        self.unsubscribe(endpoint);
        let subscriber = EventSubscriber::connect(&self.context, &[&events], &self.topics, HIGH_WATER_MARK)?;
        self.generations += 1;
        let generation = self.generations;
        let task =
            tokio::spawn(forward(subscriber, endpoint.to_string(), instance.id, generation, self.deliveries.clone()));
        let subscription = Subscription { id: instance.id, events, generation, _task: crate::core::AbortOnDrop(task) };
        self.subscribed.insert(endpoint.to_string(), subscription);
        Ok(())
    }

    /// No more events from the worker at `endpoint`; its connection stays.
    pub fn unsubscribe(&mut self, endpoint: &str) {
        self.subscribed.remove(endpoint);
    }

    /// Drops the endpoint until discovery names it again: its connection, subscription and probes.
    pub fn forget(&mut self, endpoint: &str) {
        self.unsubscribe(endpoint);
        self.clients.remove(endpoint);
        self.dormancy.forget(endpoint);
    }

    fn connect(&mut self, endpoint: &str) {
        let connected =
            WorkerClient::connect_labelled(&self.context, endpoint.to_string(), self.dead_after, &self.statuses);
        match connected {
            Ok(client) => {
                self.clients.insert(endpoint.to_string(), Arc::new(client));
            }
            Err(error) => tracing::warn!("cannot connect to worker at {endpoint}: {error}"),
        }
    }
}

/// Reads one worker's subscription into the owner's queue, labelled; a message under another id than the
/// worker's is passed on as malformed.
async fn forward(
    mut subscriber: EventSubscriber,
    endpoint: String,
    id: WorkerId,
    generation: u64,
    deliveries: mpsc::Sender<(String, u64, Result<Delivery, PlaneError>)>,
) {
    loop {
        let delivery = match subscriber.next().await {
            Ok(delivery) if delivery.header.publisher != id => {
                let claimed = delivery.header.publisher;
                Err(PlaneError::Malformed(FrameError::NotItsWorker { worker: id, claimed }))
            }
            Ok(delivery) => Ok(delivery),
            Err(error @ PlaneError::Malformed(_)) => Err(error),
            Err(error) => {
                tracing::warn!("event plane: the subscription to the worker at {endpoint} failed: {error}");
                return;
            }
        };
        if deliveries.send((endpoint.clone(), generation, delivery)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
