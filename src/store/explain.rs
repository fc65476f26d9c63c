//! `segflow query --explain`: why a profile is, or is not, in a segment.
//!
//! The segment's condition is evaluated again on the profile's values as
//! the state holds them (its traits, attributes and segments, as of the
//! state's checkpoint), and every comparison is shown with the values it
//! read; every trait it reads is shown with the events and the window
//! behind it.

use std::fmt::Write as _;

use crate::model::{Scalar, ScalarRef};
use crate::spec::expr::Expr;
use crate::spec::{Aggregate, Spec, StreamKind, TraitSpec, Window};

use super::ProfileView;

/// A duration in ms as text: `3d 4h`, `12m 5s`, `250ms`.
fn duration(ms: f64) -> String {
    if !ms.is_finite() || ms < 0.0 {
        return format!("{ms} ms");
    }
    let ms = ms as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let units = [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ];
    let mut rest = ms;
    let mut parts = Vec::new();
    for (u, n) in units {
        if rest >= n {
            parts.push(format!("{}{u}", rest / n));
            rest %= n;
        }
    }
    parts.truncate(2);
    parts.join(" ")
}

/// An event time (epoch ms) in UTC.
fn utc(ms: f64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| format!("{ms}"))
}

/// The window of a trait, in words.
fn window_text(t: &TraitSpec, spec: &Spec) -> String {
    match t.window {
        Window::Lifetime => "over the whole history".into(),
        Window::Sliding(w) => format!(
            "sliding window of {}: events in (T-{0}, T]",
            duration(w as f64)
        ),
        Window::Tumbling(w) => format!(
            "tumbling window of {} in {}: events since the window's start",
            duration(w as f64),
            spec.engine.time_zone
        ),
        Window::Session { gap, max } => format!(
            "the current session (gaps under {}, the last less than {} before T; at most {} back)",
            duration(gap as f64),
            duration(gap as f64),
            duration(max as f64)
        ),
    }
}

/// A trait's definition, in words.
pub fn describe_trait(t: &TraitSpec, spec: &Spec) -> String {
    let stream = match t.stream {
        StreamKind::Web => "web events",
        StreamKind::Transactions => "transactions",
        StreamKind::Crm => "crm records",
    };
    let of = t.of.as_ref().map(|p| p.join(".")).unwrap_or_default();
    let what = match t.aggregate {
        Aggregate::Count => format!("count of {stream}"),
        Aggregate::Share => format!(
            "share of {stream}{} where {}",
            if of.is_empty() {
                String::new()
            } else {
                format!(" (weighted by {of})")
            },
            t.part.as_ref().map(|p| p.to_string()).unwrap_or_default()
        ),
        Aggregate::SinceFirst => format!("time since the first of the {stream}"),
        Aggregate::SinceLast => format!("time since the latest of the {stream}"),
        a => format!("{} of {of} over {stream}", a.name()),
    };
    let mut text = what;
    if let Some(f) = &t.filter {
        let _ = write!(text, " with {f}");
    }
    if let Some(seq) = &t.sequence {
        let steps: Vec<String> = seq
            .steps
            .iter()
            .map(|(s, f)| match f {
                Some(f) => format!("{} with {f}", s.as_str()),
                None => s.as_str().to_string(),
            })
            .collect();
        let _ = write!(
            text,
            ", {} by {} within {}",
            if seq.followed {
                "followed"
            } else {
                "not followed"
            },
            steps.join(" or "),
            duration(seq.within_ms as f64)
        );
    }
    if let Some(seq) = t.sequence.as_ref().filter(|s| !s.followed) {
        if let Window::Sliding(w) = t.window {
            // Counted from `within` after the event until `window` after it.
            let _ = write!(
                text,
                "; events in (T-{}, T-{}]",
                duration(w as f64),
                duration(seq.within_ms as f64)
            );
            return text;
        }
    }
    let _ = write!(text, "; {}", window_text(t, spec));
    text
}

/// The values conditions see, from the state.
struct Values<'a> {
    spec: &'a Spec,
    view: &'a ProfileView,
    /// The evaluation time: the state's completed time.
    now: Option<u64>,
}

