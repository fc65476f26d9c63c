//! A strict, borrowing JSON reader for one input line: the first tier of the
//! JSON decoder ([`crate::model::record`]).
//!
//! [`Line`] is a `serde::Deserializer` over the text of one line. Every
//! string and number it hands to a visitor borrows from the line, values a
//! visitor ignores are checked and skipped without being built, and nothing
//! is allocated. It accepts exactly RFC 8259 JSON, and it *gives up*
//! ([`GiveUp`], no message) instead of reporting: on any error, and on the
//! few things it leaves to serde_json, namely a string with an escape
//! (`\"`, `\u00e9`, ...) and nesting deeper than serde_json's limit of 128.
//! The decoder then reads the line again with serde_json, which decodes
//! escapes and words every error.
//!
//! Numbers are handed over the way serde_json's `arbitrary_precision`
//! feature does: as a map with the single key [`NUMBER_TOKEN`] whose value
//! is the number's literal text, so a visitor (and `serde_json::Value`)
//! sees the same thing from either reader.

use std::fmt;

use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

/// The key under which serde_json's `arbitrary_precision` hands a number to
/// `visit_map` (its `Value` visitor recognizes the same key).
pub(crate) const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// serde_json's nesting limit: it reads at most 127 nested arrays and
/// objects (its remaining depth starts at 128 and it fails when entering a
/// container takes it to 0). Deeper values are left to it: it rejects
/// them where it builds them, and skips them where it ignores them.
const MAX_DEPTH: u32 = 127;

/// Why [`Line`] stopped: the line is invalid JSON or uses something left to
/// serde_json. It carries no message: the caller reads the line again with
/// a decoder that explains.
#[derive(Debug)]
pub(crate) struct GiveUp;

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("left to serde_json")
    }
}

impl std::error::Error for GiveUp {}

impl de::Error for GiveUp {
    fn custom<T: fmt::Display>(_: T) -> Self {
        GiveUp
    }
}

/// The reader: the line and a byte position in it.
pub(crate) struct Line<'a> {
    text: &'a str,
    pos: usize,
    depth: u32,
}

impl<'a> Line<'a> {
    /// A reader at the start of `text`.
    pub(crate) fn new(text: &'a str) -> Self {
        Line {
            text,
            pos: 0,
            depth: 0,
        }
    }

