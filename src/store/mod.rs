//! Durable, queryable state in RocksDB.
//!
//! One column family per kind of fact, keyed so that every fact of a profile
//! is one prefix scan away:
//!
//! | column family | key                      | value                         |
//! |---------------|--------------------------|-------------------------------|
//! | `id_profile`  | identifier               | profile id                    |
//! | `profile_ids` | ⟨profile⟩ identifier     | empty                         |
//! | `attributes`  | profile                  | JSON object                   |
//! | `traits`      | ⟨profile⟩ trait name     | JSON number                   |
//! | `segments`    | ⟨profile⟩ segment        | empty                         |
//!
//! `⟨profile⟩` is the profile id prefixed with its length (4 bytes,
//! big-endian), so no identifier, whatever bytes it holds, can make one
//! profile's keys look like another's.
//! | `checkpoint`  | `checkpoint`             | JSON `{time, offsets}`        |
//!
//! The commit stage writes every completed timestamp as one `WriteBatch`
//! (removals first, then insertions, so a changed value ends up new), with
//! the checkpoint in the same batch: state and checkpoint always agree.

use std::collections::BTreeMap;
use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use crate::model::{Ident, Scalar};

const CFS: [&str; 6] = [
    "id_profile",
    "profile_ids",
    "attributes",
    "traits",
    "segments",
    "checkpoint",
];

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB failed.
    #[error("state store {dir}: {source}")]
    Rocks {
        /// The state directory.
        dir: String,
        /// The RocksDB error.
        source: rocksdb::Error,
    },
    /// A stored value could not be decoded.
    #[error("state store: corrupt value in `{0}`")]
    Corrupt(String),
}

/// The last completed timestamp and the source positions at that point.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Last completed (and written) timestamp, in milliseconds.
    pub time: u64,
    /// Source name -> offset (bytes for files, lines for sockets).
    pub offsets: BTreeMap<String, u64>,
}

/// One change to apply: `+1` inserts, `-1` removes.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreOp {
    /// Identifier belongs to profile.
    Link {
        /// The identifier.
        id: String,
        /// Its profile.
        profile: String,
    },
    /// A trait value (as users see it).
    Trait {
        /// The profile.
        profile: String,
        /// Trait name.
        name: String,
        /// Value.
        value: f64,
    },
    /// Segment membership.
    Segment {
        /// The profile.
        profile: String,
        /// Segment name.
        name: String,
    },
    /// Merged CRM attributes.
    Attributes {
        /// The profile.
        profile: String,
        /// Attributes as a JSON object.
        json: String,
    },
}

/// Everything known about one profile.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileView {
    /// The profile id (its canonical identifier).
    pub profile: String,
    /// All identifiers of the profile.
    pub identifiers: Vec<String>,
    /// Merged CRM attributes.
    pub attributes: serde_json::Map<String, serde_json::Value>,
    /// Current trait values by name (traits at zero are absent).
    pub traits: BTreeMap<String, f64>,
    /// Segments the profile is in.
    pub segments: Vec<String>,
    /// The checkpoint the state is as of.
    pub as_of: Option<Checkpoint>,
}

/// The RocksDB state store.
pub struct Store {
    db: DB,
    dir: String,
}

