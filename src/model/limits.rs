//! Limits on input values that the engine must hold exactly.
//!
//! Sum traits add up a field's values as integer thousandths (so that
//! `0.1 + 0.2` is exactly `0.3`). A value with three decimals turns into
//! exactly its thousandths (`round(v × 1000)` of the `f64`) only while
//! `|v| ≤` [`MAX_SUM_VALUE`] = 999 999 999 999.999 (the same bound as a
//! transaction's `amount`, [`super::record::MAX_AMOUNT`]). A record carrying
//! a larger value in a field that some sum trait adds up is rejected to the
//! dead letters ([`check_summed_fields`]) rather than rounded into another
//! value; totals are 128-bit, so they cannot overflow (see
//! [`crate::dataflow::traits`]).

use super::record::{Record, RecordKind};
use super::scalar::Scalar;

/// The largest magnitude of a value a sum trait adds up:
/// 999 999 999 999.999.
pub const MAX_SUM_VALUE: f64 = super::record::MAX_AMOUNT;
/// [`MAX_SUM_VALUE`] as messages write it.
const MAX_SUM_TEXT: &str = "999999999999.999";

/// A field that some sum trait adds up: records of `kind`, at `path`
/// (e.g. `["amount"]`, `["item", "price"]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SummedField {
    /// The record kind the trait reads.
    pub kind: RecordKind,
    /// The field path.
    pub path: Vec<String>,
}

/// Checks that every summed field of `record` that holds a number is
/// within ±[`MAX_SUM_VALUE`]; the error names the field and the value,
/// e.g. `field \`amount\` = 1e+20 is outside the range a sum can hold
/// exactly (±9007199254740.991)`.
pub fn check_summed_fields(record: &Record, fields: &[SummedField]) -> Result<(), String> {
    for f in fields {
        let value = match (record, f.kind) {
            (Record::Web(e), RecordKind::Web) => e.field(&f.path),
            (Record::Txn(t), RecordKind::Transactions) => t.field(&f.path),
            _ => continue,
        };
        if let Scalar::Num(v) = value {
            if !v.is_finite() || v.abs() > MAX_SUM_VALUE {
                return Err(format!(
                    "field `{}` = {v:e} is outside the range a sum can hold exactly (±{MAX_SUM_TEXT})",
                    f.path.join(".")
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{decode_json, IdentityRules};

    #[test]
    fn summed_fields_beyond_exact_thousandths_are_rejected() {
        let rules = IdentityRules::new(vec!["user_id".into()], "US".into());
        let fields = vec![
            SummedField {
                kind: RecordKind::Transactions,
                path: vec!["amount".into()],
            },
            SummedField {
                kind: RecordKind::Web,
                path: vec!["item".into(), "price".into()],
            },
        ];
        let txn = |amount: &str| {
            decode_json(
                RecordKind::Transactions,
                &format!(r#"{{"order_id":"o","ts":1772366400,"user_id":"u","amount":{amount}}}"#),
                &rules,
            )
            .unwrap()
        };
        assert_eq!(
            check_summed_fields(&txn("999999999999.999"), &fields),
            Ok(())
        );
        assert_eq!(
            check_summed_fields(&txn("-999999999999.999"), &fields),
            Ok(())
        );
        let view = decode_json(
            RecordKind::Web,
            r#"{"event":"view_item","ts":1772366400,"user_id":"u","item":{"price":1000000000000}}"#,
            &rules,
        )
        .unwrap();
        assert!(check_summed_fields(&view, &fields)
            .unwrap_err()
            .starts_with("field `item.price` = 1e12 is outside the range a sum can hold exactly (±999999999999.999)"));
        // Not summed: any number is fine.
        assert_eq!(check_summed_fields(&view, &fields[..1]), Ok(()));
    }
}