    /// Checks that only whitespace follows the value read.
    pub(crate) fn end(mut self) -> Result<(), GiveUp> {
        self.ws();
        if self.pos == self.text.len() {
            Ok(())
        } else {
            Err(GiveUp)
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    #[inline]
    fn ws(&mut self) {
        let b = self.text.as_bytes();
        while let Some(&c) = b.get(self.pos) {
            if matches!(c, b' ' | b'\n' | b'\t' | b'\r') {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    /// Consumes `c` (after whitespace), else gives up.
    #[inline]
    fn expect(&mut self, c: u8) -> Result<(), GiveUp> {
        self.ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(GiveUp)
        }
    }

    /// The string at the position (its opening quote), without escapes.
    #[inline]
    fn string(&mut self) -> Result<&'a str, GiveUp> {
        let b = self.text.as_bytes();
        let start = self.pos + 1;
        let mut i = start;
        // Eight bytes at a time to the first quote, backslash or control
        // character ("SWAR": the lowest flagged byte of each test is exact,
        // as borrows only run upwards), then byte by byte from there.
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        while let Some(chunk) = b.get(i..i + 8) {
            let v = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
            let quote = v ^ (ONES * u64::from(b'"'));
            let backslash = v ^ (ONES * u64::from(b'\\'));
            let flagged = (quote.wrapping_sub(ONES) & !quote)
                | (backslash.wrapping_sub(ONES) & !backslash)
                | (v.wrapping_sub(ONES * 0x20) & !v);
            let flagged = flagged & HIGH;
            if flagged != 0 {
                i += (flagged.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        while let Some(&c) = b.get(i) {
            if c == b'"' {
                self.pos = i + 1;
                // Both ends are at ASCII quotes, so at char boundaries.
                return Ok(&self.text[start..i]);
            }
            if c == b'\\' || c < 0x20 {
                return Err(GiveUp);
            }
            i += 1;
        }
        Err(GiveUp)
    }

    /// The number literal at the position, by the RFC 8259 grammar
    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Result<&'a str, GiveUp> {
        let b = self.text.as_bytes();
        let start = self.pos;
        let mut i = start;
        let digits = |i: &mut usize| {
            let from = *i;
            while b.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i > from
        };
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => {
                digits(&mut i);
            }
            _ => return Err(GiveUp),
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            if !digits(&mut i) {
                return Err(GiveUp);
            }
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            if !digits(&mut i) {
                return Err(GiveUp);
            }
        }
        self.pos = i;
        Ok(&self.text[start..i])
    }

    /// Consumes the literal `word` (`true`, `false`, `null`).
    fn literal(&mut self, word: &str) -> Result<(), GiveUp> {
        if self.text.as_bytes()[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(GiveUp)
        }
    }

    /// Enters an object or array (the position is at its bracket).
    fn open(&mut self) -> Result<(), GiveUp> {
        if self.depth + 1 > MAX_DEPTH {
            return Err(GiveUp);
        }
        self.depth += 1;
        self.pos += 1;
        Ok(())
    }

    /// Checks and skips one value.
    fn skip(&mut self) -> Result<(), GiveUp> {
        self.ws();
        match self.peek().ok_or(GiveUp)? {
            b'"' => self.string().map(drop),
            b'{' => {
                self.open()?;
                let mut first = true;
                while self.entry_key(&mut first)?.is_some() {
                    self.skip()?;
                }
                Ok(())
            }
            b'[' => {
                self.open()?;
                let mut first = true;
                while self.element(&mut first)? {
                    self.skip()?;
                }
                Ok(())
            }
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            _ => self.number().map(drop),
        }
    }

    /// The next key of the object being read and its `:`, or `None` when the
    /// object ends (its `}` consumed).
    fn entry_key(&mut self, first: &mut bool) -> Result<Option<&'a str>, GiveUp> {
        self.ws();
        match self.peek() {
            Some(b'}') => {
                self.pos += 1;
                self.depth -= 1;
                return Ok(None);
            }
            Some(b',') if !*first => {
                self.pos += 1;
                self.ws();
            }
            _ if *first => {}
            _ => return Err(GiveUp),
        }
        *first = false;
        if self.peek() != Some(b'"') {
            return Err(GiveUp);
        }
        let key = self.string()?;
        self.expect(b':')?;
        Ok(Some(key))
    }

    /// Whether another element of the array being read follows (its `,`
    /// consumed), or the array ends (its `]` consumed).
    fn element(&mut self, first: &mut bool) -> Result<bool, GiveUp> {
        self.ws();
        match self.peek() {
            Some(b']') => {
                self.pos += 1;
                self.depth -= 1;
                return Ok(false);
            }
            Some(b',') if !*first => self.pos += 1,
            _ if *first => {}
            _ => return Err(GiveUp),
        }
        *first = false;
        Ok(true)
    }
}

impl<'de> de::Deserializer<'de> for &mut Line<'de> {
    type Error = GiveUp;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, GiveUp> {
        self.ws();
        match self.peek().ok_or(GiveUp)? {
            b'"' => {
                let s = self.string()?;
                visitor.visit_borrowed_str(s)
            }
            b'{' => {
                self.open()?;
                let mut object = Object {
                    line: self,
                    first: true,
                    closed: false,
                };
                let value = visitor.visit_map(&mut object)?;
                // A visitor that stops early leaves the rest unread: give
                // up rather than guess (serde_json would report it).
                if object.closed {
                    Ok(value)
                } else {
                    Err(GiveUp)
                }
            }
            b'[' => {
                self.open()?;
                let mut array = Array {
                    line: self,
                    first: true,
                    closed: false,
                };
                let value = visitor.visit_seq(&mut array)?;
                if array.closed {
                    Ok(value)
                } else {
                    Err(GiveUp)
                }
            }
            b't' => {
                self.literal("true")?;
                visitor.visit_bool(true)
            }
            b'f' => {
                self.literal("false")?;
                visitor.visit_bool(false)
            }
            b'n' => {
                self.literal("null")?;
                visitor.visit_unit()
            }
            _ => {
                let text = self.number()?;
                visitor.visit_map(Number { text: Some(text) })
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, GiveUp> {
        self.ws();
        if self.peek() == Some(b'n') {
            self.literal("null")?;
            visitor.visit_none()
        } else {
            visitor.visit_some(self)
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, GiveUp> {
        self.skip()?;
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier
    }
}

/// The entries of an object being read.
struct Object<'a, 'de> {
    line: &'a mut Line<'de>,
    first: bool,
    /// Whether its `}` has been read.
    closed: bool,
}

impl<'de> MapAccess<'de> for &mut Object<'_, 'de> {
    type Error = GiveUp;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, GiveUp> {
        if self.closed {
            return Ok(None);
        }
        match self.line.entry_key(&mut self.first)? {
            Some(key) => seed
                .deserialize(BorrowedStrDeserializer::new(key))
                .map(Some),
            None => {
                self.closed = true;
                Ok(None)
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, GiveUp> {
        seed.deserialize(&mut *self.line)
    }
}

/// The elements of an array being read.
struct Array<'a, 'de> {
    line: &'a mut Line<'de>,
    first: bool,
    /// Whether its `]` has been read.
    closed: bool,
}

impl<'de> SeqAccess<'de> for &mut Array<'_, 'de> {
    type Error = GiveUp;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, GiveUp> {
        if self.closed {
            return Ok(None);
        }
        if self.line.element(&mut self.first)? {
            seed.deserialize(&mut *self.line).map(Some)
        } else {
            self.closed = true;
            Ok(None)
        }
    }
}

/// A number, as serde_json's `arbitrary_precision` presents it: a map of
/// [`NUMBER_TOKEN`] to the literal text.
struct Number<'de> {
    text: Option<&'de str>,
}

impl<'de> MapAccess<'de> for Number<'de> {
    type Error = GiveUp;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, GiveUp> {
        if self.text.is_none() {
            return Ok(None);
        }
        seed.deserialize(BorrowedStrDeserializer::new(NUMBER_TOKEN))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, GiveUp> {
        let text = self.text.take().ok_or(GiveUp)?;
        seed.deserialize(BorrowedStrDeserializer::new(text))
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    /// `Some(value)` when [`Line`] reads `text` into a `serde_json::Value`.
    fn read(text: &str) -> Option<serde_json::Value> {
        let mut line = Line::new(text);
        let v = serde_json::Value::deserialize(&mut line).ok()?;
        line.end().ok()?;
        Some(v)
    }

    #[test]
    fn reads_what_serde_json_reads() {
        for text in [
            r#"{"a":1,"b":[true,false,null],"c":{"d":"e","f":-0.5e+3}," g ":[]}"#,
            r#" { } "#,
            "[1,2.50,-0,1E5,12345678901234567890123]",
            "\"é ✓\"",
            // Strings across the eight-byte steps, with every byte value
            // the steps test around (0x1f/0x20, quote, backslash).
            "{\"abcdefghijklmnopq\":\"0123456789abcdefé✓ !#[]{}~\u{7f}\",\"\":\"\"}",
            "0",
            r#"{"a":{"b":{"c":[[[{}]]]}}}"#,
        ] {
            let ours = read(text).unwrap_or_else(|| panic!("gave up on {text}"));
            let theirs: serde_json::Value = serde_json::from_str(text).unwrap();
            assert_eq!(ours, theirs, "{text}");
            // Numbers keep their literal text, as serde_json's do.
            assert_eq!(ours.to_string(), theirs.to_string(), "{text}");
        }
    }

    #[test]
    fn gives_up_on_invalid_json_and_on_escapes() {
        for text in [
            "",
            "{",
            "{\"a\":1,}",
            "{,\"a\":1}",
            "{\"a\" 1}",
            "{\"a\":1 \"b\":2}",
            "[1,]",
            "[,1]",
            "[1 2]",
            "01",
            "1.",
            ".5",
            "-",
            "1e",
            "+1",
            "tru",
            "nul",
            "\"a",
            "\"a\tb\"",
            "\"abcdefghijklmn\u{1f}\"",
            "\"abcdefghijklmn\\\"",
            "\"abcdefghijklmnop",
            "{\"a\":1} x",
            "{\"a\":1}}",
            "\"\\n\"",
            "\"\\u00e9\"",
            "{'a':1}",
            "NaN",
        ] {
            assert_eq!(read(text), None, "{text:?}");
        }
        // The depth serde_json reads and the first it rejects.
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        for (depth, reads) in [(100, true), (127, true), (128, false), (200, false)] {
            let text = nested(depth);
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&text).is_ok(),
                reads,
                "serde_json at {depth}"
            );
            assert_eq!(read(&text).is_some(), reads, "Line at {depth}");
        }
    }

    /// Random JSON-like text: valid values, then random edits of them.
    fn jsonish() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            "-?(0|[1-9][0-9]{0,25})(\\.[0-9]{1,5})?([eE][+-]?[0-9]{1,3})?",
            "\"[a-z é✓\\\\\"\u{1f}\u{7f}]{0,20}\"",
        ];
        let value = leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec(("[a-c]{1,2}", inner), 0..4).prop_map(|v| {
                    let entries: Vec<String> = v
                        .into_iter()
                        .map(|(k, x)| format!("\"{k}\" : {x}"))
                        .collect();
                    format!("{{ {} }}", entries.join(","))
                }),
            ]
        });
        // Edits: drop, duplicate or replace one byte with a JSON-ish one.
        (
            value,
            any::<usize>(),
            0..4u8,
            prop::sample::select(b" ,:{}[]\"0-.e\\nt".to_vec()),
        )
            .prop_map(|(v, at, op, c)| {
                let mut b = v.into_bytes();
                let i = at % (b.len() + 1);
                match op {
                    0 => {}
                    1 if i < b.len() => {
                        b.remove(i);
                    }
                    2 if i < b.len() => b.insert(i, b[i]),
                    _ => b.insert(i, c),
                }
                String::from_utf8(b).unwrap_or_default()
            })
    }

    proptest::proptest! {
        /// Whatever `Line` reads, serde_json reads to the same value and
        /// number texts; whatever serde_json reads without escapes, `Line`
        /// reads too.
        #[test]
        fn agrees_with_serde_json(text in jsonish()) {
            let theirs = serde_json::from_str::<serde_json::Value>(&text).ok();
            match read(&text) {
                Some(ours) => {
                    let theirs = theirs.expect("Line read what serde_json rejects");
                    proptest::prop_assert_eq!(ours.to_string(), theirs.to_string());
                }
                None => proptest::prop_assert!(
                    theirs.is_none() || text.contains('\\'),
                    "Line gave up on {}", text
                ),
            }
        }
    }

    #[test]
    fn skipped_values_are_checked() {
        /// Reads a top-level object, ignoring every value.
        fn skim(text: &str) -> bool {
            let mut line = Line::new(text);
            std::collections::BTreeMap::<&str, de::IgnoredAny>::deserialize(&mut line).is_ok()
                && line.end().is_ok()
        }
        assert!(skim(r#"{"a":[1,{"b":null}],"c":"d"}"#));
        assert!(!skim(r#"{"a":[1,{"b":nul}]}"#));
        assert!(!skim(r#"{"a":[1,}"#));
        assert!(!skim(r#"{"a":01}"#));
    }
}
