//! Deterministic identity resolution.
//!
//! Every record carries one or more identifiers (anonymous id, user id,
//! email, phone, CRM id, configured extras). Identifiers that appear on the
//! same record are *linked*; the connected components of the link graph are
//! the profiles. A component is named by its *canonical* identifier: the
//! smallest one by `(priority rank, value)` ([`Ident`]'s order), so the profile
//! id depends neither on arrival order nor on the number of workers.
//!
//! The components are maintained incrementally by min-label propagation
//! (`differential_dataflow::algorithms::graphs::propagate`): a new link that
//! joins two profiles moves every identifier of the losing one to the merged
//! profile, and a retracted link (a CRM record whose email changed) splits
//! them again.

use differential_dataflow::algorithms::graphs::propagate::propagate;

use super::Coll;
use crate::model::Ident;

/// The identifier set of each record, deduplicated: records with the same
/// identifiers add nothing to the link graph.
pub fn identifier_sets<'s>(sets: Coll<'s, Vec<Ident>>) -> Coll<'s, Vec<Ident>> {
    sets.filter(|ids| !ids.is_empty())
        .threshold_named("Distinct: identifier sets", |_, c| if *c > 0 { 1isize } else { 0 })
}

/// Resolves identifier sets into `(identifier, profile)` pairs, where the
/// profile is the canonical identifier of the identifier's component.
///
/// Each set is linked as a star around its first (highest-priority)
/// identifier; edges are symmetric as label propagation requires.
pub fn resolve<'s>(sets: Coll<'s, Vec<Ident>>) -> Coll<'s, (Ident, Ident)> {
    let sets = identifier_sets(sets);
    let nodes = sets
        .clone()
        .flat_map(|ids| ids.into_iter())
        .threshold_named("Distinct: identifiers", |_, c| if *c > 0 { 1isize } else { 0 });
    let edges = sets
        .flat_map(|ids| {
            let mut out = Vec::with_capacity(2 * ids.len());
            let first = &ids[0];
            for other in &ids[1..] {
                out.push((first.clone(), other.clone()));
                out.push((other.clone(), first.clone()));
            }
            out
        })
        .threshold_named("Distinct: links", |_, c| if *c > 0 { 1isize } else { 0 });
    let labels = nodes.map(|id| (id.clone(), id));
    propagate(edges, labels)
}

/// The distinct profiles: canonical identifiers of all components.
pub fn profiles<'s>(id_profile: Coll<'s, (Ident, Ident)>) -> Coll<'s, Ident> {
    id_profile
        .map(|(_, profile)| profile)
        .threshold_named("Distinct: profiles", |_, c| if *c > 0 { 1isize } else { 0 })
}
