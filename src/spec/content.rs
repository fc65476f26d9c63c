//! `[content.SLOT]` tables: the personalized content blocks of a page.
//!
//! A slot (a hero banner, a recommendation strip, an e-mail header) lists
//! variants, each with a condition over the profile's segments, traits
//! and `attributes.FIELD` (the language of segment conditions), and a
//! default. A decision (`GET /v1/decide/SLOT?id=..`, see
//! [`crate::serve`]) picks the first variant whose condition holds for the
//! profile of the identifier, else the default:
//!
//! ```toml
//! [content.hero]
//! description = "The home page's hero banner"
//!
//! [[content.hero.variants]]
//! name = "vip_welcome"
//! when = 'vip and not lapsed_customer'
//! content = { headline = "Welcome back", link = "/vip" }
//!
//! [[content.hero.variants]]
//! name = "outdoor"
//! when = 'outdoor_affinity or outdoor_enthusiast'
//! content = { headline = "New tents are in", image = "/img/tents.jpg" }
//!
//! [content.hero.default]
//! name = "generic"
//! content = { headline = "Spring sale" }
//! ```
//!
//! `content` is any TOML value (a string, a table, an array); a decision
//! returns it as JSON, as written.

use serde::Deserialize;
use toml::Spanned;

use super::expr::Expr;
use super::{condition_reads, in_file_order, is_name, parse_in_file, Cx, Named, SpecError};
use super::{SegmentSpec, TraitSpec};

/// One `[content.SLOT]` table.
#[derive(Clone, Debug, PartialEq)]
pub struct ContentSlot {
    /// The table key, e.g. `hero`.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// The variants, in file order: the first whose condition holds wins.
    pub variants: Vec<ContentVariant>,
    /// What is chosen when no variant's condition holds.
    pub default: ContentDefault,
}

/// One of a slot's `[[content.SLOT.variants]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ContentVariant {
    /// Its name, unique in the slot.
    pub name: String,
    /// The condition (segments, traits, `attributes.FIELD`), evaluated on
    /// the profile's state at the time of the request.
    pub when: Expr,
    /// What the page shows, as JSON (`null` if not given).
    pub content: serde_json::Value,
}

