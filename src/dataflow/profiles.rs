//! CRM records as upserts, and the attributes of each profile.
//!
//! CRM records are keyed by `crm_id`. The *current* version of a CRM record
//! is the one with the latest `updated_at` (ties broken by content, so the
//! choice is deterministic); a current version with `"deleted": true` removes
//! the record, its attributes and the identity links it contributed. Because
//! this is a "last value" aggregate, it is one of the few places that use
//! `reduce`.
//!
//! Segment traits and GA4 user properties are CRM records too, one per
//! attribute (see [`crate::model::formats`]).
//!
//! A profile's attributes merge the attributes of all its current CRM
//! records; for the same attribute name the most recently updated record
//! wins (then the greater `crm_id`).

use std::sync::Arc;

use super::identity::IdProfileArrangement;
use super::Coll;
use crate::model::{CrmRecord, Id, Ident, Scalar};

/// A profile's merged attributes, sorted by name.
pub type Attributes = Vec<(String, Scalar)>;

/// A CRM record version as the dataflow carries it: shared, so that the
/// copies every operator makes of its data are a reference count, not the
/// record's identifiers and attributes.
pub type SharedCrm = Arc<CrmRecord>;

/// The current version of every CRM record that is not deleted, keyed by
/// `crm_id`.
pub fn crm_current<'s>(versions: Coll<'s, (String, SharedCrm)>) -> Coll<'s, (String, SharedCrm)> {
    versions.reduce_named("Upsert: CRM records", |_crm_id, input, output| {
        // Values arrive sorted; with one `crm_id` per key, `CrmRecord`'s
        // order is that of `updated_ms`, then content.
        if let Some((latest, _)) = input.iter().rev().find(|(_, count)| *count > 0) {
            if !latest.deleted {
                output.push(((*latest).clone(), 1isize));
            }
        }
    })
}

/// Merged CRM attributes per profile: `(profile, attributes)`.
pub fn attributes<'s>(
    current: Coll<'s, (String, SharedCrm)>,
    id_profile: IdProfileArrangement<'s>,
) -> Coll<'s, (Id, Attributes)> {
    current
        .flat_map(|(_crm_id, record)| {
            // A record of a CRM source has its `crm` identifier; one made
            // from a Segment trait or GA4 user property (`model::formats`)
            // has the message's identifiers, all in the same profile.
            let key = record
                .ids
                .iter()
                .find(|id| id.kind() == "crm")
                .or(record.ids.first())
                .map(Ident::id);
            // Ordered by `updated_ms`, then by `crm_id` (`CrmRecord`'s
            // first field).
            key.map(|key| (key, (record.updated_ms, record)))
        })
        .join_core(id_profile, |_crm, version, profile| {
            Some((*profile, version.clone()))
        })
        .reduce_named("Merge: profile attributes", |_profile, input, output| {
            let mut merged: std::collections::BTreeMap<String, Scalar> = Default::default();
            // Sorted by (updated_ms, crm_id, ..): later versions override.
            for ((_, record), count) in input.iter() {
                if *count > 0 {
                    for (name, value) in &record.attributes {
                        merged.insert(name.clone(), value.clone());
                    }
                }
            }
            output.push((merged.into_iter().collect::<Attributes>(), 1isize));
        })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use differential_dataflow::input::Input;

    use super::*;

    fn version(updated_ms: i64, deleted: bool, tier: &str) -> CrmRecord {
        CrmRecord {
            crm_id: "C1".into(),
            updated_ms,
            deleted,
            ids: vec![Ident {
                rank: 0,
                value: "crm:C1".into(),
            }],
            attributes: vec![("tier".into(), Scalar::Str(tier.into()))],
        }
    }

    /// Feeds versions at the given times (out of order) and returns the
    /// current version's tier after each time.
    #[test]
    fn latest_version_wins_and_deletes_remove() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::clone(&seen);
        timely::execute_directly(move |worker| {
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, versions) = scope.new_collection::<(String, SharedCrm), isize>();
                let probe = crm_current(versions)
                    .inspect(move |((_, c), t, d)| {
                        out.lock()
                            .unwrap()
                            .push((*t, c.attributes[0].1.to_string(), *d))
                    })
                    .probe();
                (input, probe.0)
            });
            // At time 1: versions updated at 5 and (older) 3 arrive together.
            input.advance_to(1);
            input.insert(("C1".into(), version(5, false, "gold").into()));
            input.insert(("C1".into(), version(3, false, "silver").into()));
            input.advance_to(2);
            // At time 2: a delete updated at 4 is older than the current
            // version and changes nothing; at 3 a newer delete removes it.
            input.insert(("C1".into(), version(4, true, "").into()));
            input.advance_to(3);
            input.insert(("C1".into(), version(6, true, "").into()));
            input.advance_to(4);
            input.flush();
            worker.step_while(|| probe.less_than(input.time()));
        });
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (1, "\"gold\"".to_string(), 1),
                (3, "\"gold\"".to_string(), -1)
            ]
        );
    }
}
