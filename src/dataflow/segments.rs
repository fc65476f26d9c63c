//! Segment membership.
//!
//! A segment is a boolean condition over a profile's traits (by name, a
//! missing trait is 0) and CRM attributes (`attributes.NAME`, missing is
//! null). For every profile the facts — that it exists, its trait values and
//! its merged attributes — are gathered by profile and every condition is
//! evaluated; the output is the set of `(segment, profile)` memberships, whose
//! changes over time are the entry (+1) and exit (-1) diffs.

use std::rc::Rc;

use serde::{Deserialize, Serialize};

use super::profiles::Attributes;
use super::traits::{Total, SUM_SCALE};
use super::Coll;
use crate::model::{Id, Scalar, ScalarRef};
use crate::spec::{Aggregate, SegmentSpec, TraitSpec};

/// One fact about a profile, the input of segment evaluation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Fact {
    /// The profile exists (it has at least one identifier).
    Exists,
    /// The current value of trait `index` (sums in thousandths).
    Trait(u32, Total),
    /// The merged CRM attributes.
    Attrs(Attributes),
}

/// A trait's total as the number users wrote conditions against (an
/// `f64`: totals beyond 2^53 compare with the precision of a double).
pub fn trait_scalar(spec: &TraitSpec, raw: Total) -> Scalar {
    match spec.aggregate {
        Aggregate::Count => Scalar::Num(raw as f64),
        Aggregate::Sum => Scalar::Num(raw as f64 / SUM_SCALE),
    }
}

/// Evaluates every segment for one profile's facts; returns the indices of
/// the segments it belongs to.
pub fn memberships(facts: &[&Fact], traits: &[TraitSpec], segments: &[SegmentSpec]) -> Vec<u32> {
    let mut values: Vec<Total> = vec![0; traits.len()];
    let mut attrs: Option<&Attributes> = None;
    for fact in facts {
        match fact {
            Fact::Exists => {}
            Fact::Trait(index, value) => values[*index as usize] = *value,
            Fact::Attrs(a) => attrs = Some(a),
        }
    }
    let mut lookup = |path: &[String]| -> ScalarRef<'_> {
        match path {
            // Trait values are numbers.
            [name] => traits
                .iter()
                .position(|t| &t.name == name)
                .and_then(|i| trait_scalar(&traits[i], values[i]).as_f64())
                .map_or(ScalarRef::Null, ScalarRef::Num),
            [first, field] if first == "attributes" => attrs
                .and_then(|a| {
                    a.iter()
                        .find(|(k, _)| k == field)
                        .map(|(_, v)| v.borrowed())
                })
                .unwrap_or(ScalarRef::Null),
            _ => ScalarRef::Null,
        }
    };
    segments
        .iter()
        .enumerate()
        .filter(|(_, s)| s.when.eval_bool(&mut lookup))
        .map(|(i, _)| i as u32)
        .collect()
}

/// Segment memberships `(segment index, profile)`.
pub fn evaluate<'s>(
    profiles: Coll<'s, Id>,
    traits: Coll<'s, ((Id, u32), Total)>,
    attributes: Coll<'s, (Id, Attributes)>,
    trait_specs: Rc<[TraitSpec]>,
    segment_specs: Rc<[SegmentSpec]>,
) -> Coll<'s, (u32, Id)> {
    let facts = profiles
        .map(|p| (p, Fact::Exists))
        .concat(traits.map(|((p, t), v)| (p, Fact::Trait(t, v))))
        .concat(attributes.map(|(p, a)| (p, Fact::Attrs(a))));
    facts
        .reduce_named("Evaluate: segments", move |_profile, input, output| {
            let present: Vec<&Fact> = input
                .iter()
                .filter(|(_, c)| *c > 0)
                .map(|(f, _)| *f)
                .collect();
            for segment in memberships(&present, &trait_specs, &segment_specs) {
                output.push((segment, 1isize));
            }
        })
        .map(|(profile, segment)| (segment, profile))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::parse_spec;

    #[test]
    fn conditions_see_traits_defaulting_to_zero_and_attributes() {
        let spec = parse_spec(
            r#"
            [traits.views]
            stream = "web"
            [traits.spend]
            stream = "transactions"
            aggregate = "sum"
            of = "amount"
            [segments.active]
            when = "views >= 2"
            [segments.idle]
            when = "views == 0 and not attributes.tier == \"gold\""
            [segments.big]
            when = "spend >= 500"
            [segments.gold]
            when = 'attributes.tier == "gold"'
            "#,
            "s.toml",
        )
        .unwrap();
        let eval = |facts: &[Fact]| {
            memberships(
                &facts.iter().collect::<Vec<_>>(),
                &spec.traits,
                &spec.segments,
            )
        };
        assert_eq!(eval(&[Fact::Exists]), vec![1]);
        assert_eq!(
            eval(&[Fact::Exists, Fact::Trait(0, 2), Fact::Trait(1, 500_000)]),
            vec![0, 2]
        );
        assert_eq!(eval(&[Fact::Exists, Fact::Trait(1, 499_999)]), vec![1]);
        let gold = Fact::Attrs(vec![("tier".into(), Scalar::Str("gold".into()))]);
        assert_eq!(eval(&[Fact::Exists, gold]), vec![3]);
    }
}
