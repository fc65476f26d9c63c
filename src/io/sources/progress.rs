//! Where a resumed run's readers start: points in the ranges of replayed
//! files, recorded as they are read and chosen for each checkpoint.
//!
//! A checkpoint at cut `C` (see `dataflow::retain`) holds every record
//! admitted at a tick before `C`, and the dead-letter output holds every
//! dead letter of a time before its bound `D`. A point of a range (a byte
//! offset at a line boundary, with its line number and what the range's
//! clock had seen there) is *valid* for `(C, D)` when every line before it
//! was admitted at a tick before `C`, if at all, and dead-lettered at a time
//! before `D`, if at all: nothing before it is still to be written. A
//! resumed reader starts at the point with the same clock, so it judges
//! every later line as the first reader did, and it drops the records it
//! admits at ticks before `C` (the checkpoint holds them). The start of a
//! range, with a fresh clock, is always valid: a range without a point is
//! read from its start.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::time::watermark::ClockState;
use crate::time::Time;

/// A point of a range of a replayed file at which a reader can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    /// The first byte of the range (which names it).
    pub start: u64,
    /// The byte offset of the next line.
    pub offset: u64,
    /// The line number (1-based) of the next line.
    pub line: u64,
    /// What the range's clock had seen before that line.
    pub clock: ClockState,
    /// The largest tick admitted before that line.
    pub max_tick: Option<Time>,
    /// The latest time a line before it was dead-lettered at.
    pub max_dead: Option<Time>,
    /// For a followed file, whose path may name another file by the time
    /// it resumes (rotated, truncated): a hash of the file's first bytes
    /// and of those just before the point (see
    /// `lines::FileLines::follow_from`). `None` for the ranges of replayed
    /// files, whose whole prefix the input marks check.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// Set in a checkpoint's points (see [`Progress::choose`]): the offset
    /// from which the reader read with its watermark at or past the cut,
    /// so that a line from there on with a time before the cut was late,
    /// not held (a restored followed file dead-letters such lines as an
    /// uninterrupted run would).
    #[serde(default)]
    pub late_from: Option<u64>,
    /// Set in a checkpoint's points: the offset up to which the readers
    /// had read when the checkpoint was taken (the latest point of its
    /// run, or of the run that one resumed from, whichever is further).
    /// The lines from there on were never read, so none of their dead
    /// letters is in the outputs: a resumed run writes them all, at times
    /// from the outputs' dead-letter bound on.
    #[serde(default)]
    pub read_to: Option<u64>,
}

impl ResumePoint {
    /// Whether every line before the point is in a checkpoint at cut `cut`
    /// and in a dead-letter output written up to `dead_bound` (see the
    /// [module documentation](self)).
    pub fn valid(&self, cut: Time, dead_bound: Time) -> bool {
        self.max_tick.is_none_or(|t| t < cut) && self.max_dead.is_none_or(|t| t < dead_bound)
    }
}

/// Where the readers of a resumed run start, and which records they drop.
#[derive(Clone, Debug, Default)]
pub struct Resume {
    /// The checkpoint's cut: records admitted at an earlier tick are in the
    /// checkpoint and are dropped.
    pub before: Time,
    /// Per source name, the point of each range that had one.
    pub points: BTreeMap<String, Vec<ResumePoint>>,
    /// Every dead letter of an earlier time is in the outputs of the run
    /// that took the checkpoint (ms): the dead letters of lines that run
    /// never read ([`ResumePoint::read_to`]) are written at this time or
    /// later.
    pub dead_bound: Time,
}

impl Resume {
    /// The point of the range of `source` that starts at `start`, if any.
    pub fn point(&self, source: &str, start: u64) -> Option<ResumePoint> {
        self.points
            .get(source)?
            .iter()
            .find(|p| p.start == start)
            .copied()
    }
}

/// The points recorded by a process's readers, by source and range.
#[derive(Debug)]
pub struct Progress {
    /// Source names, by source index.
    names: Vec<String>,
    points: Mutex<HashMap<(u32, u64), VecDeque<ResumePoint>>>,
    /// The cut of the checkpoint the run resumed from (0 without one).
    restored_cut: Time,
    /// Per range, the `late_from` and `read_to` of the point the run
    /// resumed from: what the runs before it read (see
    /// [`Progress::choose`]).
    restored: HashMap<(u32, u64), (Option<u64>, Option<u64>)>,
    /// Per range, the offset of the point the latest checkpoint chose
    /// ([`Progress::checkpointed`]).
    checkpointed: Mutex<HashMap<(u32, u64), u64>>,
}

