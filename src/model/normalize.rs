//! Identifier normalization.
//!
//! The same person shows up as `"  Bob@Example.COM "` in one source and
//! `"bob@example.com"` in another, or as `"(415) 555-2671"` and
//! `"+1 415 555 2671"`. Identity resolution only works if both spellings map
//! to one canonical string, so every identifier goes through one of these
//! functions before it becomes an [`Ident`](super::Ident). Each returns
//! `None` when the input cannot be an identifier of that kind; callers drop
//! such values rather than inventing an identity.

use std::collections::HashMap;
use std::str::FromStr;

use phonenumber::{country, Mode};

/// Normalizes an e-mail address: trims surrounding whitespace and lower-cases
/// it. Returns `None` when the result is empty or has no `@` with a non-empty
/// local part before it and a non-empty domain after it.
pub fn normalize_email(s: &str) -> Option<String> {
    let e = s.trim().to_lowercase();
    let (local, domain) = e.rsplit_once('@')?;
    if local.is_empty() || domain.is_empty() {
        return None;
    }
    Some(e)
}

/// Normalizes an opaque id (CRM id, user id, anonymous id, ...): trims
/// surrounding whitespace, keeps case. Returns `None` when nothing is left.
pub fn normalize_id(s: &str) -> Option<String> {
    let t = s.trim();
    if t.is_empty() {
        None
    } else {
        Some(t.to_string())
    }
}

/// Loads the numbering-plan metadata that phone parsing uses (about 0.15 s
/// of one core: it compiles the patterns of every region) on a thread of
/// its own, so that it overlaps a run's start (opening the state, the
/// inputs) rather than stalling the first worker that reads a phone
/// number. That worker waits for it if it is not done yet. Once per
/// process.
pub fn load_phone_metadata_in_background() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("segflow-phone-metadata".into())
            .spawn(|| {
                let _ = phonenumber::parse(None, "+14155552671");
            });
        // Without the thread, the first phone number loads it instead.
        drop(spawned);
    });
}

/// Normalizes a phone number to E.164 (`+14155552671`).
///
/// Numbers written without an international prefix are interpreted in
/// `default_region`, an ISO 3166-1 alpha-2 code such as `"US"` or `"DE"`
/// (case-insensitive; an unknown code means "no default region", so only
/// numbers with `+` or an international prefix parse). Accepts the usual
/// punctuation: `"+44 20 7946 0958"`, `"(415) 555-2671"`, `"415.555.2671"`,
/// `"00 49 30 1234567"` (with a region whose international prefix is `00`),
/// `"+49 (0)30 1234567"` (the bracketed trunk prefix is dropped).
/// Returns `None` when the text does not parse or is not a valid number for
/// its region.
pub fn normalize_phone(s: &str, default_region: &str) -> Option<String> {
    // Parsing with the full numbering-plan metadata costs tens of
    // microseconds; the same numbers recur (in the same spellings), so each
    // thread remembers its recent answers.
    // Keyed by region, then by text, so that a hit allocates no key.
    #[derive(Default)]
    struct Cache {
        len: usize,
        by_region: HashMap<String, HashMap<String, Option<String>>>,
    }
    thread_local! {
        static CACHE: std::cell::RefCell<Cache> = Default::default();
    }
    const CACHE_LIMIT: usize = 100_000;
    let hit = CACHE.with(|c| {
        c.borrow()
            .by_region
            .get(default_region)
            .and_then(|m| m.get(s))
            .cloned()
    });
    if let Some(hit) = hit {
        return hit;
    }
    let answer = parse_phone(s, default_region);
    CACHE.with(|c| {
        let c = &mut *c.borrow_mut();
        if c.len >= CACHE_LIMIT {
            c.by_region.clear();
            c.len = 0;
        }
        if !c.by_region.contains_key(default_region) {
            c.by_region
                .insert(default_region.to_string(), HashMap::new());
        }
        let texts = c.by_region.get_mut(default_region).expect("just inserted");
        if texts.insert(s.to_string(), answer.clone()).is_none() {
            c.len += 1;
        }
    });
    answer
}