impl Values<'_> {
    fn trait_value(&self, t: &TraitSpec) -> Scalar {
        let stored = self
            .view
            .traits
            .get(&t.name)
            .and_then(|v| Scalar::from_json(v).ok());
        match (t.aggregate, stored) {
            (Aggregate::SinceFirst | Aggregate::SinceLast, Some(Scalar::Num(at))) => match self.now
            {
                Some(now) => Scalar::Num((now as f64 - at).max(0.0)),
                None => Scalar::Null,
            },
            (_, Some(v)) => v,
            (Aggregate::Count | Aggregate::Sum | Aggregate::Distinct, None) => Scalar::Num(0.0),
            (_, None) if t.sequence.is_some() || matches!(t.window, Window::Session { .. }) => {
                match t.aggregate {
                    Aggregate::Count => Scalar::Num(0.0),
                    _ => Scalar::Null,
                }
            }
            (_, None) => Scalar::Null,
        }
    }

    fn lookup(&self, path: &[String]) -> Scalar {
        match path {
            [name] => {
                if let Some(t) = self.spec.traits.iter().find(|t| &t.name == name) {
                    return self.trait_value(t);
                }
                if self.spec.segments.iter().any(|s| &s.name == name) {
                    return Scalar::Bool(self.view.segments.iter().any(|s| s == name));
                }
                Scalar::Null
            }
            [first, field] if first == "attributes" => self
                .view
                .attributes
                .get(field)
                .and_then(|v| Scalar::from_json(v).ok())
                .unwrap_or(Scalar::Null),
            // A most frequent value's count, kept as `NAME.count`.
            [name, count] if count == "count" => self
                .view
                .traits
                .get(&format!("{name}.count"))
                .and_then(|v| Scalar::from_json(v).ok())
                .unwrap_or(Scalar::Null),
            _ => Scalar::Null,
        }
    }

    fn eval(&self, e: &Expr) -> Scalar {
        let values: Vec<(Vec<String>, Scalar)> = e
            .paths()
            .into_iter()
            .map(|(p, _)| (p.to_vec(), self.lookup(p)))
            .collect();
        e.eval(&mut |p| {
            values
                .iter()
                .find(|(q, _)| q.as_slice() == p)
                .map_or(ScalarRef::Null, |(_, v)| v.borrowed())
        })
        .to_scalar()
    }

    /// A value with what it means: durations of recencies, times.
    fn shown(&self, path: &[String]) -> String {
        let v = self.lookup(path);
        let t = self.spec.traits.iter().find(|t| t.name == path[0]);
        match (t.map(|t| t.aggregate), &v) {
            (Some(Aggregate::SinceFirst | Aggregate::SinceLast), Scalar::Num(ms)) => {
                let at = self
                    .view
                    .traits
                    .get(&path[0])
                    .and_then(|v| v.as_f64())
                    .unwrap_or(0.0);
                format!("{} ({ms} ms; the event at {})", duration(*ms), utc(at))
            }
            _ => v.to_string(),
        }
    }
}

/// The value of condition `e` for the profile of `view` as the state
/// holds it (recencies measured at the state's time, `now`: `None` takes
/// the checkpoint's), and each path it read with its value, in the
/// condition's order, each once. Missing traits read as conditions do
/// (counts and sums 0, others null); segments are true or false.
pub fn evaluate(
    spec: &Spec,
    view: &ProfileView,
    e: &Expr,
    now: Option<u64>,
) -> (bool, Vec<(String, serde_json::Value)>) {
    let now = now.or_else(|| view.as_of.as_ref().map(|c| c.time));
    let values = Values { spec, view, now };
    let mut read: Vec<(String, serde_json::Value)> = Vec::new();
    for (p, _) in e.paths() {
        let name = p.join(".");
        if !read.iter().any(|(n, _)| *n == name) {
            read.push((name, values.lookup(p).to_json()));
        }
    }
    (values.eval(e).truthy(), read)
}

/// Writes `e`, its value and, for a comparison, the values it read, at
/// `depth`; `and`, `or` and `not` show each operand beneath.
fn explain_expr(out: &mut String, values: &Values<'_>, e: &Expr, depth: usize) {
    let pad = "  ".repeat(depth);
    let truth = if values.eval(e).truthy() {
        "true "
    } else {
        "false"
    };
    match e {
        Expr::And(es) | Expr::Or(es) => {
            let word = if matches!(e, Expr::And(_)) {
                "all of"
            } else {
                "any of"
            };
            let _ = writeln!(out, "{pad}{truth}  {word}:");
            for x in es {
                explain_expr(out, values, x, depth + 1);
            }
        }
        Expr::Not(x) => {
            let _ = writeln!(out, "{pad}{truth}  not:");
            explain_expr(out, values, x, depth + 1);
        }
        _ => {
            let mut seen: Vec<&[String]> = Vec::new();
            let reads: Vec<String> = e
                .paths()
                .into_iter()
                .filter(|(p, _)| {
                    let new = !seen.contains(p);
                    seen.push(p);
                    new
                })
                .map(|(p, _)| format!("{} = {}", p.join("."), values.shown(p)))
                .collect();
            let _ = write!(out, "{pad}{truth}  {e}");
            if !reads.is_empty() {
                let _ = write!(out, "    [{}]", reads.join(", "));
            }
            out.push('\n');
        }
    }
}

