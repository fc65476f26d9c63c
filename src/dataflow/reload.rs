//! Hot reload of segment definitions while a run goes on.
//!
//! A running engine watches its definition file. An edit that validates
//! and changes only segments (added, removed or with a new condition or
//! dwell time) is applied without a restart; any other edit is refused
//! with its reason and the run goes on with the definitions it has (see
//! the engine, which decides).
//!
//! The new definition enters the dataflow as data, at an event time: the
//! [`definitions`] operator on every worker holds a capability at its
//! sources' frontier, so it delays nothing, and worker 0's polls the file.
//! An accepted text is emitted at that frontier time `T` and broadcast to
//! every worker, where [`crate::dataflow::segments::evaluate`] applies it
//! at `T` to every profile it holds: entries into new segments, exits from
//! removed ones and the difference for changed ones are all diffs at `T`,
//! on every worker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::Stream;

use super::Time;
use crate::io::Control;
use crate::spec::Spec;

/// What the engine gives the dataflow for hot reload.
#[derive(Clone)]
pub struct Reload {
    /// Looks at the definition file: `Some(text)` when it changed to a
    /// definition that may be applied now, at event time `at` (for the
    /// message); `None` otherwise (the reason, if any, is reported).
    pub poll: Arc<dyn Fn(Time) -> Option<String> + Send + Sync>,
    /// The fingerprint of a definition and of its parts, for the
    /// checkpoints from the reload on (see
    /// [`crate::engine::resume::fingerprint`]).
    pub fingerprint: Arc<dyn Fn(&Spec) -> (String, BTreeMap<String, String>) + Send + Sync>,
    /// How often the file is looked at.
    pub every: Duration,
}

/// The definition texts accepted while the run goes on, each at the event
/// time it applies from, on every worker (see the module documentation).
/// `control` is the sources' control stream (its frontier is theirs);
/// `reload`, if any, is polled on worker 0.
pub fn definitions<'s>(
    control: Stream<'s, Time, Vec<Control>>,
    reload: Option<Reload>,
) -> Stream<'s, Time, Vec<String>> {
    let scope = control.scope();
    let worker = scope.index();
    control
        .unary_frontier(Pipeline, "Definitions", move |cap, info| {
            let activator = scope.activator_for(info.address.clone());
            let mut cap = Some(cap);
            let reload = reload.filter(|_| worker == 0);
            if reload.is_some() {
                activator.activate();
            }
            move |(input, frontier), output| {
                input.for_each(|_, data| data.clear());
                let Some(at) = frontier.frontier().iter().min().copied() else {
                    // The sources have ended: nothing more is applied.
                    cap = None;
                    return;
                };
                let Some(c) = cap.as_mut() else { return };
                if *c.time() < at {
                    c.downgrade(&at);
                }
                if let Some(reload) = &reload {
                    if let Some(text) = (reload.poll)(*c.time()) {
                        output.session(c).give(text);
                    }
                    activator.activate_after(reload.every);
                }
            }
        })
        .broadcast()
}
