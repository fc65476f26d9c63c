//! Identifiers and identity rules.
//!
//! A record carries one or more identifiers (CRM id, user id, e-mail, phone,
//! anonymous id, ...). Each becomes an [`Ident`]: a normalized value prefixed
//! with its kind (`"email:bob@example.com"`, `"crm:C1"`) plus a *rank*, the
//! position of its field in [`IdentityRules::priority`]. Identity resolution
//! links every identifier seen together into one profile; inside the
//! dataflow an identifier is its fixed-size key, [`Id`], and the profile's
//! canonical id is the identifier with the minimum key, i.e. the most
//! trusted identifier kind wins and ties are broken by a hash of the text.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::normalize::{normalize_email, normalize_phone};

/// A normalized, ranked identifier, as decoded from a record; the dataflow
/// works on its key, [`Ident::id`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ident {
    /// Position of the identifier's field in [`IdentityRules::priority`];
    /// lower is more trusted.
    pub rank: u8,
    /// `"<prefix>:<normalized value>"`, e.g. `"email:bob@example.com"`.
    pub value: String,
}

impl Ident {
    /// The kind prefix before the first `:` (`"email"`, `"crm"`, `"anon"`, ...).
    pub fn kind(&self) -> &str {
        self.value
            .split_once(':')
            .map_or(self.value.as_str(), |(k, _)| k)
    }

    /// The full `"<prefix>:<value>"` text.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// The normalized value without its kind prefix.
    pub fn raw_value(&self) -> &str {
        self.value.split_once(':').map_or("", |(_, v)| v)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.value)
    }
}

/// An identifier's fixed-size key, the form identifiers take inside the
/// dataflow: the rank in the top 8 bits, then the low 120 bits of the XXH3
/// 128-bit hash of the `kind:value` text
/// (<https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md>).
/// Ordered by `(rank, hash)`, so the minimum key of a profile is still one of
/// its most trusted identifiers; within a rank, ties are broken by the hash.
///
/// The key is computed from the text alone, the same on every worker,
/// process and run, so no dictionary has to be consulted to make one; the
/// text for a key (the *name*) flows once per identifier to the sinks, which
/// refuse two texts with one key (at 120 bits, a collision among a billion
/// identifiers has a probability of about 10⁻¹⁸).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Id(pub u128);

impl Id {
    /// The key of `value` (`kind:value` text) at `rank`.
    pub fn of(rank: u8, value: &str) -> Id {
        const HASH_BITS: u128 = (1u128 << 120) - 1;
        let hash = xxhash_rust::xxh3::xxh3_128(value.as_bytes());
        Id(((rank as u128) << 120) | (hash & HASH_BITS))
    }

    /// The rank: the position of the identifier's field in
    /// [`IdentityRules::priority`].
    pub fn rank(self) -> u8 {
        (self.0 >> 120) as u8
    }
}

/// A hash map keyed by [`Id`], with the engine's hasher (foldhash, seeded
/// per process: keys come from the input).
pub type IdMap<V> = std::collections::HashMap<Id, V, foldhash::fast::RandomState>;

impl Ident {
    /// This identifier's key.
    pub fn id(&self) -> Id {
        Id::of(self.rank, &self.value)
    }
}

/// The kind prefix used for an input field: `crm_id` → `crm`, `user_id` →
/// `user`, `email` → `email`, `phone` → `phone`, `anonymous_id` → `anon`;
/// any other field name is its own prefix (`device_id` → `device_id`).
pub fn prefix_for(field: &str) -> &str {
    match field {
        "crm_id" => "crm",
        "user_id" => "user",
        "email" => "email",
        "phone" => "phone",
        "anonymous_id" => "anon",
        other => other,
    }
}

/// Which input fields are identifiers, how they rank, and how phone numbers
/// without a country code are read.
#[derive(Clone, Debug)]
pub struct IdentityRules {
    /// Identifier field names, most trusted first; an identifier's rank is
    /// its field's index here. Fields not listed are not identifiers.
    pub priority: Vec<String>,
    /// ISO 3166-1 alpha-2 region (e.g. `"US"`) for phone numbers written
    /// without an international prefix.
    pub default_region: String,
}

impl IdentityRules {
    /// Creates rules from a priority list of field names and a default phone
    /// region.
    pub fn new(priority: Vec<String>, default_region: String) -> Self {
        IdentityRules {
            priority,
            default_region,
        }
    }

