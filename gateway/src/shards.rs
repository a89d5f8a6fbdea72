//! Thread per core: client connections are served by `threads`
//! single-threaded runtimes ("shards"), each accepting on a socket of its
//! own for every listener.
//!
//! Why not tokio's multi-threaded scheduler: a session is one task that
//! wakes many times per message (each command, the backend's replies), and
//! on a work-stealing runtime nearly every wake-up also wakes an idle
//! worker to look for work (a futex or eventfd write and a context switch).
//! Measured on the 1 KB × 100 messages per connection benchmark, that cost
//! about a fifth of the gateway's CPU per message; two shards did the same
//! work with 20% less CPU (BENCHMARKS.md). HAProxy and nginx are built the
//! same way, for the same reason.
//!
//! A connection stays in the shard that accepted it, with its parker, its
//! session and its backend connection. Which shard accepts is up to the
//! kernel: each listener is a `SO_REUSEPORT` group of one socket per shard
//! (see `server::bind_listener`, which first checks that the port is
//! free). One shared socket watched by every shard was tried too: each new
//! connection then woke every shard, and the first awake took a whole
//! burst. Everything shared (limits, policy, metrics,
//! audit log, the backend's pool) is `Sync` and shared as before; only
//! sockets and timers belong to a shard. The HTTP endpoints, signals and
//! reloads stay on the main runtime.

use std::cell::Cell;
use std::num::NonZeroUsize;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The shard the calling thread serves; 0 on any other thread (the main
/// runtime, tests), which then shares shard 0's backend pool.
pub fn current() -> usize {
    SHARD.with(Cell::get)
}

/// How many shards to run when `threads` is not set: one per CPU the
/// process may use (`available_parallelism` honours CPU affinity and cgroup
/// quotas, so a container limited to 2 CPUs gets 2).
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// The running shards. Dropping this stops them: their runtimes end, and
/// with them every task still on them.
pub struct Shards {
    handles: Vec<Handle>,
    stop: CancellationToken,
}

impl Shards {
    /// Starts `count` threads, each running a single-threaded runtime.
    pub fn start(count: usize) -> std::io::Result<Shards> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(count);
        for index in 0..count.max(1) {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let shard_stop = stop.clone();
            let started = std::thread::Builder::new()
                .name(format!("relayguard-shard-{index}"))
                .spawn(move || {
                    SHARD.with(|s| s.set(index));
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(async {
                        tokio::select! {
                            _ = shard_stop.cancelled() => {}
                            _ = timer_anchor() => {}
                        }
                    });
                    // Tasks left after the drain are dropped; nothing
                    // blocking is waited for longer than this.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                });
            if let Err(e) = started {
                stop.cancel();
                return Err(e);
            }
            match rx.recv() {
                Ok(Ok(handle)) => handles.push(handle),
                Ok(Err(e)) => {
                    stop.cancel();
                    return Err(e);
                }
                Err(_) => {
                    stop.cancel();
                    return Err(std::io::Error::other("shard thread ended at start"));
                }
            }
        }
        Ok(Shards { handles, stop })
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

/// Keeps a timer at most [`ANCHOR_EVERY`] ahead in the shard's timer wheel.
///
/// Why: tokio's time driver wakes its own runtime (an eventfd write, then
/// an extra turn of the event loop) whenever a timer is set earlier than
/// the wake-up it planned when it last went to sleep, or when it slept with
/// no timer at all. A session sets such a timer at nearly every pause (the
/// one-second buffer keep, after a backend wait that planned minutes
/// ahead), so without an anchor about one message in three paid that
/// wake-up. With this timer never more than a second away, a new timer a
/// second or more ahead is never the earliest.
async fn timer_anchor() {
    loop {
        tokio::time::sleep(ANCHOR_EVERY).await;
    }
}

/// At most the shortest timer a session sets at every pause
/// (`session::KEEP_BUFFERS`).
const ANCHOR_EVERY: Duration = Duration::from_millis(500);

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shard_knows_its_index_and_runs_tasks_on_its_own_thread() {
        let shards = Shards::start(3).unwrap();
        assert_eq!(shards.len(), 3);
        let main = std::thread::current().id();
        let mut seen = Vec::new();
        for (i, h) in shards.handles().iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            h.spawn(async move {
                tx.send((current(), std::thread::current().id())).unwrap();
            });
            let (index, thread) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(index, i);
            assert_ne!(thread, main);
            seen.push(thread);
        }
        seen.dedup();
        assert_eq!(seen.len(), 3, "one thread per shard");
        assert_eq!(current(), 0, "other threads count as shard 0");
    }

    #[test]
    fn dropping_the_shards_ends_their_tasks() {
        let shards = Shards::start(2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        shards.handles()[1].spawn(async move {
            let _held = tx;
            std::future::pending::<()>().await;
        });
        drop(shards);
        // The sender is dropped with the task when the runtime ends.
        assert!(matches!(
            rx.recv_timeout(Duration::from_secs(5)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        ));
    }
}
