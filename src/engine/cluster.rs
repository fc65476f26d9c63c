//! Cluster start-up: the processes of a cluster connect to each other,
//! check that they agree on what they run, and hand the connections to
//! timely.
//!
//! timely's own start-up (`CommunicationConfig::Cluster`) retries forever,
//! prints to standard output and checks nothing: two processes started with
//! different `-w` or different dataflow definitions would exchange data for
//! workers that do not exist. segflow connects the same way timely does
//! (process `i` connects to every process `j < i` and accepts every process
//! `j > i`, at the hostfile's addresses), but within a deadline, and the
//! first message on every connection is a [`Hello`]: the sender's process
//! index, its [`Agreement`] and, if it cannot start, why. Every process
//! compares every peer's hello with its own, so all of them start, or all of
//! them stop with the reason; then the same connections carry timely's
//! traffic (`initialize_networking_from_sockets`).
//!
//! Wire format of a hello: the 8 bytes `segflow\x01`, a big-endian `u32`
//! length, then that many bytes of JSON.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What every process of a cluster must agree on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Agreement {
    /// The segflow version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Number of processes (`-n`).
    pub processes: usize,
    /// Worker threads per process (`-w`).
    pub threads: usize,
    /// A fingerprint of the parsed dataflow definition (16 hex digits).
    pub definition: String,
    /// What the definition computes, one line per setting, trait and
    /// segment (`Spec::semantics`), to say what differs.
    pub semantics: String,
    /// Each source's name and kind of input, in definition order
    /// (`web=file`, `txn=tcp until disconnect`); paths may differ between
    /// hosts and are not compared.
    pub inputs: Vec<String>,
    /// Whether this process writes state (`--state-dir`): every process
    /// writes its own part, so either all do or none.
    pub state: bool,
}

/// The connections of a started cluster.
pub(crate) struct Connected {
    /// One socket per process, `None` at this process's index.
    pub sockets: Vec<Option<TcpStream>>,
    /// The run's identity, process 0's.
    pub run: String,
}

impl Agreement {
    /// The differences between `self` (this process) and `other` (a peer),
    /// as readable phrases; empty when they agree.
    fn differences(&self, other: &Agreement) -> Vec<String> {
        let mut d = Vec::new();
        if self.version != other.version {
            d.push(format!(
                "segflow {} there, {} here",
                other.version, self.version
            ));
        }
        if self.processes != other.processes {
            d.push(format!(
                "-n {} there, -n {} here",
                other.processes, self.processes
            ));
        }
        if self.threads != other.threads {
            d.push(format!(
                "-w {} there, -w {} here",
                other.threads, self.threads
            ));
        }
        if self.definition != other.definition {
            let theirs: Vec<&str> = other.semantics.lines().collect();
            let ours: Vec<&str> = self.semantics.lines().collect();
            let mut what: Vec<String> = ours
                .iter()
                .filter(|l| !theirs.contains(l))
                .map(|l| format!("here `{l}`"))
                .chain(
                    theirs
                        .iter()
                        .filter(|l| !ours.contains(l))
                        .map(|l| format!("there `{l}`")),
                )
                .take(4)
                .collect();
            if what.is_empty() {
                what.push("in the order of its tables".into());
            }
            d.push(format!(
                "a different dataflow definition ({})",
                what.join(", ")
            ));
        }
        if self.inputs != other.inputs {
            d.push(format!(
                "inputs {} there, {} here",
                other.inputs.join(", "),
                self.inputs.join(", ")
            ));
        }
        if self.state != other.state {
            let says = |state: bool| {
                if state {
                    "a state directory"
                } else {
                    "no state directory"
                }
            };
            d.push(format!(
                "{} there, {} here (every process writes its part of the state, so give all or none a --state-dir)",
                says(other.state),
                says(self.state)
            ));
        }
        d
    }
}

/// The first message on every connection between two processes.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    /// The sender's process index (`-p`).
    process: usize,
    /// What the sender runs.
    agreement: Agreement,
    /// Why the sender cannot start (an input it cannot open, an output it
    /// cannot create), if so.
    problem: Option<String>,
    /// The run's identity, chosen by process 0 (the others' is unused):
    /// every part of the state records it, so parts of different runs are
    /// never read as one.
    #[serde(default)]
    run: String,
}

