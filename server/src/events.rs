//! Lock events for `Watch`: backends publish here, watchers subscribe. A bounded broadcast, so a
//! slow watcher loses events (and is told how many) instead of slowing lock operations.

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::lock::LockEvent;
use crate::metrics::OpenStream;

/// Events buffered per watcher before it starts missing some.
const CAPACITY: usize = 4096;

/// The process-wide event hub.
#[derive(Debug)]
pub struct Events {
    tx: broadcast::Sender<Arc<LockEvent>>,
    /// Number of active watchers: the Redis backend listens for events only while it is > 0.
    watchers: watch::Sender<usize>,
}

/// Counts a watcher while it lives; dropping it unregisters the watcher.
#[derive(Debug)]
pub struct WatcherGuard {
    events: Arc<Events>,
    _open: OpenStream,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
            watchers: watch::Sender::new(0),
        }
    }
}

impl Events {
    /// Hands an event to every watcher. Costs nothing when nobody watches.
    pub fn publish(&self, event: LockEvent) {
        if self.tx.receiver_count() > 0 {
            // An error only means every watcher left meanwhile.
            let _ = self.tx.send(Arc::new(event));
        }
    }

    /// Follows the number of watchers (for backends that subscribe to events on demand).
    pub fn watchers(&self) -> watch::Receiver<usize> {
        self.watchers.subscribe()
    }

    /// Subscribes a new watcher: its events, in publication order, and its guard.
    pub fn subscribe(self: &Arc<Self>) -> (broadcast::Receiver<Arc<LockEvent>>, WatcherGuard) {
        let rx = self.tx.subscribe();
        self.watchers.send_modify(|n| *n += 1);
        (
            rx,
            WatcherGuard {
                events: self.clone(),
                _open: OpenStream::new("watch"),
            },
        )
    }
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.events
            .watchers
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}