/// Why the profile of `view` is, or is not, in `segment` of `spec`, as
/// text; an unknown segment is an error that names the known ones.
pub fn explain(spec: &Spec, view: &ProfileView, segment: &str) -> Result<String, String> {
    let Some(seg) = spec.segments.iter().find(|s| s.name == segment) else {
        let names: Vec<&str> = spec.segments.iter().map(|s| s.name.as_str()).collect();
        return Err(format!(
            "no segment `{segment}` in {}{}; its segments are: {}",
            spec.file,
            crate::spec::nearest(segment, names.iter().copied())
                .map(|n| format!(" (did you mean `{n}`?)"))
                .unwrap_or_default(),
            names.join(", ")
        ));
    };
    let now = view.as_of.as_ref().map(|c| c.time);
    let values = Values { spec, view, now };
    let member = view.segments.iter().any(|s| s == segment);
    let holds = values.eval(&seg.when).truthy();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "segment {segment}: profile {} is {}a member (state as of {})",
        view.profile,
        if member { "" } else { "not " },
        now.map(|t| utc(t as f64))
            .unwrap_or_else(|| "no completed time".into())
    );
    if let Some(d) = &seg.description {
        let _ = writeln!(out, "  {d}");
    }
    let _ = writeln!(out, "when {}", seg.when);
    explain_expr(&mut out, &values, &seg.when, 1);
    if member && !holds {
        match seg.min_dwell_ms {
            Some(d) => {
                let _ = writeln!(
                    out,
                    "the condition is false, but a member stays at least min_dwell = {} after it enters",
                    duration(d as f64)
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "the condition, evaluated on the stored values, is false: was the state written with another definition?"
                );
            }
        }
    }
    let mut traits: Vec<&TraitSpec> = Vec::new();
    for (p, _) in seg.when.paths() {
        if let Some(t) = spec.traits.iter().find(|t| t.name == p[0]) {
            if !traits.iter().any(|x| x.name == t.name) {
                traits.push(t);
            }
        }
    }
    if !traits.is_empty() {
        let _ = writeln!(out, "traits:");
        for t in traits {
            let _ = writeln!(
                out,
                "  {} = {}: {}",
                t.name,
                values.shown(std::slice::from_ref(&t.name)),
                describe_trait(t, spec)
            );
        }
    }
    let others: Vec<&str> = seg
        .when
        .paths()
        .into_iter()
        .filter(|(p, _)| spec.segments.iter().any(|s| s.name == p[0]))
        .map(|(p, _)| p[0].as_str())
        .collect();
    if !others.is_empty() {
        let _ = writeln!(
            out,
            "segments it reads: {} (explain each with --explain NAME)",
            others.join(", ")
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_spec;

    #[test]
    fn every_comparison_with_its_values() {
        let spec = parse_spec(
            r#"
            [traits.since_last_order]
            stream = "transactions"
            aggregate = "since_last"
            [traits.orders_365d]
            stream = "transactions"
            window = "365d"
            [segments.vip]
            when = 'attributes.tier == "gold"'
            [segments.champion]
            when = "since_last_order < 14d and (orders_365d >= 4 or vip)"
            "#,
            "flow.toml",
        )
        .unwrap();
        let day = 86_400_000u64;
        let view = ProfileView {
            profile: "crm:C1".into(),
            identifiers: vec!["crm:C1".into()],
            attributes: serde_json::from_str(r#"{"tier":"gold"}"#).unwrap(),
            traits: [
                (
                    "since_last_order".to_string(),
                    serde_json::json!((100 * day) as f64),
                ),
                ("orders_365d".to_string(), serde_json::json!(2.0)),
            ]
            .into_iter()
            .collect(),
            segments: vec!["vip".into(), "champion".into()],
            as_of: Some(super::super::Checkpoint {
                time: 103 * day,
                ..Default::default()
            }),
        };
        let text = explain(&spec, &view, "champion").unwrap();
        assert!(text.contains("profile crm:C1 is a member"), "{text}");
        assert!(
            text.contains("true   since_last_order < 1209600000    [since_last_order = 3d ("),
            "{text}"
        );
        assert!(
            text.contains("false  orders_365d >= 4    [orders_365d = 2]"),
            "{text}"
        );
        assert!(text.contains("true   vip    [vip = true]"), "{text}");
        assert!(
            text.contains("orders_365d = 2: count of transactions; sliding window of 365d"),
            "{text}"
        );
        let err = explain(&spec, &view, "champ").unwrap_err();
        assert!(
            err.contains("did you mean `vip`") || err.contains("champion"),
            "{err}"
        );
    }

    /// `NAME.count` of a most frequent value reads the count the state
    /// keeps; an attribute named `count` is still an attribute.
    #[test]
    fn a_most_frequent_values_count_is_read_from_the_state() {
        let spec = parse_spec(
            r#"
            [traits.fav]
            stream = "web"
            aggregate = "most_frequent"
            of = "item.category"
            [segments.fan]
            when = 'fav == "shoes" and fav.count >= 3 and attributes.count == 1'
            "#,
            "flow.toml",
        )
        .unwrap();
        let view = ProfileView {
            profile: "anon:a".into(),
            identifiers: vec!["anon:a".into()],
            attributes: serde_json::from_str(r#"{"count":1}"#).unwrap(),
            traits: [
                ("fav".to_string(), serde_json::json!("shoes")),
                ("fav.count".to_string(), serde_json::json!(4.0)),
            ]
            .into_iter()
            .collect(),
            segments: vec!["fan".into()],
            as_of: None,
        };
        let text = explain(&spec, &view, "fan").unwrap();
        assert!(
            text.contains("true   fav.count >= 3    [fav.count = 4]"),
            "{text}"
        );
        assert!(
            text.contains("true   attributes.count == 1    [attributes.count = 1]"),
            "{text}"
        );
        assert!(!text.contains("another definition"), "{text}");
    }
}