/// A slot's `[content.SLOT.default]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ContentDefault {
    /// Its name (`"default"` if not given).
    pub name: String,
    /// What the page shows, as JSON (`null` if not given).
    pub content: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSlot {
    description: Option<String>,
    variants: Option<Vec<Spanned<RawVariant>>>,
    default: Option<Spanned<RawDefault>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    name: Option<Spanned<String>>,
    when: Option<Spanned<String>>,
    content: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefault {
    name: Option<Spanned<String>>,
    content: Option<toml::Value>,
}

fn json_of(v: Option<toml::Value>) -> serde_json::Value {
    v.and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Validates the `[content.*]` tables of a file whose traits and segments
/// are `traits` and `segments`: names, a default per slot, unique variant
/// names, conditions that name known traits, segments and attributes.
pub(super) fn slots(
    cx: &Cx<'_>,
    raw: Option<Named<RawSlot>>,
    traits: &[TraitSpec],
    segments: &[SegmentSpec],
) -> Result<Vec<ContentSlot>, SpecError> {
    let segment_names: Vec<String> = segments.iter().map(|s| s.name.clone()).collect();
    let mut out = Vec::new();
    for (key, table) in in_file_order(raw) {
        let name = key.get_ref().clone();
        let kstart = key.span().start;
        if !is_name(&name) {
            return Err(cx.err(
                kstart,
                format!("invalid content slot name `{name}`: names must match [a-z_][a-z0-9_]*"),
            ));
        }
        let tstart = table.span().start;
        let r = table.into_inner();
        let Some(default) = r.default else {
            return Err(cx.err(
                tstart,
                format!(
                    "content slot `{name}` needs a default: add [content.{name}.default] with `content = ...` (shown when no variant's condition holds)"
                ),
            ));
        };
        let default = default.into_inner();
        let default_name = match default.name {
            Some(n) => {
                if !is_name(n.get_ref()) {
                    return Err(cx.err(
                        n.span().start,
                        format!(
                            "invalid variant name `{}`: names must match [a-z_][a-z0-9_]*",
                            n.get_ref()
                        ),
                    ));
                }
                n.into_inner()
            }
            None => "default".to_string(),
        };
        let mut variants: Vec<ContentVariant> = Vec::new();
        for v in r.variants.unwrap_or_default() {
            let vstart = v.span().start;
            let v = v.into_inner();
            let Some(vname) = v.name else {
                return Err(cx.err(
                    vstart,
                    format!("a variant of content slot `{name}` needs `name = \"...\"`"),
                ));
            };
            if !is_name(vname.get_ref()) {
                return Err(cx.err(
                    vname.span().start,
                    format!(
                        "invalid variant name `{}`: names must match [a-z_][a-z0-9_]*",
                        vname.get_ref()
                    ),
                ));
            }
            if variants.iter().any(|x| x.name == *vname.get_ref())
                || default_name == *vname.get_ref()
            {
                return Err(cx.err(
                    vname.span().start,
                    format!(
                        "content slot `{name}` has two variants named `{}`",
                        vname.get_ref()
                    ),
                ));
            }
            let Some(w) = v.when else {
                return Err(cx.err(
                    vstart,
                    format!(
                        "variant `{}` of content slot `{name}` needs `when = \"<condition>\"` (the default needs none)",
                        vname.get_ref()
                    ),
                ));
            };
            let when = parse_in_file(cx, &w)?;
            condition_reads(cx, &w, &when, traits, &segment_names)?;
            variants.push(ContentVariant {
                name: vname.into_inner(),
                when,
                content: json_of(v.content),
            });
        }
        out.push(ContentSlot {
            name,
            description: r.description,
            variants,
            default: ContentDefault {
                name: default_name,
                content: json_of(default.content),
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::spec::parse_spec;

    const BASE: &str = r#"
[traits.views]
stream = "web"
aggregate = "count"

[segments.hot]
when = "views >= 3"
"#;

    #[test]
    fn slots_are_read_in_file_order_with_their_variants_and_default() {
        let text = format!(
            "{BASE}
[content.hero]
description = \"banner\"
[[content.hero.variants]]
name = \"hot\"
when = 'hot and attributes.tier == \"gold\"'
content = {{ headline = \"Hi\", n = 2 }}
[[content.hero.variants]]
name = \"warm\"
when = 'views >= 1'
content = \"plain text\"
[content.hero.default]
name = \"cold\"
content = {{ headline = \"Welcome\" }}

[content.aside]
[content.aside.default]
"
        );
        let spec = parse_spec(&text, "f.toml").unwrap();
        assert_eq!(spec.content.len(), 2);
        let hero = &spec.content[0];
        assert_eq!(hero.name, "hero");
        assert_eq!(hero.description.as_deref(), Some("banner"));
        let names: Vec<&str> = hero.variants.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["hot", "warm"]);
        assert_eq!(
            hero.variants[0].content,
            serde_json::json!({"headline": "Hi", "n": 2})
        );
        assert_eq!(hero.variants[1].content, serde_json::json!("plain text"));
        assert_eq!(hero.default.name, "cold");
        assert_eq!(spec.content[1].name, "aside");
        assert_eq!(spec.content[1].default.name, "default");
        assert!(spec.content[1].variants.is_empty());
    }

    #[test]
    fn bad_slots_are_refused_with_where_and_why() {
        let cases = [
            (
                "[content.hero]\n[[content.hero.variants]]\nname = \"a\"\nwhen = \"hott\"\n[content.hero.default]\n",
                "unknown trait or segment `hott` (did you mean `hot`?)",
            ),
            (
                "[content.hero]\n[[content.hero.variants]]\nname = \"a\"\nwhen = \"hot\"\n",
                "content slot `hero` needs a default",
            ),
            (
                "[content.hero]\n[[content.hero.variants]]\nname = \"a\"\n[content.hero.default]\n",
                "variant `a` of content slot `hero` needs `when",
            ),
            (
                "[content.hero]\n[[content.hero.variants]]\nname = \"a\"\nwhen = \"hot\"\n[[content.hero.variants]]\nname = \"a\"\nwhen = \"views > 1\"\n[content.hero.default]\n",
                "two variants named `a`",
            ),
            (
                "[content.Hero]\n[content.Hero.default]\n",
                "invalid content slot name `Hero`",
            ),
            (
                "[content.hero]\n[[content.hero.variants]]\nname = \"a\"\nwhen = \"hot and (\"\n[content.hero.default]\n",
                "invalid expression",
            ),
            (
                "[content.hero]\ncolour = 1\n[content.hero.default]\n",
                "unknown field `colour`",
            ),
        ];
        for (slot, expected) in cases {
            let text = format!("{BASE}{slot}");
            let err = parse_spec(&text, "f.toml").unwrap_err();
            assert!(
                err.message.contains(expected),
                "{slot}: expected {expected:?}, got {err}"
            );
            assert!(err.line >= 8, "{slot}: {err} should point into the slot");
        }
    }
}
