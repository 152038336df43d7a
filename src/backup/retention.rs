//! Grandfather-father-son (GFS) retention of Completed backups: which to keep, which to delete.
//!
//! The rules are those of restic's `forget`, evaluated in UTC:
//!
//! * Backups are ordered newest first; two backups created at the same instant are ordered by
//!   id (ascending), so the result never depends on the order of the input. An id given twice
//!   counts once (its newest creation time is used).
//! * `keep_last = N` keeps the N newest backups.
//! * `keep_hourly`, `keep_daily`, `keep_weekly`, `keep_monthly` and `keep_yearly = N` each walk the
//!   backups from newest to oldest and keep a backup whenever its bucket (the UTC hour, day, ISO
//!   week, month or year it was created in) differs from the bucket of the backup that rule kept
//!   before, until the rule has kept N backups. That is: the newest backup of each of the N most
//!   recent buckets that *have* a backup. Buckets without backups do not count, so a gap of a
//!   week does not use up `keep_daily`.
//! * A backup is kept if any rule keeps it; every other backup is deleted.
//! * Safety: the newest backup is always kept, even when every count is 0.
//!
//! [`plan`] is pure: it reads only its arguments, so the controller can show the plan before it
//! deletes anything, and tests can check it exhaustively.

use std::collections::{BTreeMap, HashSet};

use jiff::Timestamp;
use jiff::tz::TimeZone;

/// How many backups each GFS rule keeps. A count of 0 turns its rule off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The N newest backups.
    pub keep_last: u32,
    /// The newest backup of each of the N most recent UTC hours that have a backup.
    pub keep_hourly: u32,
    /// The newest backup of each of the N most recent UTC days that have a backup.
    pub keep_daily: u32,
    /// The newest backup of each of the N most recent ISO weeks that have a backup.
    pub keep_weekly: u32,
    /// The newest backup of each of the N most recent UTC months that have a backup.
    pub keep_monthly: u32,
    /// The newest backup of each of the N most recent UTC years that have a backup.
    pub keep_yearly: u32,
}

/// One Completed backup: its id and when it was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub created: Timestamp,
}

/// The outcome of [`plan`]: every input id is in exactly one of `keep` and `delete`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Ids to keep, newest first.
    pub keep: Vec<String>,
    /// Ids to delete, newest first.
    pub delete: Vec<String>,
    /// For each kept id, the rules that keep it, in the order `last`, `hourly`, `daily`,
    /// `weekly`, `monthly`, `yearly`; `newest` when only the safety rule keeps it.
    pub reasons: BTreeMap<String, Vec<&'static str>>,
}

/// The reason given for the newest backup when no rule keeps it.
pub const REASON_NEWEST: &str = "newest";

/// A rule's bucket: backups in the same bucket compete; only the newest of them is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bucket {
    Hour(i16, i8, i8, i8),
    Day(i16, i8, i8),
    Week(i16, i8),
    Month(i16, i8),
    Year(i16),
}

type BucketFn = fn(&jiff::civil::DateTime) -> Bucket;

fn hour(t: &jiff::civil::DateTime) -> Bucket {
    Bucket::Hour(t.year(), t.month(), t.day(), t.hour())
}
fn day(t: &jiff::civil::DateTime) -> Bucket {
    Bucket::Day(t.year(), t.month(), t.day())
}
fn week(t: &jiff::civil::DateTime) -> Bucket {
    let w = t.date().iso_week_date();
    Bucket::Week(w.year(), w.week())
}
fn month(t: &jiff::civil::DateTime) -> Bucket {
    Bucket::Month(t.year(), t.month())
}
fn year(t: &jiff::civil::DateTime) -> Bucket {
    Bucket::Year(t.year())
}