    /// The rank of `field`, if it is an identifier field (indexes past 255
    /// saturate at 255).
    pub fn rank_of(&self, field: &str) -> Option<u8> {
        self.priority
            .iter()
            .position(|f| f == field)
            .map(|i| i.min(u8::MAX as usize) as u8)
    }

    /// Normalizes `raw` according to `field` and returns its identifier.
    ///
    /// `email` uses [`normalize_email`], `phone` uses [`normalize_phone`] with
    /// [`Self::default_region`], anything else [`normalize_id`](super::normalize::normalize_id). Returns
    /// `None` when `field` is not in [`Self::priority`] or the value does not
    /// normalize.
    pub fn make(&self, field: &str, raw: &str) -> Option<Ident> {
        self.make_ranked(self.rank_of(field)?, field, raw)
    }

    /// [`Self::make`] for a caller that knows `rank`, the rank of `field`.
    pub(crate) fn make_ranked(&self, rank: u8, field: &str, raw: &str) -> Option<Ident> {
        let prefix = prefix_for(field);
        // Builds "<prefix>:<normalized>" with one allocation where possible
        // (the same result as `format!("{prefix}:{}", normalize_*(raw)?)`).
        let with_prefix = |norm: &str| {
            let mut value = String::with_capacity(prefix.len() + 1 + norm.len());
            value.push_str(prefix);
            value.push(':');
            value.push_str(norm);
            value
        };
        let value = match field {
            "email" => {
                let t = raw.trim();
                if t.is_ascii() {
                    // normalize_email, for ASCII text: lower-casing neither
                    // adds nor removes an `@` nor empties either side of it.
                    let (local, domain) = t.rsplit_once('@')?;
                    if local.is_empty() || domain.is_empty() {
                        return None;
                    }
                    let mut value = with_prefix(t);
                    value[prefix.len() + 1..].make_ascii_lowercase();
                    value
                } else {
                    with_prefix(&normalize_email(raw)?)
                }
            }
            "phone" => with_prefix(&normalize_phone(raw, &self.default_region)?),
            _ => {
                // normalize_id without its allocation
                let t = raw.trim();
                if t.is_empty() {
                    return None;
                }
                with_prefix(t)
            }
        };
        Some(Ident { rank, value })
    }

    /// The kinds of identifier, as query prefixes (`crm`, `user`, `email`,
    /// `phone`, `anon`, extras by their field name), in priority order.
    pub fn kinds(&self) -> Vec<&str> {
        self.priority.iter().map(|f| prefix_for(f)).collect()
    }

    /// Whether `kind` names a kind of identifier: a field of the priority
    /// list or its prefix, in any case.
    pub fn is_kind(&self, kind: &str) -> bool {
        self.priority
            .iter()
            .any(|f| f.eq_ignore_ascii_case(kind) || prefix_for(f).eq_ignore_ascii_case(kind))
    }

