//! CRM records as upserts, and the attributes of each profile.
//!
//! CRM records are keyed by `crm_id`. The *current* version of a CRM record
//! is the one with the latest `updated_at` (ties broken by content, so the
//! choice is deterministic); a current version with `"deleted": true` removes
//! the record, its attributes and the identity links it contributed. Because
//! this is a "last value" aggregate, it is one of the few places that use
//! `reduce`.
//!
//! A profile's attributes merge the attributes of all its current CRM
//! records; for the same attribute name the most recently updated record
//! wins (then the greater `crm_id`).

use super::traits::IdProfileArrangement;
use super::Coll;
use crate::model::{CrmRecord, Ident, Scalar};

/// A profile's merged attributes, sorted by name.
pub type Attributes = Vec<(String, Scalar)>;

/// The current version of every CRM record that is not deleted, keyed by
/// `crm_id`.
pub fn crm_current<'s>(versions: Coll<'s, (String, CrmRecord)>) -> Coll<'s, (String, CrmRecord)> {
    versions.reduce_named("Upsert: CRM records", |_crm_id, input, output| {
        // Values arrive sorted; `CrmRecord` orders by `updated_ms` first.
        if let Some((latest, _)) = input.iter().rev().find(|(_, count)| *count > 0) {
            if !latest.deleted {
                output.push(((*latest).clone(), 1isize));
            }
        }
    })
}

/// Merged CRM attributes per profile: `(profile, attributes)`.
pub fn attributes<'s>(
    current: Coll<'s, (String, CrmRecord)>,
    id_profile: IdProfileArrangement<'s>,
) -> Coll<'s, (Ident, Attributes)> {
    current
        .flat_map(|(crm_id, record)| {
            let key = record.ids.iter().find(|id| id.kind() == "crm").cloned();
            key.map(|key| (key, (record.updated_ms, crm_id, record.attributes)))
        })
        .join_core(id_profile, |_crm, version, profile| {
            Some((profile.clone(), version.clone()))
        })
        .reduce_named("Merge: profile attributes", |_profile, input, output| {
            let mut merged: std::collections::BTreeMap<String, Scalar> = Default::default();
            // Sorted by (updated_ms, crm_id, ..): later versions override.
            for ((_, _, attrs), count) in input.iter() {
                if *count > 0 {
                    for (name, value) in attrs {
                        merged.insert(name.clone(), value.clone());
                    }
                }
            }
            output.push((merged.into_iter().collect::<Attributes>(), 1isize));
        })
}
