//! Greeted connections whose client has not said anything yet.
//!
//! Clients that connect and stay silent are common (pools of pre-opened
//! connections, monitoring probes, slow or hostile clients), and a task per
//! silent connection is most of what one costs: the task header, its future
//! sized for its largest await point, a timer entry and a shutdown waiter,
//! 1.6 KiB per connection at 10,000 (BENCHMARKS.md). So after its greeting
//! a connection is parked here instead: one task per listener holds every
//! silent connection in a slot (the socket, what the caller attached to it,
//! a deadline; about 0.2 KiB with the slot's waker) with no buffer and no
//! task of its own. Each slot has its own waker, so a socket turning
//! readable wakes only its slot; one timer serves every deadline and one
//! shutdown listener every slot. What remains per connection, about 0.5 KiB
//! in all, is mostly tokio's registration of the socket. The slots are kept
//! for reuse at their high-water mark.
//!
//! A connection leaves the parker with the reason ([`Woke`]): its client
//! sent something (the caller gives it a session task of its own), closed,
//! stayed silent past the timeout, or was still parked at shutdown (the
//! caller replies and closes).

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often at most the parker looks for expired deadlines: a deadline is
/// met within this, and connections timing out one by one cost at most ten
/// scans of the slots a second, not one per connection.
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Why a parked connection is handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// The client sent something (still unread: it was only peeked at).
    Input,
    /// The client closed the connection, or it failed.
    Closed,
    /// Silent past the parker's timeout.
    TimedOut,
    /// Still parked when shutdown began.
    Shutdown,
}