/// Decides which backups the policy keeps; see the module documentation for the rules.
pub fn plan(policy: &Policy, backups: &[Candidate]) -> Plan {
    // Newest first, ties by id; then drop repeated ids (keeping the newest entry of each).
    let mut sorted: Vec<&Candidate> = backups.iter().collect();
    sorted.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| a.id.cmp(&b.id)));
    let mut seen = HashSet::new();
    sorted.retain(|c| seen.insert(c.id.as_str()));

    let utc = TimeZone::UTC;
    let civil: Vec<jiff::civil::DateTime> =
        sorted.iter().map(|c| utc.to_datetime(c.created)).collect();

    let mut reasons: Vec<Vec<&'static str>> = vec![Vec::new(); sorted.len()];
    for r in reasons.iter_mut().take(policy.keep_last as usize) {
        r.push("last");
    }
    let rules: [(u32, &'static str, BucketFn); 5] = [
        (policy.keep_hourly, "hourly", hour),
        (policy.keep_daily, "daily", day),
        (policy.keep_weekly, "weekly", week),
        (policy.keep_monthly, "monthly", month),
        (policy.keep_yearly, "yearly", year),
    ];
    for (count, name, bucket_of) in rules {
        let mut left = count;
        let mut last_bucket = None;
        for (i, t) in civil.iter().enumerate() {
            if left == 0 {
                break;
            }
            let b = bucket_of(t);
            if last_bucket != Some(b) {
                reasons[i].push(name);
                last_bucket = Some(b);
                left -= 1;
            }
        }
    }
    if let Some(first) = reasons.first_mut()
        && first.is_empty()
    {
        first.push(REASON_NEWEST);
    }

    let mut out = Plan::default();
    for (c, why) in sorted.into_iter().zip(reasons) {
        if why.is_empty() {
            out.delete.push(c.id.clone());
        } else {
            out.keep.push(c.id.clone());
            out.reasons.insert(c.id.clone(), why);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NONE: Policy = Policy {
        keep_last: 0,
        keep_hourly: 0,
        keep_daily: 0,
        keep_weekly: 0,
        keep_monthly: 0,
        keep_yearly: 0,
    };

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// Candidates whose ids are their creation times, as written.
    fn at(times: &[&str]) -> Vec<Candidate> {
        times
            .iter()
            .map(|t| Candidate {
                id: (*t).to_string(),
                created: ts(t),
            })
            .collect()
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_backups_give_an_empty_plan() {
        let p = Policy {
            keep_last: 3,
            keep_daily: 2,
            ..NONE
        };
        assert_eq!(plan(&p, &[]), Plan::default());
        assert_eq!(plan(&NONE, &[]), Plan::default());
    }

    #[test]
    fn a_year_of_six_hourly_backups() {
        // Every 6 hours through 2026 (not a leap year): 1460 backups, the newest at
        // 2026-12-31T18:00Z. 2026-01-01 and 2026-12-31 are Thursdays, so 2026 has 53 ISO weeks
        // and week 53 runs Mon 2026-12-28 .. Sun 2027-01-03.
        let start = ts("2026-01-01T00:00:00Z");
        let backups: Vec<Candidate> = (0..365 * 4)
            .map(|i| {
                let created = start + jiff::SignedDuration::from_hours(6 * i);
                Candidate {
                    id: created.to_string(),
                    created,
                }
            })
            .collect();
        assert_eq!(backups.len(), 1460);
        assert_eq!(backups[1459].id, "2026-12-31T18:00:00Z");
        let policy = Policy {
            keep_last: 5,
            keep_hourly: 0,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 12,
            keep_yearly: 2,
        };
        let got = plan(&policy, &backups);
        let expected = ids(&[
            // last 5 (the first also daily, weekly W53, monthly Dec and yearly 2026 —
            // the only year with backups, so keep_yearly 2 keeps one)
            "2026-12-31T18:00:00Z",
            "2026-12-31T12:00:00Z",
            "2026-12-31T06:00:00Z",
            "2026-12-31T00:00:00Z",
            "2026-12-30T18:00:00Z", // also daily
            // the rest of the 7 days
            "2026-12-29T18:00:00Z",
            "2026-12-28T18:00:00Z",
            "2026-12-27T18:00:00Z", // also weekly: Sunday ends W52
            "2026-12-26T18:00:00Z",
            "2026-12-25T18:00:00Z",
            // weekly W51 and W50 (Sundays)
            "2026-12-20T18:00:00Z",
            "2026-12-13T18:00:00Z",
            // monthly: the last day of each earlier month
            "2026-11-30T18:00:00Z",
            "2026-10-31T18:00:00Z",
            "2026-09-30T18:00:00Z",
            "2026-08-31T18:00:00Z",
            "2026-07-31T18:00:00Z",
            "2026-06-30T18:00:00Z",
            "2026-05-31T18:00:00Z",
            "2026-04-30T18:00:00Z",
            "2026-03-31T18:00:00Z",
            "2026-02-28T18:00:00Z",
            "2026-01-31T18:00:00Z",
        ]);
        assert_eq!(got.keep, expected);
        assert_eq!(got.delete.len(), 1460 - 23);
        assert_eq!(got.delete[0], "2026-12-30T12:00:00Z");
        assert_eq!(got.delete.last().unwrap(), "2026-01-01T00:00:00Z");
        assert_eq!(
            got.reasons["2026-12-31T18:00:00Z"],
            ["last", "daily", "weekly", "monthly", "yearly"]
        );
        assert_eq!(got.reasons["2026-12-31T12:00:00Z"], ["last"]);
        assert_eq!(got.reasons["2026-12-30T18:00:00Z"], ["last", "daily"]);
        assert_eq!(got.reasons["2026-12-27T18:00:00Z"], ["daily", "weekly"]);
        assert_eq!(got.reasons["2026-12-20T18:00:00Z"], ["weekly"]);
        assert_eq!(got.reasons["2026-01-31T18:00:00Z"], ["monthly"]);
        assert_eq!(got.reasons.len(), 23);
    }

    #[test]
    fn keep_last_alone() {
        let b = at(&[
            "2026-03-01T10:00:00Z",
            "2026-03-01T12:00:00Z",
            "2026-03-01T11:00:00Z",
            "2026-02-01T00:00:00Z",
        ]);
        let got = plan(
            &Policy {
                keep_last: 2,
                ..NONE
            },
            &b,
        );
        assert_eq!(
            got.keep,
            ids(&["2026-03-01T12:00:00Z", "2026-03-01T11:00:00Z"])
        );
        assert_eq!(
            got.delete,
            ids(&["2026-03-01T10:00:00Z", "2026-02-01T00:00:00Z"])
        );
        // More than there are keeps everything.
        let all = plan(
            &Policy {
                keep_last: 10,
                ..NONE
            },
            &b,
        );
        assert_eq!(all.keep.len(), 4);
        assert!(all.delete.is_empty());
    }

    #[test]
    fn hourly_skips_hours_without_backups() {
        let b = at(&[
            "2026-05-01T10:05:00Z",
            "2026-05-01T10:40:00Z",
            "2026-05-01T12:10:00Z",
            "2026-05-01T15:00:00Z",
            "2026-05-01T15:30:00Z",
            "2026-05-01T15:59:59Z",
            "2026-05-01T09:59:59Z",
        ]);
        let got = plan(
            &Policy {
                keep_hourly: 3,
                ..NONE
            },
            &b,
        );
        // Hours 11, 13 and 14 have no backup and do not count.
        assert_eq!(
            got.keep,
            ids(&[
                "2026-05-01T15:59:59Z",
                "2026-05-01T12:10:00Z",
                "2026-05-01T10:40:00Z"
            ])
        );
        assert_eq!(
            got.delete,
            ids(&[
                "2026-05-01T15:30:00Z",
                "2026-05-01T15:00:00Z",
                "2026-05-01T10:05:00Z",
                "2026-05-01T09:59:59Z"
            ])
        );
        assert!(got.reasons.values().all(|r| r == &["hourly"]));
    }

    #[test]
    fn daily_uses_utc_days_and_skips_empty_days() {
        let b = at(&[
            "2026-05-10T23:59:59Z",
            "2026-05-10T00:00:00Z",
            "2026-05-09T23:59:59.999Z",
            "2026-05-07T08:00:00Z",
            "2026-05-07T09:00:00Z",
            "2026-05-01T00:00:00Z",
        ]);
        let got = plan(
            &Policy {
                keep_daily: 3,
                ..NONE
            },
            &b,
        );
        assert_eq!(
            got.keep,
            ids(&[
                "2026-05-10T23:59:59Z",
                "2026-05-09T23:59:59.999Z",
                "2026-05-07T09:00:00Z"
            ])
        );
    }

    #[test]
    fn weekly_uses_iso_weeks_across_the_year_end() {
        // 2027-01-03 is a Sunday in ISO week 2026-W53; 2027-01-04 is the Monday of 2027-W01.
        // 2026-12-27 (Sun) ends W52. 2026-12-14 (Mon) starts W51.
        let b = at(&[
            "2027-01-04T00:00:00Z",
            "2027-01-03T23:00:00Z",
            "2026-12-28T00:00:00Z",
            "2026-12-27T23:00:00Z",
            "2026-12-21T00:00:00Z",
            "2026-12-14T00:00:00Z",
        ]);
        let got = plan(
            &Policy {
                keep_weekly: 3,
                ..NONE
            },
            &b,
        );
        assert_eq!(
            got.keep,
            ids(&[
                "2027-01-04T00:00:00Z",
                "2027-01-03T23:00:00Z",
                "2026-12-27T23:00:00Z"
            ])
        );
    }

    #[test]
    fn monthly_skips_empty_months() {
        let b = at(&[
            "2026-06-15T00:00:00Z",
            "2026-06-01T00:00:00Z",
            "2026-03-31T23:59:59Z",
            "2026-03-02T00:00:00Z",
            "2025-12-31T12:00:00Z",
            "2025-11-30T12:00:00Z",
        ]);
        let got = plan(
            &Policy {
                keep_monthly: 3,
                ..NONE
            },
            &b,
        );
        assert_eq!(
            got.keep,
            ids(&[
                "2026-06-15T00:00:00Z",
                "2026-03-31T23:59:59Z",
                "2025-12-31T12:00:00Z"
            ])
        );
    }

    #[test]
    fn yearly_keeps_the_newest_of_each_year() {
        let b = at(&[
            "2026-02-01T00:00:00Z",
            "2025-12-31T23:59:59Z",
            "2025-01-01T00:00:00Z",
            "2022-07-01T00:00:00Z",
            "2021-07-01T00:00:00Z",
        ]);
        let got = plan(
            &Policy {
                keep_yearly: 3,
                ..NONE
            },
            &b,
        );
        assert_eq!(
            got.keep,
            ids(&[
                "2026-02-01T00:00:00Z",
                "2025-12-31T23:59:59Z",
                "2022-07-01T00:00:00Z"
            ])
        );
        assert_eq!(
            got.delete,
            ids(&["2025-01-01T00:00:00Z", "2021-07-01T00:00:00Z"])
        );
    }

    #[test]
    fn the_newest_is_kept_even_when_every_count_is_zero() {
        let b = at(&[
            "2026-01-01T00:00:00Z",
            "2026-01-03T00:00:00Z",
            "2026-01-02T00:00:00Z",
        ]);
        let got = plan(&NONE, &b);
        assert_eq!(got.keep, ids(&["2026-01-03T00:00:00Z"]));
        assert_eq!(
            got.delete,
            ids(&["2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z"])
        );
        assert_eq!(got.reasons["2026-01-03T00:00:00Z"], [REASON_NEWEST]);
    }

    #[test]
    fn ties_are_broken_by_id_and_duplicates_count_once() {
        let t = ts("2026-01-01T00:00:00Z");
        let c = |id: &str, created| Candidate {
            id: id.into(),
            created,
        };
        let b = vec![
            c("b", t),
            c("a", t),
            c("c", t - jiff::SignedDuration::from_hours(1)),
            c("a", t),
            // A repeated id with another time: its newest time is used.
            c("c", t + jiff::SignedDuration::from_hours(1)),
        ];
        let got = plan(
            &Policy {
                keep_last: 2,
                ..NONE
            },
            &b,
        );
        assert_eq!(got.keep, ids(&["c", "a"]));
        assert_eq!(got.delete, ids(&["b"]));
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        // Small id pool (repeats happen) and a few days of seconds (bucket collisions happen).
        prop::collection::vec((0u32..40, 0i64..(10 * 86_400)), 0..40).prop_map(|v| {
            v.into_iter()
                .map(|(id, s)| Candidate {
                    id: format!("b{id}"),
                    created: Timestamp::from_second(1_780_000_000 + s * 7).unwrap(),
                })
                .collect()
        })
    }

    fn policies() -> impl Strategy<Value = Policy> {
        (0u32..6, 0u32..6, 0u32..6, 0u32..6, 0u32..6, 0u32..6).prop_map(|(l, h, d, w, m, y)| {
            Policy {
                keep_last: l,
                keep_hourly: h,
                keep_daily: d,
                keep_weekly: w,
                keep_monthly: m,
                keep_yearly: y,
            }
        })
    }

    proptest! {
        #[test]
        fn plans_are_sound(
            policy in policies(),
            (backups, shuffled) in candidates()
                .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
        ) {
            let got = plan(&policy, &backups);

            // Newest first by (created desc, id asc), one entry per id.
            let mut newest: BTreeMap<&str, Timestamp> = BTreeMap::new();
            for c in &backups {
                let e = newest.entry(c.id.as_str()).or_insert(c.created);
                *e = (*e).max(c.created);
            }
            let mut order: Vec<(&str, Timestamp)> = newest.into_iter().collect();
            order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));

            // keep ∪ delete = input ids, disjoint.
            let keep: HashSet<&str> = got.keep.iter().map(String::as_str).collect();
            let delete: HashSet<&str> = got.delete.iter().map(String::as_str).collect();
            prop_assert_eq!(keep.len(), got.keep.len());
            prop_assert_eq!(delete.len(), got.delete.len());
            prop_assert!(keep.is_disjoint(&delete));
            let all: HashSet<&str> = order.iter().map(|(id, _)| *id).collect();
            prop_assert_eq!(&keep | &delete, all);

            // Both lists newest first, in the one order.
            let pos: BTreeMap<&str, usize> =
                order.iter().enumerate().map(|(i, (id, _))| (*id, i)).collect();
            prop_assert!(got.keep.windows(2).all(|w| pos[w[0].as_str()] < pos[w[1].as_str()]));
            prop_assert!(got.delete.windows(2).all(|w| pos[w[0].as_str()] < pos[w[1].as_str()]));

            // Newest kept; the keep_last newest kept.
            if let Some((first, _)) = order.first() {
                prop_assert!(keep.contains(first));
            }
            let n = order.len().min(policy.keep_last as usize);
            prop_assert!(order[..n].iter().all(|(id, _)| keep.contains(id)));
            prop_assert!(got.keep.len() >= n);

            // Never more than the counts allow (or 1, for the newest).
            let total = [policy.keep_last, policy.keep_hourly, policy.keep_daily,
                policy.keep_weekly, policy.keep_monthly, policy.keep_yearly]
                .iter().map(|&c| c as usize).sum::<usize>().max(1);
            prop_assert!(got.keep.len() <= total.min(order.len()));

            // A reason for every kept id and for nothing else.
            let mut kept_sorted: Vec<&str> = keep.iter().copied().collect();
            kept_sorted.sort_unstable();
            prop_assert!(got.reasons.keys().map(String::as_str).eq(kept_sorted));
            prop_assert!(got.reasons.values().all(|r| !r.is_empty()));

            // Input order does not matter.
            prop_assert_eq!(plan(&policy, &shuffled), got);
        }

        /// Checks each rule against a second formulation: group by bucket, take the N most
        /// recent buckets, keep the newest backup of each.
        #[test]
        fn rules_keep_the_newest_of_the_most_recent_buckets(
            policy in policies(),
            backups in candidates(),
        ) {
            let got = plan(&policy, &backups);
            let mut newest: BTreeMap<&str, Timestamp> = BTreeMap::new();
            for c in &backups {
                let e = newest.entry(c.id.as_str()).or_insert(c.created);
                *e = (*e).max(c.created);
            }
            let key = |t: Timestamp, rule: &str| -> (i16, i16, i16) {
                let d = TimeZone::UTC.to_datetime(t);
                let (y, m, day, h) = (d.year(), d.month() as i16, d.day() as i16, d.hour() as i16);
                match rule {
                    "hourly" => (y, m * 100 + day, h),
                    "daily" => (y, m, day),
                    "weekly" => {
                        let w = d.date().iso_week_date();
                        (w.year(), w.week() as i16, 0)
                    }
                    "monthly" => (y, m, 0),
                    _ => (y, 0, 0),
                }
            };
            for (rule, n) in [("hourly", policy.keep_hourly), ("daily", policy.keep_daily),
                ("weekly", policy.keep_weekly), ("monthly", policy.keep_monthly),
                ("yearly", policy.keep_yearly)] {
                // bucket -> (newest time, smallest id at that time)
                let mut buckets: BTreeMap<(i16, i16, i16), (Timestamp, &str)> = BTreeMap::new();
                for (&id, &t) in &newest {
                    let e = buckets.entry(key(t, rule)).or_insert((t, id));
                    if t > e.0 || (t == e.0 && id < e.1) {
                        *e = (t, id);
                    }
                }
                let want: HashSet<&str> =
                    buckets.values().rev().take(n as usize).map(|(_, id)| *id).collect();
                let have: HashSet<&str> = got.reasons.iter()
                    .filter(|(_, r)| r.contains(&rule))
                    .map(|(id, _)| id.as_str())
                    .collect();
                prop_assert_eq!(have, want, "rule {}", rule);
            }
        }
    }
}