impl Progress {
    /// The progress of sources named `names` (by index), starting with the
    /// points a resumed run starts from (if any).
    pub fn new(names: Vec<String>, resume: Option<&Resume>) -> Progress {
        let mut points: HashMap<(u32, u64), VecDeque<ResumePoint>> = HashMap::new();
        let mut restored = HashMap::new();
        if let Some(r) = resume {
            for (index, name) in names.iter().enumerate() {
                for p in r.points.get(name).into_iter().flatten() {
                    points
                        .entry((index as u32, p.start))
                        .or_default()
                        .push_back(*p);
                    restored.insert((index as u32, p.start), (p.late_from, p.read_to));
                }
            }
        }
        Progress {
            names,
            points: Mutex::new(points),
            restored_cut: resume.map_or(0, |r| r.before),
            restored,
            checkpointed: Mutex::new(HashMap::new()),
        }
    }

    /// The offset at which the latest checkpoint's point of the range of
    /// source `source` that starts at `start` is (where a restart resumes
    /// it), if one was chosen.
    pub fn checkpointed(&self, source: u32, start: u64) -> Option<u64> {
        self.checkpointed
            .lock()
            .ok()?
            .get(&(source, start))
            .copied()
    }

    /// Records that the reader of the range of source `source` that starts
    /// at `point.start` has read every line before `point`; a point at the
    /// same offset as the last one replaces it (its clock is newer: a live
    /// source's watermark moves while it waits).
    pub fn record(&self, source: u32, point: ResumePoint) {
        if let Ok(mut points) = self.points.lock() {
            let list = points.entry((source, point.start)).or_default();
            match list.back_mut() {
                Some(last) if last.offset == point.offset => *last = point,
                _ => list.push_back(point),
            }
        }
    }

    /// Sets `chosen`'s `read_to` and `late_from` (see [`Progress::choose`])
    /// from `list`, the points of its range from it on, for cut `cut`.
    fn read_and_late(
        &self,
        chosen: &mut ResumePoint,
        source: u32,
        list: &[ResumePoint],
        cut: Time,
    ) {
        let (late_before, read_before) = self
            .restored
            .get(&(source, chosen.start))
            .copied()
            .unwrap_or_default();
        chosen.read_to = list.last().map(|p| p.offset).max(read_before);
        chosen.late_from = list
            .iter()
            .find(|p| p.clock.watermark >= cut)
            .map(|p| p.offset)
            .or(chosen.read_to);
        if cut == self.restored_cut {
            if let Some(before) = late_before {
                chosen.late_from = Some(chosen.late_from.map_or(before, |l| l.min(before)));
            }
        }
    }