fn parse_phone(s: &str, default_region: &str) -> Option<String> {
    let t = s.trim();
    if t.is_empty() || !t.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    // "+49 (0)30 ..." : the "(0)" is the national trunk prefix, which must be
    // dropped when the number is written with its country code.
    let cleaned;
    let t = if t.starts_with('+') && t.contains("(0)") {
        cleaned = t.replacen("(0)", "", 1);
        cleaned.as_str()
    } else {
        t
    };
    let region = country::Id::from_str(&default_region.trim().to_ascii_uppercase()).ok();
    let number = phonenumber::parse(region, t).ok()?;
    if !phonenumber::is_valid(&number) {
        return None;
    }
    Some(number.format().mode(Mode::E164).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            normalize_email("  Bob@Example.COM ").as_deref(),
            Some("bob@example.com")
        );
        assert_eq!(normalize_email("a@b").as_deref(), Some("a@b"));
        assert_eq!(
            normalize_email("\"x@y\"@z.org").as_deref(),
            Some("\"x@y\"@z.org")
        );
        assert_eq!(normalize_email(""), None);
        assert_eq!(normalize_email("   "), None);
        assert_eq!(normalize_email("bob.example.com"), None);
        assert_eq!(normalize_email("@example.com"), None);
        assert_eq!(normalize_email("bob@"), None);
    }

    #[test]
    fn ids() {
        assert_eq!(normalize_id("  C-001 ").as_deref(), Some("C-001"));
        assert_eq!(normalize_id("AbC").as_deref(), Some("AbC"));
        assert_eq!(normalize_id(""), None);
        assert_eq!(normalize_id(" \t "), None);
    }

    #[test]
    fn phones_us_formats() {
        for raw in [
            "(415) 555-2671",
            "415.555.2671",
            "415-555-2671",
            "4155552671",
            "+1 415 555 2671",
            "+1-415-555-2671",
            "1 (415) 555-2671",
            "  +14155552671  ",
            "tel:+1-415-555-2671",
        ] {
            assert_eq!(
                normalize_phone(raw, "US").as_deref(),
                Some("+14155552671"),
                "{raw}"
            );
        }
        // region code is case-insensitive
        assert_eq!(
            normalize_phone("(415) 555-2671", "us").as_deref(),
            Some("+14155552671")
        );
    }

    #[test]
    fn phones_international() {
        assert_eq!(
            normalize_phone("+44 20 7946 0958", "US").as_deref(),
            Some("+442079460958")
        );
        assert_eq!(
            normalize_phone("020 7946 0958", "GB").as_deref(),
            Some("+442079460958")
        );
        assert_eq!(
            normalize_phone("00 49 30 1234567", "DE").as_deref(),
            Some("+49301234567")
        );
        assert_eq!(
            normalize_phone("030 1234567", "DE").as_deref(),
            Some("+49301234567")
        );
        assert_eq!(
            normalize_phone("+49 (0)30 1234567", "US").as_deref(),
            Some("+49301234567")
        );
        assert_eq!(
            normalize_phone("011 44 20 7946 0958", "US").as_deref(),
            Some("+442079460958")
        );
        // An explicit + number parses even without a usable default region.
        assert_eq!(
            normalize_phone("+44 20 7946 0958", "").as_deref(),
            Some("+442079460958")
        );
        assert_eq!(
            normalize_phone("+44 20 7946 0958", "ZZ").as_deref(),
            Some("+442079460958")
        );
    }

    #[test]
    fn phones_rejected() {
        assert_eq!(normalize_phone("", "US"), None);
        assert_eq!(normalize_phone("not a phone", "US"), None);
        assert_eq!(normalize_phone("12", "US"), None);
        assert_eq!(normalize_phone("555-0000000000000000", "US"), None);
        assert_eq!(normalize_phone("(415) 555-2671", ""), None); // no region, no +
        assert_eq!(normalize_phone("+1 000 000 0000", "US"), None); // parses, invalid
        assert_eq!(normalize_phone("bob@example.com", "US"), None);
    }

    #[test]
    fn phones_garbage_does_not_panic() {
        for raw in [
            "+",
            "+0",
            "++1",
            "(((",
            ")",
            "+1 ",
            "+999999999999999999999",
            "00",
            "0000000",
            "\u{663}\u{664}\u{665}",
            "1-800-FLOWERS",
            "+1 415 555 2671 ext. 12",
            "tel:",
            ";;;",
            "+49 (0)",
            "(0)30 1234567",
            "9".repeat(200).as_str(),
            "+٤٤ ٢٠ ٧٩٤٦ ٠٩٥٨",
        ] {
            for region in ["US", "DE", "GB", "", "zz"] {
                let _ = normalize_phone(raw, region);
            }
        }
    }
}
