//! A TCP source: line-delimited JSON from any number of clients at once.
//!
//! The engine listens on the configured address. A small tokio runtime on
//! its own thread accepts connections and frames lines per connection (with
//! the same length limit as files); complete lines reach the dataflow through
//! a bounded channel, which pushes back on clients when the engine is busy.
//! With `until_disconnect`, the source ends once every client that connected
//! has disconnected and none has connected for [`UNTIL_DISCONNECT_LINGER`]
//! (handy for batch loads and tests); otherwise it runs until the process is
//! stopped. Either way the listener is closed before the source ends, and
//! the lines of every client it accepted are read first: a client is either
//! read in full or refused, never accepted and then ignored.

use std::io;

use std::time::{Duration, Instant};
use timely::scheduling::SyncActivator;

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::lines::{Framer, Framing, LineSource, Next};

/// With `until = "disconnect"`, how long the source waits after its last
/// client left for another to connect before it ends.
pub const UNTIL_DISCONNECT_LINGER: Duration = Duration::from_millis(250);

enum Msg {
    Connected,
    /// The listener is closed: no client connects any more.
    ListenerClosed,
    Item(Next),
    /// A connection ended, after all its lines.
    Disconnected(Option<String>),
}

/// Sends `msg`; if the channel is full, wakes the engine first so that it
/// drains the channel (lines are otherwise announced once per read chunk).
async fn send(
    tx: &mpsc::Sender<Msg>,
    msg: Msg,
    wake: &(dyn Fn() + Send + Sync),
) -> Result<(), mpsc::error::SendError<Msg>> {
    match tx.try_send(msg) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(msg)) => {
            wake();
            tx.send(msg).await
        }
        Err(mpsc::error::TrySendError::Closed(msg)) => Err(mpsc::error::SendError(msg)),
    }
}

/// Runs `task` on a single-threaded tokio runtime, on a thread of its own
/// named `name` (the socket sources' accepting and serving).
pub(super) fn spawn_on_runtime<F>(name: String, task: F) -> io::Result<std::thread::JoinHandle<()>>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    std::thread::Builder::new().name(name).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(task);
    })
}

/// Lines received on a TCP listener.
pub struct TcpLines {
    rx: mpsc::Receiver<Msg>,
    connected: usize,
    seen_client: bool,
    until_disconnect: bool,
    lines: u64,
    /// Peers whose connection ended since the last `take_closed`.
    closed: Vec<Option<String>>,
    /// Since when no client has been connected (with `until_disconnect`).
    all_gone_since: Option<Instant>,
    /// Asks the accepting task to close the listener (taken when sent).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Whether the listener is closed (after `stop`).
    listener_closed: bool,
    _runtime: std::thread::JoinHandle<()>,
}

impl TcpLines {
    /// Binds `addr` now (so a bad address fails at start) and accepts clients
    /// in the background; each connection is framed as `framing` says.
    /// `waker` is activated whenever lines, a connection or a disconnection
    /// arrive, so the engine need not poll.
    pub fn listen(
        addr: &str,
        until_disconnect: bool,
        limit: usize,
        framing: Framing,
        waker: Option<SyncActivator>,
    ) -> io::Result<Self> {
        let wake = std::sync::Arc::new(move || {
            if let Some(w) = &waker {
                // An error means the worker is gone; the run is ending.
                let _ = w.activate();
            }
        });
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let (tx, rx) = mpsc::channel(4096);
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = spawn_on_runtime(format!("segflow-tcp-{addr}"), async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!("tcp source: {e}");
                    return;
                }
            };
            loop {
                // Stop accepting when asked, or when the source is
                // gone (the sender dropped).
                let accepted = tokio::select! {
                    _ = &mut stop_rx => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut stream, peer)) = accepted else {
                    continue;
                };
                let tx = tx.clone();
                let wake = std::sync::Arc::clone(&wake);
                tokio::spawn(async move {
                    if tx.send(Msg::Connected).await.is_err() {
                        return;
                    }
                    wake();
                    let peer = Some(peer.to_string());
                    let mut framer = Framer::new(limit, framing);
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let mut chunk = &buf[..n];
                        let mut sent = false;
                        while !chunk.is_empty() {
                            let (used, line) = framer.feed(chunk, &peer);
                            chunk = &chunk[used..];
                            if let Some(line) = line {
                                if send(&tx, Msg::Item(line), &*wake).await.is_err() {
                                    return;
                                }
                                sent = true;
                            }
                        }
                        if sent {
                            wake();
                        }
                    }
                    if framer.has_partial() {
                        let _ = tx.send(Msg::Item(framer.finish(&peer))).await;
                    }
                    let _ = tx.send(Msg::Disconnected(peer)).await;
                    wake();
                });
            }
            drop(listener);
            let _ = tx.send(Msg::ListenerClosed).await;
            wake();
            // Let the accepted connections finish their lines.
            while !tx.is_closed() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })?;
        Ok(TcpLines {
            closed: Vec::new(),
            all_gone_since: None,
            stop: Some(stop),
            listener_closed: false,
            rx,
            connected: 0,
            seen_client: false,
            until_disconnect,
            lines: 0,
            _runtime: runtime,
        })
    }
}

impl LineSource for TcpLines {
    fn next_line(&mut self) -> io::Result<Next> {
        loop {
            match self.rx.try_recv() {
                Ok(Msg::Connected) => {
                    self.connected += 1;
                    self.seen_client = true;
                    self.all_gone_since = None;
                }
                Ok(Msg::ListenerClosed) => self.listener_closed = true,
                Ok(Msg::Disconnected(peer)) => {
                    self.connected = self.connected.saturating_sub(1);
                    self.closed.push(peer);
                }
                Ok(Msg::Item(item)) => {
                    self.lines += 1;
                    return Ok(item);
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    if self.until_disconnect && self.seen_client && self.connected == 0 {
                        if self.listener_closed {
                            // Every client accepted before the listener
                            // closed has been read.
                            return Ok(Next::End);
                        }
                        // The last client left; one that connects right
                        // after it (a batch load in several connections)
                        // is still read. Then the listener is closed, and
                        // clients it accepted meanwhile are read too.
                        let since = *self.all_gone_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= UNTIL_DISCONNECT_LINGER {
                            if let Some(stop) = self.stop.take() {
                                let _ = stop.send(());
                            }
                        }
                    }
                    return Ok(Next::Pending);
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return Ok(Next::End),
            }
        }
    }
    fn position(&self) -> u64 {
        self.lines
    }
    fn is_live(&self) -> bool {
        true
    }
    fn wakes_on_input(&self) -> bool {
        true
    }
    fn take_closed(&mut self) -> Vec<Option<String>> {
        std::mem::take(&mut self.closed)
    }
}