/// The key of `(a, b)`: the length of `a` (4 bytes, big-endian), `a`, then
/// `b`. The length makes the key unambiguous whatever bytes `a` holds (a
/// separator byte could appear inside an identifier and let one profile's
/// prefix scan reach another's keys), and every key of `a` still shares
/// the prefix `key2(a, "")`.
fn key2(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + a.len() + b.len());
    k.extend_from_slice(&u32::try_from(a.len()).unwrap_or(u32::MAX).to_be_bytes());
    k.extend_from_slice(a.as_bytes());
    k.extend_from_slice(b.as_bytes());
    k
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = CFS
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
        let name = dir.display().to_string();
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| StoreError::Rocks {
            dir: name.clone(),
            source,
        })?;
        Ok(Store { db, dir: name })
    }

    /// Opens an empty store in `dir`, removing any state a previous run left
    /// there: a run's state is always exactly its own result. (Resuming from
    /// the checkpoint after a crash will open the existing state instead.)
    pub fn create_fresh(dir: &Path) -> Result<Store, StoreError> {
        if dir.join("CURRENT").exists() {
            tracing::warn!("replacing the state in {}", dir.display());
            DB::destroy(&Options::default(), dir).map_err(|source| StoreError::Rocks {
                dir: dir.display().to_string(),
                source,
            })?;
        }
        Store::open(dir)
    }

    /// Opens an existing store for reading (works while a run holds it).
    pub fn open_read_only(dir: &Path) -> Result<Store, StoreError> {
        let opts = Options::default();
        let name = dir.display().to_string();
        let db = DB::open_cf_for_read_only(&opts, dir, CFS, false).map_err(|source| {
            StoreError::Rocks {
                dir: name.clone(),
                source,
            }
        })?;
        Ok(Store { db, dir: name })
    }

    fn err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::Rocks {
            dir: self.dir.clone(),
            source,
        }
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// Applies one completed timestamp's changes and its checkpoint in one
    /// atomic write.
    pub fn commit(
        &self,
        ops: &[(StoreOp, isize)],
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        // Removals first, then insertions: a value that changed at this time
        // appears as (old, -1) and (new, +1) on the same key.
        for pass_insert in [false, true] {
            for (op, diff) in ops {
                if (*diff > 0) != pass_insert {
                    continue;
                }
                match op {
                    StoreOp::Link { id, profile } => {
                        if pass_insert {
                            batch.put_cf(self.cf("id_profile"), id, profile);
                            batch.put_cf(self.cf("profile_ids"), key2(profile, id), b"");
                        } else {
                            batch.delete_cf(self.cf("id_profile"), id);
                            batch.delete_cf(self.cf("profile_ids"), key2(profile, id));
                        }
                    }
                    StoreOp::Trait {
                        profile,
                        name,
                        value,
                    } => {
                        let key = key2(profile, name);
                        if pass_insert {
                            batch.put_cf(self.cf("traits"), key, value.to_string());
                        } else {
                            batch.delete_cf(self.cf("traits"), key);
                        }
                    }
                    StoreOp::Segment { profile, name } => {
                        let key = key2(profile, name);
                        if pass_insert {
                            batch.put_cf(self.cf("segments"), key, b"");
                        } else {
                            batch.delete_cf(self.cf("segments"), key);
                        }
                    }
                    StoreOp::Attributes { profile, json } => {
                        if pass_insert {
                            batch.put_cf(self.cf("attributes"), profile, json);
                        } else {
                            batch.delete_cf(self.cf("attributes"), profile);
                        }
                    }
                }
            }
        }
        let cp = serde_json::to_vec(checkpoint).expect("checkpoint serializes");
        batch.put_cf(self.cf("checkpoint"), b"checkpoint", cp);
        self.db.write(batch).map_err(|e| self.err(e))
    }

    /// The last checkpoint, if any run completed a timestamp.
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        match self
            .db
            .get_cf(self.cf("checkpoint"), b"checkpoint")
            .map_err(|e| self.err(e))?
        {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|_| StoreError::Corrupt("checkpoint".into())),
        }
    }

    /// The profile of an identifier (`kind:value`, normalized).
    pub fn profile_of(&self, id: &str) -> Result<Option<String>, StoreError> {
        let v = self
            .db
            .get_cf(self.cf("id_profile"), id)
            .map_err(|e| self.err(e))?;
        Ok(v.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    fn scan(&self, cf: &str, profile: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = key2(profile, "");
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            self.cf(cf),
            IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push((
                String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                v.to_vec(),
            ));
        }
        Ok(out)
    }

    /// Everything about the profile of the first of `ids` that is known.
    pub fn lookup(&self, ids: &[Ident]) -> Result<Option<ProfileView>, StoreError> {
        for id in ids {
            if let Some(profile) = self.profile_of(id.as_str())? {
                return self.view(&profile).map(Some);
            }
        }
        Ok(None)
    }

    /// Everything about one profile id.
    pub fn view(&self, profile: &str) -> Result<ProfileView, StoreError> {
        let identifiers = self
            .scan("profile_ids", profile)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut traits = BTreeMap::new();
        for (name, v) in self.scan("traits", profile)? {
            let value = String::from_utf8_lossy(&v)
                .parse()
                .map_err(|_| StoreError::Corrupt("traits".into()))?;
            traits.insert(name, value);
        }
        let segments = self
            .scan("segments", profile)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let attributes = match self
            .db
            .get_cf(self.cf("attributes"), profile)
            .map_err(|e| self.err(e))?
        {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|_| StoreError::Corrupt("attributes".into()))?,
            None => Default::default(),
        };
        Ok(ProfileView {
            profile: profile.to_string(),
            identifiers,
            attributes,
            traits,
            segments,
            as_of: self.checkpoint()?,
        })
    }
}

