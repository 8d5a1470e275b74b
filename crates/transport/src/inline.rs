//! A quinn runtime whose background tasks can also be driven inline, by the
//! thread that just gave them work.
//!
//! quinn sends nothing by itself: a write to a stream only stores the data
//! and wakes the connection's driver task, which builds the packets and
//! hands them to the socket. On tokio that task runs on the runtime's
//! thread, so every write by another thread (a FUSE worker recording a
//! barrier) costs a wake-up of that thread, and on a virtual machine whose
//! other CPU is idle that wake-up is tens of microseconds on the path of
//! every durability point.
//!
//! [`InlineRuntime`] is tokio's runtime (same timers, same sockets) with one
//! difference: the tasks quinn spawns (the endpoint's and the connections'
//! drivers) can also be polled by any thread, through
//! [`InlineRuntime::drive`]: `drive(f)` runs `f` (which writes to a stream),
//! absorbs the wake-ups that `f` causes, and polls the drivers right there,
//! so that the packets leave from the calling thread. Wake-ups from anything
//! else (a packet arriving, a timer) go to the tokio task as usual.
//!
//! A task is polled by one thread at a time (its own mutex; a thread that
//! finds it busy leaves it to the one polling it). No wake-up is lost: a
//! wake-up that arrives while a `drive` is under way marks the task, and the
//! `drive` polls it again or, when it ends, hands it to tokio.

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncTimer, AsyncUdpSocket, Runtime, UdpPoller};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Rounds of polls one `drive` makes at most while its own wake-ups keep
/// marking tasks (a bulk transfer: the rest is left to tokio).
const DRIVE_ROUNDS: usize = 4;

/// See the module documentation.
pub struct InlineRuntime {
    handle: tokio::runtime::Handle,
    shared: Arc<Shared>,
}

struct Shared {
    /// Threads inside `drive`.
    active: AtomicUsize,
    /// Every task spawned and not finished.
    tasks: Mutex<Vec<Weak<Task>>>,
}

struct Task {
    fut: Mutex<Option<BoxFuture>>,
    /// Woken since its last poll began.
    notified: AtomicBool,
    /// The tokio task that polls it when no `drive` does.
    tokio_waker: Mutex<Option<Waker>>,
    shared: Weak<Shared>,
}

impl fmt::Debug for InlineRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InlineRuntime").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Task {
    fn wake_tokio(&self) {
        if let Some(w) = lock(&self.tokio_waker).as_ref() {
            w.wake_by_ref();
        }
    }

    /// Polls the future once if no other thread is polling it. Ready once
    /// it has finished.
    fn poll_once(self: &Arc<Self>) -> Poll<()> {
        let Ok(mut fut) = self.fut.try_lock() else {
            // Being polled by another thread, which sees what woke it.
            return Poll::Pending;
        };
        let Some(f) = fut.as_mut() else {
            return Poll::Ready(());
        };
        self.notified.store(false, SeqCst);
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(()) => {
                *fut = None;
                drop(fut);
                // Let the tokio task see that it is over.
                self.wake_tokio();
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.notified.store(true, SeqCst);
        let inline = self
            .shared
            .upgrade()
            .is_some_and(|s| s.active.load(SeqCst) > 0);
        if !inline {
            self.wake_tokio();
        }
    }
}

impl InlineRuntime {
    /// A runtime whose tasks, timers and sockets live on `handle`'s tokio
    /// runtime.
    pub fn new(handle: tokio::runtime::Handle) -> Arc<InlineRuntime> {
        Arc::new(InlineRuntime {
            handle,
            shared: Arc::new(Shared {
                active: AtomicUsize::new(0),
                tasks: Mutex::new(Vec::new()),
            }),
        })
    }

    fn live_tasks(&self) -> Vec<Arc<Task>> {
        let mut tasks = lock(&self.shared.tasks);
        tasks.retain(|t| t.strong_count() > 0);
        tasks.iter().filter_map(Weak::upgrade).collect()
    }

    /// Runs `f`, then polls every task of this runtime on this thread (see
    /// the module documentation). Never blocks on a task another thread is
    /// polling.
    pub fn drive<R>(&self, f: impl FnOnce() -> R) -> R {
        self.shared.active.fetch_add(1, SeqCst);
        let r = f();
        let tasks = self.live_tasks();
        for _ in 0..DRIVE_ROUNDS {
            let mut polled = false;
            for t in tasks.iter().filter(|t| t.notified.load(SeqCst)) {
                let _ = t.poll_once();
                polled = true;
            }
            if !polled {
                break;
            }
        }
        self.shared.active.fetch_sub(1, SeqCst);
        // Wake-ups that arrived while this thread was inside go to tokio
        // (a wake-up that saw `active` at zero went there already).
        for t in &tasks {
            if t.notified.load(SeqCst) {
                t.wake_tokio();
            }
        }
        r
    }
}