const MAGIC: &[u8; 8] = b"segflow\x01";
const MAX_HELLO_BYTES: u32 = 1 << 20;

fn send_hello(stream: &mut TcpStream, hello: &Hello) -> std::io::Result<()> {
    let body = serde_json::to_vec(hello).map_err(std::io::Error::other)?;
    let mut message = Vec::with_capacity(12 + body.len());
    message.extend_from_slice(MAGIC);
    message.extend_from_slice(&(body.len() as u32).to_be_bytes());
    message.extend_from_slice(&body);
    stream.write_all(&message)?;
    stream.flush()
}

fn read_hello(stream: &mut TcpStream) -> Result<Hello, String> {
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .map_err(|e| format!("no greeting ({e})"))?;
    if &head[..8] != MAGIC {
        return Err("it does not speak segflow's cluster protocol".to_string());
    }
    let len = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if len > MAX_HELLO_BYTES {
        return Err(format!("its greeting is too long ({len} bytes)"));
    }
    let mut body = vec![0u8; len as usize];
    stream
        .read_exact(&mut body)
        .map_err(|e| format!("a cut greeting ({e})"))?;
    serde_json::from_slice(&body).map_err(|e| format!("an unreadable greeting ({e})"))
}

/// How long until `deadline`, at least a millisecond (a zero read time-out
/// means "none" to the socket API).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Connects process `process` to every other process at `addresses`, within
/// `timeout`, and checks that all of them agree with `agreement` and can
/// start. `problem` is why this process itself cannot start; it is sent to
/// the peers (so they stop with that reason instead of waiting) and the
/// caller then stops with it.
///
/// Returns one socket per process, `None` at `process`, ready for timely,
///
/// # Errors
///
/// A readable reason: the listening address cannot be bound; peers that did
/// not answer within `timeout` (named with their addresses); a peer that is
/// not a segflow process of this cluster; a peer that runs a different
/// configuration (which part differs); a peer that cannot start (its reason);
/// `stop` set while waiting (a signal).
pub(crate) fn connect(
    process: usize,
    addresses: &[String],
    agreement: &Agreement,
    problem: Option<String>,
    timeout: Duration,
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Connected, String> {
    let n = addresses.len();
    let deadline = Instant::now() + timeout;
    let hello = Hello {
        process,
        agreement: agreement.clone(),
        problem,
        run: crate::store::new_run_id(),
    };
    let listener = TcpListener::bind(&addresses[process]).map_err(|e| {
        format!(
            "process {process} cannot listen on {} (its line in the hostfile): {e}",
            addresses[process]
        )
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot set up the cluster listener: {e}"))?;
    let mut sockets: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut hellos: Vec<Option<Hello>> = (0..n).map(|_| None).collect();
    let missing = |sockets: &[Option<TcpStream>]| -> Vec<usize> {
        (0..n)
            .filter(|&j| j != process && sockets[j].is_none())
            .collect()
    };
    while !missing(&sockets).is_empty() && Instant::now() < deadline {
        if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
            return Err(format!(
                "process {process} was stopped (SIGTERM or Ctrl-C) while it waited for the cluster; nothing was read"
            ));
        }
        let mut progressed = false;
        // Connect to every lower process not yet connected; the connecting
        // side greets first.
        for j in 0..process {
            if sockets[j].is_some() {
                continue;
            }
            let Some(addr) = addresses[j]
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
            else {
                continue;
            };
            let attempt = remaining(deadline).min(Duration::from_millis(500));
            let Ok(mut stream) = TcpStream::connect_timeout(&addr, attempt) else {
                continue;
            };
            let _ = stream.set_read_timeout(Some(remaining(deadline)));
            let answer = send_hello(&mut stream, &hello)
                .map_err(|e| format!("no greeting ({e})"))
                .and_then(|()| read_hello(&mut stream));
            match answer {
                Ok(peer) if peer.process == j => {
                    sockets[j] = Some(stream);
                    hellos[j] = Some(peer);
                    progressed = true;
                }
                Ok(peer) => {
                    return Err(format!(
                        "{} is process {} of the hostfile, but the segflow there says it is process {}: give every process the same hostfile",
                        addresses[j], j, peer.process
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "process {j} at {} answered with {e}: is it a segflow process of this cluster?",
                        addresses[j]
                    ))
                }
            }
        }
        // Accept every higher process that is connecting: it greets first.
        loop {
            match listener.accept() {
                Ok((mut stream, from)) => {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(remaining(deadline)));
                    let peer = read_hello(&mut stream).map_err(|e| {
                        format!(
                            "a connection from {from} to process {process} at {} came with {e}: is another program using this address?",
                            addresses[process]
                        )
                    })?;
                    let k = peer.process;
                    if k <= process || k >= n || sockets[k].is_some() {
                        return Err(format!(
                            "a segflow process connected to process {process} as process {k}, which is not a process this one waits for (-n {n}): start each process with its own -p and the same hostfile"
                        ));
                    }
                    send_hello(&mut stream, &hello).map_err(|e| {
                        format!("cannot greet process {k} at {}: {e}", addresses[k])
                    })?;
                    sockets[k] = Some(stream);
                    hellos[k] = Some(peer);
                    progressed = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("cluster listener at {}: {e}", addresses[process])),
            }
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let silent = missing(&sockets);
    // The peers' reasons first: a peer that cannot start is the cause even
    // when others are still missing.
    let mut reasons = Vec::new();
    for (j, peer) in hellos.iter().enumerate() {
        let Some(peer) = peer else { continue };
        if let Some(p) = &peer.problem {
            reasons.push(format!("process {j} cannot start: {p}"));
        }
        let d = agreement.differences(&peer.agreement);
        if !d.is_empty() {
            reasons.push(format!(
                "process {j} at {} runs with {}",
                addresses[j],
                d.join("; ")
            ));
        }
    }
    if reasons.iter().any(|r| r.contains(" runs with ")) {
        reasons.push(
            "start every process with the same segflow, dataflow definition, -w, -n and kinds of input"
                .to_string(),
        );
    }
    if !reasons.is_empty() {
        return Err(reasons.join("; "));
    }
    if !silent.is_empty() {
        let who: Vec<String> = silent
            .iter()
            .map(|&j| format!("process {j} at {}", addresses[j]))
            .collect();
        return Err(format!(
            "process {process} could not connect to the cluster within {} s: no answer from {}; start every process (-n {n} -p 0..{}) with the same hostfile, or raise --connect-timeout",
            timeout.as_secs(),
            who.join(", "),
            n - 1
        ));
    }
    for s in sockets.iter().flatten() {
        s.set_read_timeout(None)
            .and_then(|()| s.set_nodelay(true))
            .map_err(|e| format!("cannot set up a cluster connection: {e}"))?;
    }
    let run = match &hellos[0] {
        Some(leader) => leader.run.clone(),
        None => hello.run.clone(),
    };
    Ok(Connected { sockets, run })
}

/// Runs `func` on `threads` workers of this process, connected to the other
/// processes over `sockets` (from [`connect`]).
///
/// # Errors
///
/// timely's, when its network threads cannot be started.
pub(crate) fn execute<T, F>(
    sockets: Vec<Option<TcpStream>>,
    process: usize,
    threads: usize,
    worker: timely::WorkerConfig,
    func: F,
) -> Result<timely::communication::WorkerGuards<T>, String>
where
    T: Send + 'static,
    F: Fn(&mut timely::worker::Worker) -> T + Send + Sync + 'static,
{
    use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
    use timely::communication::allocator::ProcessBuilder;
    use timely::communication::{AllocatorBuilder, Hooks};
    let hooks = Hooks::default();
    let local =
        ProcessBuilder::new_typed_vector(threads, hooks.refill.clone(), hooks.spill.clone());
    let (builders, guard) =
        initialize_networking_from_sockets(local, sockets, process, threads, hooks)
            .map_err(|e| format!("cannot start the cluster's network threads: {e}"))?;
    let builders = builders.into_iter().map(AllocatorBuilder::Tcp).collect();
    timely::execute::execute_from(builders, Box::new(guard), worker, func)
}