/// Attributes as the JSON object stored and shown to users.
pub fn attributes_json(attrs: &[(String, Scalar)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = attrs
        .iter()
        .map(|(k, v)| (k.clone(), v.to_json()))
        .collect();
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile id that is another's followed by a separator byte and more
    /// cannot see the other's traits or segments: keys are length-prefixed.
    #[test]
    fn one_profile_never_reads_anothers_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let trait_of = |profile: &str, value: f64| {
            (
                StoreOp::Trait {
                    profile: profile.into(),
                    name: "views".into(),
                    value,
                },
                1,
            )
        };
        let ops = vec![
            trait_of("user:victim\u{0}x", 7.0),
            trait_of("user:victim", 1.0),
            (
                StoreOp::Segment {
                    profile: "user:victim\u{0}x".into(),
                    name: "vip".into(),
                },
                1,
            ),
        ];
        store.commit(&ops, &Checkpoint::default()).unwrap();
        let victim = store.view("user:victim").unwrap();
        assert_eq!(victim.traits, BTreeMap::from([("views".to_string(), 1.0)]));
        assert!(victim.segments.is_empty(), "{:?}", victim.segments);
        let other = store.view("user:victim\u{0}x").unwrap();
        assert_eq!(other.traits, BTreeMap::from([("views".to_string(), 7.0)]));
        assert_eq!(other.segments, vec!["vip".to_string()]);
    }

    #[test]
    fn commit_then_lookup_by_any_identifier() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let p = "crm:C1".to_string();
        let ops = vec![
            (
                StoreOp::Link {
                    id: "crm:C1".into(),
                    profile: p.clone(),
                },
                1,
            ),
            (
                StoreOp::Link {
                    id: "email:a@b.c".into(),
                    profile: p.clone(),
                },
                1,
            ),
            (
                StoreOp::Trait {
                    profile: p.clone(),
                    name: "views".into(),
                    value: 3.0,
                },
                1,
            ),
            (
                StoreOp::Segment {
                    profile: p.clone(),
                    name: "vip".into(),
                },
                1,
            ),
            (
                StoreOp::Attributes {
                    profile: p.clone(),
                    json: r#"{"tier":"gold"}"#.into(),
                },
                1,
            ),
        ];
        store
            .commit(
                &ops,
                &Checkpoint {
                    time: 1000,
                    offsets: Default::default(),
                },
            )
            .unwrap();
        // The trait changes from 3 to 4 at the next time.
        let ops2 = vec![
            (
                StoreOp::Trait {
                    profile: p.clone(),
                    name: "views".into(),
                    value: 4.0,
                },
                1,
            ),
            (
                StoreOp::Trait {
                    profile: p.clone(),
                    name: "views".into(),
                    value: 3.0,
                },
                -1,
            ),
        ];
        store
            .commit(
                &ops2,
                &Checkpoint {
                    time: 2000,
                    offsets: Default::default(),
                },
            )
            .unwrap();
        let view = store
            .lookup(&[Ident {
                rank: 2,
                value: "email:a@b.c".into(),
            }])
            .unwrap()
            .unwrap();
        assert_eq!(view.profile, "crm:C1");
        assert_eq!(view.identifiers, vec!["crm:C1", "email:a@b.c"]);
        assert_eq!(view.traits.get("views"), Some(&4.0));
        assert_eq!(view.segments, vec!["vip"]);
        assert_eq!(view.attributes["tier"], "gold");
        assert_eq!(view.as_of.unwrap().time, 2000);
        assert!(store
            .lookup(&[Ident {
                rank: 0,
                value: "crm:nope".into()
            }])
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_fresh_store_forgets_the_previous_run() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::create_fresh(dir.path()).unwrap();
            let ops = vec![(
                StoreOp::Link {
                    id: "anon:a".into(),
                    profile: "anon:a".into(),
                },
                1,
            )];
            store.commit(&ops, &Checkpoint::default()).unwrap();
        }
        let store = Store::create_fresh(dir.path()).unwrap();
        assert_eq!(store.profile_of("anon:a").unwrap(), None);
        assert_eq!(store.checkpoint().unwrap(), None);
    }
}