impl Runtime for InlineRuntime {
    fn new_timer(&self, i: Instant) -> Pin<Box<dyn AsyncTimer>> {
        // Timers may be made while a driver is polled off the runtime.
        let _in = self.handle.enter();
        quinn::TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        let task = Arc::new(Task {
            fut: Mutex::new(Some(future)),
            notified: AtomicBool::new(false),
            tokio_waker: Mutex::new(None),
            shared: Arc::downgrade(&self.shared),
        });
        lock(&self.shared.tasks).push(Arc::downgrade(&task));
        self.handle.spawn(std::future::poll_fn(move |cx| {
            *lock(&task.tokio_waker) = Some(cx.waker().clone());
            match task.poll_once() {
                Poll::Ready(()) => Poll::Ready(()),
                // Another thread is polling it: if a wake-up came meanwhile,
                // that thread polls again or hands it back here.
                Poll::Pending => Poll::Pending,
            }
        }));
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let _in = self.handle.enter();
        t.set_nonblocking(true)?;
        Ok(Arc::new(InlineSocket {
            inner: UdpSocketState::new((&t).into())?,
            io: watch(t, Interest::READABLE)?,
            blocked: AtomicBool::new(false),
            handle: self.handle.clone(),
        }))
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The endpoint's UDP socket, watched by tokio for reading only. A socket
/// watched for writing too (as quinn's tokio runtime does) makes every
/// datagram sent, by any thread, wake the runtime's thread: the kernel
/// signals free send space each time a datagram leaves. Writability is
/// watched only after a send found the socket full, until it drains.
#[derive(Debug)]
struct InlineSocket {
    io: AsyncFd<std::net::UdpSocket>,
    inner: UdpSocketState,
    /// The last send found the socket full.
    blocked: AtomicBool,
    /// Where writability is watched from (a send may come from any thread).
    handle: tokio::runtime::Handle,
}

/// Registers `io` with tokio's reactor (call it inside the runtime) for
/// `interest` only.
fn watch<T: std::os::fd::AsRawFd>(io: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: the `AsyncFd` owns `io`, so its descriptor stays open for as
    // long as it is registered.
    unsafe { AsyncFd::register_with_interest(io, interest) }.map_err(|e| e.into_parts().1)
}

impl AsyncUdpSocket for InlineSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(WritablePoller {
            socket: self,
            watch: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match self.inner.send(self.io.get_ref().into(), transmit) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.blocked.store(true, SeqCst);
                Err(e)
            }
            r => r,
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = match self.io.poll_read_ready(cx) {
                Poll::Ready(Ok(g)) => g,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            if let Ok(r) = guard.try_io(|io| self.inner.recv(io.get_ref().into(), bufs, meta)) {
                return Poll::Ready(r);
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.gro_segments()
    }
}

/// Ready at once unless the socket's last send found it full; then ready
/// once tokio sees it writable (watching a duplicate of the descriptor for
/// writing, only until then).
#[derive(Debug)]
struct WritablePoller {
    socket: Arc<InlineSocket>,
    watch: Option<AsyncFd<std::os::fd::OwnedFd>>,
}

impl UdpPoller for WritablePoller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        if !self.socket.blocked.load(SeqCst) {
            self.watch = None;
            return Poll::Ready(Ok(()));
        }
        if self.watch.is_none() {
            let fd = self.socket.io.get_ref().as_fd().try_clone_to_owned()?;
            let _in = self.socket.handle.enter();
            self.watch = Some(watch(fd, Interest::WRITABLE)?);
        }
        let Some(watch) = self.watch.as_ref() else {
            return Poll::Pending;
        };
        match watch.poll_write_ready(cx) {
            Poll::Ready(Ok(mut guard)) => {
                guard.clear_ready();
                self.socket.blocked.store(false, SeqCst);
                self.watch = None;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn socket(rt: &tokio::runtime::Runtime) -> Arc<InlineSocket> {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let _in = rt.enter();
        s.set_nonblocking(true).unwrap();
        Arc::new(InlineSocket {
            inner: UdpSocketState::new((&s).into()).unwrap(),
            io: watch(s, Interest::READABLE).unwrap(),
            blocked: AtomicBool::new(false),
            handle: rt.handle().clone(),
        })
    }

    #[test]
    fn the_poller_is_ready_at_once_until_a_send_finds_the_socket_full() {
        let rt = runtime();
        let s = socket(&rt);
        let mut p = Box::pin(WritablePoller {
            socket: s.clone(),
            watch: None,
        });
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            p.as_mut().poll_writable(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert!(p.watch.is_none(), "nothing watched while sends go through");

        // A send found the socket full: the poller watches for writability
        // (from a thread outside the runtime, as a FUSE worker would), and
        // goes on once tokio reports the socket writable (it is: nothing is
        // queued), without a watch left behind.
        s.blocked.store(true, SeqCst);
        let outside = std::thread::spawn(move || {
            let mut cx = Context::from_waker(Waker::noop());
            let first = p.as_mut().poll_writable(&mut cx);
            (first.is_ready(), p)
        });
        let (ready_at_once, mut p) = outside.join().unwrap();
        let r = rt.block_on(std::future::poll_fn(|cx| p.as_mut().poll_writable(cx)));
        assert!(r.is_ok(), "{r:?}");
        assert!(ready_at_once || !s.blocked.load(SeqCst));
        assert!(!s.blocked.load(SeqCst), "writable again");
        assert!(
            p.watch.is_none(),
            "the write watch is dropped once writable"
        );
    }

    /// A task of `inline` that counts its polls, hands out the waker of
    /// each, and wakes itself on the polls numbered in `self_wakes`.
    fn counting_task(
        inline: &InlineRuntime,
        self_wakes: std::ops::Range<usize>,
    ) -> (Arc<AtomicUsize>, std::sync::mpsc::Receiver<Waker>) {
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<Waker>();
        let counted = polls.clone();
        inline.spawn(Box::pin(std::future::poll_fn(move |cx| {
            let n = counted.fetch_add(1, SeqCst) + 1;
            let _ = tx.send(cx.waker().clone());
            if self_wakes.contains(&n) {
                cx.waker().wake_by_ref();
            }
            Poll::<()>::Pending
        })));
        (polls, rx)
    }

    /// Lets the runtime run its tasks for a while.
    fn run_tasks(rt: &tokio::runtime::Runtime) {
        rt.block_on(async {
            for _ in 0..40 {
                tokio::task::yield_now().await;
            }
        })
    }

    #[test]
    fn a_drive_polls_only_woken_tasks_and_hands_late_wakes_to_tokio() {
        let rt = runtime();
        let inline = InlineRuntime::new(rt.handle().clone());
        let (polls, rx) = counting_task(&inline, 0..0);
        // The tokio task polls it once when it first runs.
        run_tasks(&rt);
        assert_eq!(polls.load(SeqCst), 1);
        let waker = rx.try_iter().last().expect("polled with a waker");

        // Not woken: a drive does not poll it.
        inline.drive(|| ());
        assert_eq!(polls.load(SeqCst), 1);

        // Woken inside a drive: polled by the drive itself.
        inline.drive(|| waker.wake_by_ref());
        assert_eq!(polls.load(SeqCst), 2);
        let waker = rx.try_iter().last().expect("polled again");

        // Woken outside any drive: left to tokio, which polls it.
        waker.wake_by_ref();
        assert_eq!(polls.load(SeqCst), 2);
        run_tasks(&rt);
        assert_eq!(polls.load(SeqCst), 3);
    }

    #[test]
    fn a_task_still_busy_after_the_drive_rounds_is_handed_to_tokio() {
        let rt = runtime();
        let inline = InlineRuntime::new(rt.handle().clone());
        // Like a connection driver with more to send than one poll sends:
        // it wakes itself until its 20th poll.
        let (polls, rx) = counting_task(&inline, 2..20);
        run_tasks(&rt);
        assert_eq!(polls.load(SeqCst), 1);
        let waker = rx.try_iter().last().expect("polled with a waker");
        inline.drive(|| waker.wake_by_ref());
        assert_eq!(
            polls.load(SeqCst),
            1 + DRIVE_ROUNDS,
            "the drive's own rounds"
        );
        // The rest is tokio's: without the hand-over it would never run.
        run_tasks(&rt);
        assert_eq!(polls.load(SeqCst), 20);
    }
}
