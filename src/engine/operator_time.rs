//! Where a worker's time goes: the time each operator of the dataflow was
//! scheduled, from timely's own `Schedule` log events, logged at the end of
//! the run (`SEGFLOW_LOG=segflow::operators=debug`). Opt-in: timely's
//! logging costs a little on every operator activation.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use timely::logging::{StartStop, TimelyEvent, TimelyEventBuilder};

/// The tracing target whose `debug` level turns the profile on.
pub const TARGET: &str = "segflow::operators";

/// Per operator (worker-unique id): its name, address and the total time
/// it ran; the start of a running activation.
#[derive(Default)]
struct Totals {
    names: HashMap<usize, (String, Vec<usize>)>,
    spent: HashMap<usize, Duration>,
    started: HashMap<usize, Duration>,
}

/// The time per operator of one worker, gathered while it runs.
pub struct OperatorTime(Rc<RefCell<Totals>>);

impl OperatorTime {
    /// Starts gathering on `worker` if the profile is turned on (see the
    /// module documentation); `None` otherwise.
    pub fn install(worker: &mut timely::worker::Worker) -> Option<Self> {
        if !tracing::enabled!(target: TARGET, tracing::Level::DEBUG) {
            return None;
        }
        let totals = Rc::new(RefCell::new(Totals::default()));
        let gathered = Rc::clone(&totals);
        worker.log_register()?.insert::<TimelyEventBuilder, _>(
            "timely",
            move |_time, data: &mut Option<Vec<(Duration, TimelyEvent)>>| {
                let Some(events) = data else { return };
                let mut t = gathered.borrow_mut();
                for (at, event) in events.iter() {
                    match event {
                        TimelyEvent::Operates(o) => {
                            t.names.insert(o.id, (o.name.clone(), o.addr.clone()));
                        }
                        TimelyEvent::Schedule(s) => match s.start_stop {
                            StartStop::Start => {
                                t.started.insert(s.id, *at);
                            }
                            StartStop::Stop => {
                                if let Some(start) = t.started.remove(&s.id) {
                                    *t.spent.entry(s.id).or_default() += at.saturating_sub(start);
                                }
                            }
                        },
                        _ => {}
                    }
                }
            },
        );
        Some(OperatorTime(totals))
    }

    /// Logs the operators that ran longest on worker `index`, at most
    /// `limit`, with their share of the time all of them ran. A scope's
    /// time includes that of the operators inside it.
    pub fn report(&self, index: usize, limit: usize) {
        let t = self.0.borrow();
        let mut rows: Vec<(Duration, &str, &[usize])> = t
            .spent
            .iter()
            .map(|(id, spent)| {
                let (name, addr) = t
                    .names
                    .get(id)
                    .map(|(n, a)| (n.as_str(), a.as_slice()))
                    .unwrap_or(("?", &[]));
                (*spent, name, addr)
            })
            .collect();
        // Dataflows (address of length 1) add up to the worker's busy
        // time; the operators in them are inside those.
        let busy: Duration = rows
            .iter()
            .filter(|(_, _, addr)| addr.len() == 1)
            .map(|(d, _, _)| *d)
            .sum();
        rows.sort_by(|a, b| b.0.cmp(&a.0));
        for (spent, name, addr) in rows.into_iter().take(limit) {
            tracing::debug!(
                target: TARGET,
                worker = index,
                secs = spent.as_secs_f64(),
                share = format!("{:.1}%", 100.0 * spent.as_secs_f64() / busy.as_secs_f64().max(1e-9)),
                address = ?addr,
                "{name}"
            );
        }
    }
}