    /// The latest valid point of every range that has one, for a checkpoint
    /// at cut `cut` with dead letters written up to `dead_bound`; the
    /// points before them are forgotten (cuts and bounds only grow).
    pub fn choose(&self, cut: Time, dead_bound: Time) -> BTreeMap<String, Vec<ResumePoint>> {
        let mut out: BTreeMap<String, Vec<ResumePoint>> = BTreeMap::new();
        let Ok(mut points) = self.points.lock() else {
            return out;
        };
        for ((source, _), list) in points.iter_mut() {
            let name = self
                .names
                .get(*source as usize)
                .cloned()
                .unwrap_or_default();
            let Some(last) = list.iter().rposition(|p| p.valid(cut, dead_bound)) else {
                // A followed file (one range from byte 0, whose points
                // carry `bytes`) with no valid point yet: its start, with
                // a fresh clock (always valid), says how far it was read,
                // so that the lines appended later with times before the
                // cut are late, not held (they are not in the checkpoint).
                if list
                    .back()
                    .is_some_and(|p| p.bytes.is_some() && p.start == 0)
                {
                    let mut start = ResumePoint {
                        start: 0,
                        offset: 0,
                        line: 1,
                        clock: ClockState::default(),
                        max_tick: None,
                        max_dead: None,
                        bytes: None,
                        late_from: None,
                        read_to: None,
                    };
                    self.read_and_late(&mut start, *source, list.make_contiguous(), cut);
                    out.entry(name).or_default().push(start);
                }
                continue;
            };
            list.drain(..last);
            // `read_to`: how far this run, or the one it resumed from (which
            // may have read further), read. Lines from `late_from` on that
            // have a time before the cut are late in a resumed run: the
            // runs that took the checkpoint read them, if at all, with the
            // watermark at or past the cut, or never read them (they lie
            // beyond `read_to`), and every time before the cut is written.
            // `read_to` is where it ends when the checkpoint is a run's
            // last (a source stopped by a signal, whose cut is not bounded
            // by its watermark); before that, a point with the watermark at
            // or past the cut comes first. While the cut has not moved (the
            // run committed nothing new, e.g. it was stopped before it read
            // a line), the late lines of the run it resumed from stay late.
            let mut chosen = list[0];
            self.read_and_late(&mut chosen, *source, list.make_contiguous(), cut);
            if let Ok(mut checkpointed) = self.checkpointed.lock() {
                checkpointed.insert((*source, chosen.start), chosen.offset);
            }
            out.entry(name).or_default().push(chosen);
        }
        for list in out.values_mut() {
            list.sort_by_key(|p| p.start);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(offset: u64, max_tick: Option<Time>, max_dead: Option<Time>) -> ResumePoint {
        ResumePoint {
            start: 0,
            offset,
            line: offset + 1,
            clock: ClockState::default(),
            max_tick,
            max_dead,
            bytes: None,
            late_from: None,
            read_to: None,
        }
    }

    /// The latest point before which everything is checkpointed is chosen;
    /// a range with none is left out (read again from its start).
    #[test]
    fn the_latest_valid_point_is_chosen() {
        let progress = Progress::new(vec!["web".into(), "txn".into()], None);
        progress.record(0, point(10, Some(1_000), None));
        progress.record(0, point(20, Some(2_000), Some(500)));
        progress.record(0, point(30, Some(3_000), Some(2_500)));
        progress.record(1, point(5, Some(9_000), None));
        let chosen = progress.choose(2_001, 1_000);
        assert_eq!(chosen.len(), 1, "txn has no valid point: {chosen:?}");
        assert_eq!(chosen["web"][0].offset, 20);
        // A later dead letter bound than the latest point's: it is valid.
        let chosen = progress.choose(3_001, 3_000);
        assert_eq!(chosen["web"][0].offset, 30);
        // Earlier points are forgotten.
        let chosen = progress.choose(2_001, 1_000);
        assert_eq!(chosen.get("web"), None);
    }

    /// A point at the offset of the last one replaces it (a live source's
    /// clock moves while it waits), and a chosen point says from which
    /// offset the reader read with its watermark at or past the cut.
    #[test]
    fn a_waiting_reader_updates_its_point_and_lines_after_the_cut_are_late() {
        let progress = Progress::new(vec!["web".into()], None);
        let at = |offset: u64, watermark: Time, max_tick: Time| ResumePoint {
            clock: ClockState {
                watermark,
                ..ClockState::default()
            },
            ..point(offset, Some(max_tick), None)
        };
        // Lines up to tick 1 000 before offset 10; the reader waits there
        // (its watermark moves), then reads on with it past 1 001.
        progress.record(0, at(10, 500, 1_000));
        progress.record(0, at(10, 900, 1_000));
        progress.record(0, at(20, 2_000, 2_900));
        progress.record(0, at(30, 2_500, 3_000));
        let chosen = progress.choose(1_001, 1_000);
        let web = chosen["web"][0];
        assert_eq!((web.offset, web.clock.watermark), (10, 900), "replaced");
        assert_eq!(
            web.late_from,
            Some(20),
            "read with the watermark past 1 001"
        );
        // A cut no point's watermark reached: the last checkpoint of a
        // reader stopped by a signal, whose last point is where it stopped
        // reading. The lines after it were never read, so those before the
        // cut are late (the run wrote every time before it); those before
        // it were read, and are held.
        assert_eq!(
            progress.choose(5_000, 1_000)["web"][0].late_from,
            Some(30),
            "late after the last point"
        );
    }

    /// A run that resumed and was stopped before it read a line (its cut
    /// did not move) leaves the next run what the earlier run read: the
    /// same late lines and the same end of reading (they had been moved
    /// back to its resume point, and counted lines were dead-lettered
    /// again). Once the cut moves, its own reading decides.
    #[test]
    fn a_run_that_read_nothing_keeps_what_the_earlier_run_read() {
        let resumed = ResumePoint {
            late_from: Some(40),
            read_to: Some(90),
            ..point(30, Some(1_000), None)
        };
        let resume = Resume {
            before: 2_000,
            dead_bound: 2_000,
            points: [("web".to_string(), vec![resumed])].into(),
        };
        let progress = Progress::new(vec!["web".into()], Some(&resume));
        let web = progress.choose(2_000, 2_000)["web"][0];
        assert_eq!(
            (web.offset, web.late_from, web.read_to),
            (30, Some(40), Some(90))
        );
        // Read on to 120 with the watermark past a later cut.
        progress.record(
            0,
            ResumePoint {
                clock: ClockState {
                    watermark: 3_000,
                    ..ClockState::default()
                },
                ..point(120, Some(2_500), None)
            },
        );
        let web = progress.choose(3_000, 3_000)["web"][0];
        assert_eq!(
            (web.offset, web.late_from, web.read_to),
            (120, Some(120), Some(120))
        );
    }
}