    /// Interprets a lookup query as identifiers.
    ///
    /// `"kind:value"`, where `kind` is an identifier field name (`crm_id`) or
    /// its prefix (`crm`), in any case (`EMAIL:`), yields that one identifier, normalized (or nothing
    /// if it does not normalize). Anything else is a bare value and yields
    /// every interpretation that normalizes: an e-mail if it contains `@`, a
    /// phone number if it parses, and each id kind in the priority list. The
    /// result is sorted and deduplicated.
    pub fn parse_query(&self, q: &str) -> Vec<Ident> {
        let q = q.trim();
        if let Some((kind, rest)) = q.split_once(':') {
            let kind = kind.trim();
            if let Some(field) = self
                .priority
                .iter()
                .find(|f| f.eq_ignore_ascii_case(kind) || prefix_for(f).eq_ignore_ascii_case(kind))
            {
                return self.make(field, rest).into_iter().collect();
            }
        }
        let mut out: Vec<Ident> = self
            .priority
            .iter()
            .filter(|f| f.as_str() != "email" || q.contains('@'))
            .filter_map(|f| self.make(f, q))
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> IdentityRules {
        IdentityRules::new(
            ["crm_id", "user_id", "email", "phone", "anonymous_id"]
                .map(String::from)
                .to_vec(),
            "US".into(),
        )
    }

    #[test]
    fn prefixes() {
        assert_eq!(prefix_for("crm_id"), "crm");
        assert_eq!(prefix_for("user_id"), "user");
        assert_eq!(prefix_for("email"), "email");
        assert_eq!(prefix_for("phone"), "phone");
        assert_eq!(prefix_for("anonymous_id"), "anon");
        assert_eq!(prefix_for("device_id"), "device_id");
    }

    #[test]
    fn make_normalizes_and_ranks() {
        let r = rules();
        let e = r.make("email", "  Bob@Example.COM ").unwrap();
        assert_eq!(
            e,
            Ident {
                rank: 2,
                value: "email:bob@example.com".into()
            }
        );
        assert_eq!(e.kind(), "email");
        assert_eq!(e.as_str(), "email:bob@example.com");
        assert_eq!(e.raw_value(), "bob@example.com");
        assert_eq!(e.to_string(), "email:bob@example.com");
        assert_eq!(
            r.make("phone", "(415) 555-2671").unwrap().value,
            "phone:+14155552671"
        );
        assert_eq!(
            r.make("crm_id", " C1 ").unwrap(),
            Ident {
                rank: 0,
                value: "crm:C1".into()
            }
        );
        assert_eq!(r.make("anonymous_id", "a-1").unwrap().kind(), "anon");
        assert_eq!(r.make("device_id", "d1"), None);
        assert_eq!(r.make("email", "nope"), None);
        assert_eq!(r.make("phone", "nope"), None);
        assert_eq!(r.make("user_id", "  "), None);
    }

    #[test]
    fn ordering_picks_most_trusted() {
        let r = rules();
        let mut ids = [
            r.make("anonymous_id", "a").unwrap(),
            r.make("email", "z@x.com").unwrap(),
            r.make("crm_id", "Z9").unwrap(),
            r.make("crm_id", "A1").unwrap(),
        ];
        ids.sort();
        assert_eq!(ids[0].value, "crm:A1");
        assert_eq!(ids[3].value, "anon:a");
    }

    #[test]
    fn query_prefixed() {
        let r = rules();
        assert_eq!(
            r.parse_query("email:Bob@X.com"),
            vec![Ident {
                rank: 2,
                value: "email:bob@x.com".into()
            }]
        );
        assert_eq!(
            r.parse_query("crm:C1"),
            vec![Ident {
                rank: 0,
                value: "crm:C1".into()
            }]
        );
        assert_eq!(
            r.parse_query("crm_id:C1"),
            vec![Ident {
                rank: 0,
                value: "crm:C1".into()
            }]
        );
        assert_eq!(
            r.parse_query("EMAIL:Bob@X.com"),
            r.parse_query("email:bob@x.com"),
            "the kind in any case"
        );
        assert_eq!(
            r.parse_query("anon: a-7 "),
            vec![Ident {
                rank: 4,
                value: "anon:a-7".into()
            }]
        );
        assert_eq!(
            r.parse_query("phone:415.555.2671")[0].value,
            "phone:+14155552671"
        );
        assert!(r.parse_query("email:not-an-email").is_empty());
    }

    #[test]
    fn query_bare() {
        let r = rules();
        let v: Vec<String> = r
            .parse_query("Bob@X.com")
            .into_iter()
            .map(|i| i.value)
            .collect();
        assert_eq!(
            v,
            [
                "crm:Bob@X.com",
                "user:Bob@X.com",
                "email:bob@x.com",
                "anon:Bob@X.com"
            ]
        );
        let v: Vec<String> = r
            .parse_query("4155552671")
            .into_iter()
            .map(|i| i.value)
            .collect();
        assert_eq!(
            v,
            [
                "crm:4155552671",
                "user:4155552671",
                "phone:+14155552671",
                "anon:4155552671"
            ]
        );
        let v: Vec<String> = r.parse_query("C1").into_iter().map(|i| i.value).collect();
        assert_eq!(v, ["crm:C1", "user:C1", "anon:C1"]);
        // unknown prefix: the whole text is a bare value
        let v: Vec<String> = r
            .parse_query("urn:x")
            .into_iter()
            .map(|i| i.value)
            .collect();
        assert_eq!(v, ["crm:urn:x", "user:urn:x", "anon:urn:x"]);
        assert!(r.parse_query("   ").is_empty());
    }
}
