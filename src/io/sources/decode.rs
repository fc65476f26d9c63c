//! Parallel decoding of JSON lines.
//!
//! The owner of a source must see every record's event time in input order,
//! to decide lateness deterministically, but it need not decode every record
//! in full. For JSON lines it only *peeks* at the time field (`ts`, or
//! `updated_at` for CRM records) — a scan that skips every other value
//! without allocating — and hands the line, with its tick, to a worker chosen
//! by line number. That worker decodes and normalizes the record in full; a
//! record that turns out to be invalid goes to the dead letters from there.
//! Lines whose time cannot be peeked are decoded by the owner as before, so
//! their dead-letter reasons are exactly those of the full decoder.
//!
//! A line with a valid time but an otherwise invalid record still advances
//! its source's watermark: the watermark follows the event times seen.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::Stream;

use super::{ReadParams, SourceDef};
use crate::io::{Control, DeadLetter};
use crate::model::limits::check_summed_fields;
use crate::model::{decode_json_projected, Record, RecordKind};
use crate::time::{parse::parse_time_as, Time, TimeUnit};

/// A line whose time the owner has checked, on its way to be decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawLine {
    /// 1-based line number.
    pub line: u64,
    /// Byte offset of the line.
    pub offset: u64,
    /// The tick the record will carry.
    pub tick: Time,
    /// The reading clock's watermark when the line was read: the time its
    /// dead letter, if any, is written at (see [`Control::Dead`]).
    pub read_at: Time,
    /// The TCP peer that sent it, for socket sources.
    pub peer: Option<String>,
    /// The line.
    pub text: String,
}

#[derive(Deserialize)]
struct EventTime {
    #[serde(default)]
    ts: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct CrmTime {
    #[serde(default)]
    updated_at: Option<serde_json::Value>,
}

/// The event time of a JSON line (epoch milliseconds, numbers in `unit`),
/// read without decoding the rest of the record; `None` if the line is not
/// a JSON object or its time field is missing or invalid.
pub fn peek_time(kind: RecordKind, line: &str, unit: TimeUnit) -> Option<i64> {
    let value = match kind {
        RecordKind::Crm => serde_json::from_str::<CrmTime>(line).ok()?.updated_at?,
        RecordKind::Web | RecordKind::Transactions => {
            serde_json::from_str::<EventTime>(line).ok()?.ts?
        }
    };
    parse_time_as(&value, unit).ok()
}

/// The decoded records and control messages of a decode stage.
pub type Decoded<'s> = (
    Stream<'s, Time, Vec<(Record, Time, isize)>>,
    Stream<'s, Time, Vec<Control>>,
);

/// Decodes raw lines on every worker (each takes the lines whose number it
/// is assigned).
pub fn decode_stage<'s>(
    raw: Stream<'s, Time, Vec<RawLine>>,
    def: &SourceDef,
    params: Arc<ReadParams>,
) -> Decoded<'s> {
    let scope = raw.scope();
    let mut builder = OperatorBuilder::new(format!("Decode: {}", def.name), scope);
    let mut input = builder.new_input(raw, Exchange::new(|r: &RawLine| r.line));
    let (records_out, records) = builder.new_output::<Vec<(Record, Time, isize)>>();
    let (control_out, control) = builder.new_output::<Vec<Control>>();
    let mut records_out =
        OutputBuilder::<Time, CapacityContainerBuilder<Vec<(Record, Time, isize)>>>::from(
            records_out,
        );
    let mut control_out =
        OutputBuilder::<Time, CapacityContainerBuilder<Vec<Control>>>::from(control_out);
    let (kind, name, index, unit) = (def.kind, def.name.clone(), def.index, def.time_unit);
    let input_name = def.input.describe();
    builder.build(move |_caps| {
        let mut decoded = Vec::new();
        let mut control = Vec::new();
        move |_frontiers| {
            input.for_each(|cap, data| {
                let (mut records, mut dead) = (0, 0);
                for raw in data.drain(..) {
                    let result = decode_json_projected(
                        kind,
                        &raw.text,
                        &params.rules,
                        unit,
                        &params.projection,
                    )
                    .map_err(|e| e.to_string())
                    .and_then(|r| check_summed_fields(&r, &params.summed).map(|()| r));
                    match result {
                        Ok(record) => {
                            records += 1;
                            decoded.push((record, raw.tick, 1));
                        }
                        Err(e) => {
                            dead += 1;
                            control.push(Control::Dead(
                                DeadLetter::new(
                                    &name,
                                    &input_name,
                                    raw.peer.as_deref(),
                                    raw.line,
                                    raw.offset,
                                    e,
                                    raw.text.as_bytes(),
                                ),
                                raw.read_at,
                            ));
                        }
                    }
                }
                control.push(Control::Stats {
                    source: index,
                    lines: 0,
                    records,
                    dead,
                    late: 0,
                    held: 0,
                    bytes: 0,
                });
                if !decoded.is_empty() {
                    records_out
                        .activate()
                        .session(&cap.retain_stamp(0))
                        .give_container(&mut decoded);
                    decoded.clear();
                }
                control_out
                    .activate()
                    .session(&cap.retain_stamp(1))
                    .give_container(&mut control);
                control.clear();
            });
        }
    });
    (records, control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peek(kind: RecordKind, line: &str) -> Option<i64> {
        peek_time(kind, line, TimeUnit::Auto)
    }

    #[test]
    fn peeks_the_time_field_only() {
        let web = r#"{"event":"view_item","item":{"ts":"nested, ignored"},"ts":"2026-03-02T00:00:01Z","x":[1,{"ts":2}]}"#;
        assert_eq!(peek(RecordKind::Web, web), Some(1_772_409_601_000));
        assert_eq!(
            peek(
                RecordKind::Transactions,
                r#"{"ts":1772409601,"amount":"x"}"#
            ),
            Some(1_772_409_601_000)
        );
        assert_eq!(
            peek(
                RecordKind::Crm,
                r#"{"crm_id":"C1","updated_at":1772409601000}"#
            ),
            Some(1_772_409_601_000)
        );
        assert_eq!(peek(RecordKind::Web, r#"{"event":"x"}"#), None);
        assert_eq!(peek(RecordKind::Web, r#"{"ts":"yesterday"}"#), None);
        assert_eq!(peek(RecordKind::Web, r#"{"ts":null}"#), None);
        assert_eq!(peek(RecordKind::Web, r#"[1,2]"#), None);
        assert_eq!(peek(RecordKind::Web, r#"{"ts":1,"#), None);
    }
}