/// A handle on one parker: clone it to park from several tasks.
pub struct Idle<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Idle<T> {
    fn clone(&self) -> Self {
        Idle {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<T> {
    slots: Mutex<Slots<T>>,
    ready: Arc<ReadyQueue>,
    timeout: Duration,
}

struct Slots<T> {
    entries: Vec<Option<Parked<T>>>,
    /// One waker per slot, made with the slot and kept for its next tenants.
    wakers: Vec<Waker>,
    free: Vec<usize>,
    parked: usize,
    /// When to look for expired deadlines next; `None` while empty.
    sweep_at: Option<Instant>,
    /// Shutdown began: nothing more is parked.
    closed: bool,
}

struct Parked<T> {
    tcp: TcpStream,
    deadline: Instant,
    with: T,
}

/// Slots whose socket signalled readiness since the parker last looked.
/// The parker is notified when the list stops being empty.
struct ReadyQueue {
    keys: Mutex<Vec<usize>>,
    notify: Notify,
}

impl ReadyQueue {
    fn push(&self, key: usize) {
        let mut keys = lock(&self.keys);
        keys.push(key);
        if keys.len() == 1 {
            drop(keys);
            self.notify.notify_one();
        }
    }
}

/// Wakes the parker for one slot. A wake meant for an earlier tenant of
/// the slot only makes the parker look at the current one for nothing.
struct SlotWaker {
    key: usize,
    queue: Arc<ReadyQueue>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.queue.push(self.key);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.queue.push(self.key);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Has the client sent something or closed? Peeks at one byte, so nothing
/// is consumed; when not, `cx`'s waker is woken once it has.
fn poll_input(tcp: &TcpStream, cx: &mut Context<'_>) -> Poll<Woke> {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    match tcp.poll_peek(cx, &mut buf) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(Woke::Closed),
        Poll::Ready(Ok(_)) => Poll::Ready(Woke::Input),
    }
}

impl<T: Send + 'static> Idle<T> {
    /// Starts a parker on `tracker` (so a drain waits for it). Every
    /// connection comes back through `on_wake`, called on the parker's
    /// task: it should not wait, only spawn or close. At shutdown every
    /// parked connection comes back with [`Woke::Shutdown`], then the
    /// parker ends.
    pub fn start<F>(
        timeout: Duration,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
        on_wake: F,
    ) -> Idle<T>
    where
        F: FnMut(TcpStream, T, Woke) + Send + 'static,
    {
        let inner = Arc::new(Inner {
            slots: Mutex::new(Slots {
                entries: Vec::new(),
                wakers: Vec::new(),
                free: Vec::new(),
                parked: 0,
                sweep_at: None,
                closed: false,
            }),
            ready: Arc::new(ReadyQueue {
                keys: Mutex::new(Vec::new()),
                notify: Notify::new(),
            }),
            timeout,
        });
        tracker.spawn(run(inner.clone(), shutdown, on_wake));
        Idle { inner }
    }

    /// Parks a greeted connection until its client sends something, closes
    /// or times out. Handed straight back when it should go on in the
    /// caller's task instead: input (or the close) is already there, or the
    /// parker has stopped for shutdown.
    pub fn park(&self, tcp: TcpStream, with: T) -> Result<(), (TcpStream, T)> {
        let mut slots = lock(&self.inner.slots);
        if slots.closed {
            return Err((tcp, with));
        }
        let key = slots.vacant(&self.inner.ready);
        let mut cx = Context::from_waker(&slots.wakers[key]);
        if poll_input(&tcp, &mut cx).is_ready() {
            slots.free.push(key);
            return Err((tcp, with));
        }
        let deadline = Instant::now() + self.inner.timeout;
        slots.entries[key] = Some(Parked {
            tcp,
            deadline,
            with,
        });
        slots.parked += 1;
        if slots.sweep_at.is_none() {
            // The parker sleeps without a deadline while empty.
            slots.sweep_at = Some(deadline);
            drop(slots);
            self.inner.ready.notify.notify_one();
        }
        Ok(())
    }

    /// How many connections are parked.
    pub fn len(&self) -> usize {
        lock(&self.inner.slots).parked
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Slots<T> {
    /// A free slot, made (with its waker) if there is none.
    fn vacant(&mut self, queue: &Arc<ReadyQueue>) -> usize {
        if let Some(key) = self.free.pop() {
            return key;
        }
        let key = self.entries.len();
        self.entries.push(None);
        self.wakers.push(Waker::from(Arc::new(SlotWaker {
            key,
            queue: queue.clone(),
        })));
        key
    }

    fn take(&mut self, key: usize) -> Option<Parked<T>> {
        let parked = self.entries.get_mut(key)?.take()?;
        self.free.push(key);
        self.parked -= 1;
        if self.parked == 0 {
            self.sweep_at = None;
        }
        Some(parked)
    }

    /// The slot's socket signalled: is there input now?
    fn poll(&mut self, key: usize, out: &mut Vec<(Parked<T>, Woke)>) {
        let Some(Some(parked)) = self.entries.get(key) else {
            return;
        };
        let mut cx = Context::from_waker(&self.wakers[key]);
        if let Poll::Ready(why) = poll_input(&parked.tcp, &mut cx) {
            out.extend(self.take(key).map(|p| (p, why)));
        }
    }

    /// Hands back what expired and schedules the next sweep.
    fn sweep(&mut self, now: Instant, out: &mut Vec<(Parked<T>, Woke)>) {
        let mut next: Option<Instant> = None;
        for key in 0..self.entries.len() {
            let Some(deadline) = self.entries[key].as_ref().map(|p| p.deadline) else {
                continue;
            };
            if deadline <= now {
                out.extend(self.take(key).map(|p| (p, Woke::TimedOut)));
            } else {
                next = Some(next.map_or(deadline, |n| n.min(deadline)));
            }
        }
        self.sweep_at = next.map(|n| n.max(now + SWEEP_EVERY));
    }
}

async fn run<T, F>(inner: Arc<Inner<T>>, shutdown: CancellationToken, mut on_wake: F)
where
    F: FnMut(TcpStream, T, Woke),
{
    let stopped = Stopped(&inner);
    let sleep = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(sleep);
    let mut keys = Vec::new();
    let mut out = Vec::new();
    loop {
        let sweep_at = lock(&inner.slots).sweep_at;
        if let Some(at) = sweep_at {
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
        }
        tokio::select! {
            _ = inner.ready.notify.notified() => {}
            _ = &mut sleep, if sweep_at.is_some() => {}
            _ = shutdown.cancelled() => break,
        }
        std::mem::swap(&mut keys, &mut *lock(&inner.ready.keys));
        {
            let mut slots = lock(&inner.slots);
            for key in keys.drain(..) {
                slots.poll(key, &mut out);
            }
            let now = Instant::now();
            if slots.sweep_at.is_some_and(|at| at <= now) {
                slots.sweep(now, &mut out);
            }
        }
        for (parked, why) in out.drain(..) {
            on_wake(parked.tcp, parked.with, why);
        }
    }
    for parked in stopped.0.close() {
        on_wake(parked.tcp, parked.with, Woke::Shutdown);
    }
}

/// Closes the parker however its task ends, a panic in `on_wake` or the
/// runtime going away included, so that nothing is parked afterwards where
/// no one would wake it (what is still parked is dropped: closed).
struct Stopped<'a, T>(&'a Inner<T>);

impl<T> Drop for Stopped<'_, T> {
    fn drop(&mut self) {
        drop(self.0.close());
    }
}

impl<T> Inner<T> {
    /// Stops parking; returns what was parked.
    fn close(&self) -> Vec<Parked<T>> {
        let mut slots = lock(&self.slots);
        slots.closed = true;
        slots.sweep_at = None;
        slots.parked = 0;
        slots.free.clear();
        slots.wakers.clear();
        std::mem::take(&mut slots.entries)
            .into_iter()
            .flatten()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    /// What a parker hands back: the socket, its label, the reason.
    type Back = mpsc::UnboundedReceiver<(TcpStream, &'static str, Woke)>;

    /// A parker whose connections come back on a channel, with a label.
    fn parker(timeout: Duration) -> (Idle<&'static str>, Back, CancellationToken, TaskTracker) {
        let (tx, rx) = mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let on_wake = move |tcp, with, why| {
            let _ = tx.send((tcp, with, why));
        };
        let idle = Idle::start(timeout, shutdown.clone(), &tracker, on_wake);
        (idle, rx, shutdown, tracker)
    }

    /// A connected pair: (client side, server side as accepted).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn input_hands_the_connection_back_unread() {
        let (idle, mut rx, _shutdown, _tracker) = parker(HOUR);
        let (mut a, a_srv) = pair().await;
        let (_b, b_srv) = pair().await;
        assert!(idle.park(a_srv, "a").is_ok());
        assert!(idle.park(b_srv, "b").is_ok());
        assert_eq!(idle.len(), 2);

        a.write_all(b"EHLO a.test\r\n").await.unwrap();
        let (mut tcp, with, why) = rx.recv().await.unwrap();
        assert_eq!((with, why), ("a", Woke::Input));
        let mut line = [0u8; 13];
        tcp.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"EHLO a.test\r\n");
        // The other one stays.
        assert_eq!(idle.len(), 1);
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_client_that_closes_is_handed_back_and_its_slot_reused() {
        let (idle, mut rx, _shutdown, _tracker) = parker(HOUR);
        let (a, a_srv) = pair().await;
        assert!(idle.park(a_srv, "a").is_ok());
        drop(a);
        let (_tcp, with, why) = rx.recv().await.unwrap();
        assert_eq!((with, why), ("a", Woke::Closed));
        assert!(idle.is_empty());

        // The slot is free again, and its waker serves the new tenant.
        let (mut b, b_srv) = pair().await;
        assert!(idle.park(b_srv, "b").is_ok());
        assert_eq!(lock(&idle.inner.slots).entries.len(), 1);
        b.write_all(b"Q").await.unwrap();
        let (_tcp, with, why) = rx.recv().await.unwrap();
        assert_eq!((with, why), ("b", Woke::Input));
    }

    #[tokio::test]
    async fn input_already_there_is_not_parked() {
        let (idle, _rx, _shutdown, _tracker) = parker(HOUR);
        let (mut a, a_srv) = pair().await;
        a.write_all(b"EHLO").await.unwrap();
        // Wait until the bytes are there to be peeked.
        let mut byte = [0u8; 1];
        a_srv.peek(&mut byte).await.unwrap();
        let (_tcp, with) = idle.park(a_srv, "a").unwrap_err();
        assert_eq!(with, "a");
        assert!(idle.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn silent_connections_time_out_in_order() {
        let timeout = Duration::from_secs(300);
        let (idle, mut rx, _shutdown, _tracker) = parker(timeout);
        let (_a, a_srv) = pair().await;
        let (_b, b_srv) = pair().await;
        let start = Instant::now();
        assert!(idle.park(a_srv, "a").is_ok());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(idle.park(b_srv, "b").is_ok());

        let (_tcp, with, why) = rx.recv().await.unwrap();
        assert_eq!((with, why), ("a", Woke::TimedOut));
        let waited = start.elapsed();
        assert!(
            waited >= timeout && waited <= timeout + SWEEP_EVERY,
            "{waited:?}"
        );
        assert_eq!(idle.len(), 1);

        let (_tcp, with, why) = rx.recv().await.unwrap();
        assert_eq!((with, why), ("b", Woke::TimedOut));
        let waited = start.elapsed();
        let due = timeout + Duration::from_secs(10);
        assert!(waited >= due && waited <= due + SWEEP_EVERY, "{waited:?}");
        assert!(idle.is_empty());
    }

    #[tokio::test]
    async fn shutdown_hands_back_everything_and_stops_parking() {
        let (idle, mut rx, shutdown, tracker) = parker(HOUR);
        let (_a, a_srv) = pair().await;
        let (_b, b_srv) = pair().await;
        assert!(idle.park(a_srv, "a").is_ok());
        assert!(idle.park(b_srv, "b").is_ok());
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        let mut back = Vec::new();
        while let Ok((_tcp, with, why)) = rx.try_recv() {
            back.push((with, why));
        }
        back.sort_by_key(|(with, _)| *with);
        assert_eq!(back, [("a", Woke::Shutdown), ("b", Woke::Shutdown)]);
        let (_c, c_srv) = pair().await;
        assert!(idle.park(c_srv, "c").is_err());
    }

    #[tokio::test]
    async fn a_parker_that_died_parks_nothing_more() {
        let tracker = TaskTracker::new();
        let on_wake = |_: TcpStream, _: (), _: Woke| panic!("a bug in on_wake");
        let idle = Idle::start(HOUR, CancellationToken::new(), &tracker, on_wake);
        let (a, a_srv) = pair().await;
        let (mut b, b_srv) = pair().await;
        assert!(idle.park(a_srv, ()).is_ok());
        assert!(idle.park(b_srv, ()).is_ok());
        drop(a);
        tracker.close();
        tracker.wait().await;
        // The connection parked beside the one that made it panic is closed...
        assert!(idle.is_empty());
        assert_eq!(b.read(&mut [0u8; 1]).await.unwrap(), 0);
        // ...and a new one goes on in its own task.
        let (_c, c_srv) = pair().await;
        assert!(idle.park(c_srv, ()).is_err());
    }
}
