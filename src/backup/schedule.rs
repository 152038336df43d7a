//! When the next scheduled backup of an Agent is due, and what it is called. Pure: the
//! controller passes the clock in, so every decision can be replayed in tests.
//!
//! Cron slots are UTC. A slot runs at `slot + jitter`, where the jitter is a deterministic
//! function of (seed, slot) — every replica and every restart computes the same delay, and
//! agents sharing a schedule do not all start at once. At most one backup is created per
//! decision: after downtime, [`MissedRunPolicy::RunOnce`] creates the backup for the newest
//! missed slot only (never a burst), and [`MissedRunPolicy::Skip`] creates it only if it is
//! still on time.
//!
//! Idempotence comes from the caller: it passes the slot of the newest AgentBackup the schedule
//! created as `last_slot`, and names backups with [`backup_name`] (one name per slot), so a
//! restart between creating a backup and recording it cannot create a second one.

use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

/// What to do about runs missed while the controller was down: `RunOnce` runs the newest
/// missed slot once, however late (older missed slots are dropped); `Skip` runs a slot only
/// while on time (within its maximum jitter plus 5 minutes) and drops slots missed for longer.
// Variants carry no doc comments: with them schemars writes a `oneOf` instead of a plain
// string `enum` in the CRD schema.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub enum MissedRunPolicy {
    #[default]
    RunOnce,
    Skip,
}

/// How late, beyond the maximum jitter, a slot still counts as on time under
/// [`MissedRunPolicy::Skip`].
pub const SKIP_GRACE: Duration = Duration::from_secs(5 * 60);

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Create the backup for this slot now (the slot is the cron time, before jitter).
    RunNow { slot: Timestamp },
    /// Nothing due; look again at `at` (jitter included). `slot` is the next cron slot.
    WaitUntil { slot: Timestamp, at: Timestamp },
    /// The cron never fires again.
    Never,
}

/// Decides whether a scheduled backup is due now.
///
/// `last_slot`: the slot of the newest AgentBackup the schedule created (None if none yet);
/// `since`: when scheduling started (the Agent's creation time) — slots at or before it never
/// run. `jitter` is the maximum delay; `seed` (e.g. `namespace/name`) picks the delay within it.
///
/// Let `latest` be the newest slot `s <= now` with `s > max(since, last_slot)`. It is due once
/// `now >= s + jitter_for(seed, s, max)`; until then the answer is `WaitUntil` it. When due,
/// `RunOnce` runs it; `Skip` runs it only if `now - s <= jitter + SKIP_GRACE`. Otherwise (no
/// such slot, or skipped) the answer is `WaitUntil` the first slot after `now` (and after
/// `last_slot`), or `Never` if the cron has none.
///
/// The maximum jitter of a slot is capped at the time to the slot after it, so a jitter longer
/// than the cron's period (say 1 hour on an every-minute cron) still lets every decision reach
/// a due slot instead of waiting forever for ever-newer ones. When the jitter is shorter than
/// every gap between slots — the normal case — the cap changes nothing.
///
/// Bounded: at most four croner searches (the newest slot at or before `now` and the slot after
/// it, the next slot after `now` and the slot after that), however many slots were missed.
pub fn decide(
    cron: &croner::Cron,
    last_slot: Option<Timestamp>,
    since: Timestamp,
    now: Timestamp,
    policy: MissedRunPolicy,
    jitter: Duration,
    seed: &str,
) -> Decision {
    let floor = last_slot.map_or(since, |l| l.max(since));
    if let Some(slot) = slot_at_or_before(cron, now).filter(|&s| s > floor) {
        let at = due_at(cron, slot, jitter, seed);
        if now < at {
            return Decision::WaitUntil { slot, at };
        }
        let on_time = now.duration_since(slot) <= signed(jitter.saturating_add(SKIP_GRACE));
        if policy == MissedRunPolicy::RunOnce || on_time {
            return Decision::RunNow { slot };
        }
    }
    match slot_after(cron, now.max(floor)) {
        Some(slot) => Decision::WaitUntil {
            slot,
            at: due_at(cron, slot, jitter, seed),
        },
        None => Decision::Never,
    }
}

/// Deterministic jitter in [0, max) for (seed, slot): BLAKE3 of seed and slot seconds, so every
/// replica and every restart computes the same delay. Whole seconds when `max` is at least a
/// second; zero when `max` is zero.
pub fn jitter_for(seed: &str, slot: Timestamp, max: Duration) -> Duration {
    let max_nanos = max.as_nanos();
    if max_nanos == 0 {
        return Duration::ZERO;
    }
    let mut h = blake3::Hasher::new();
    h.update(seed.as_bytes());
    h.update(&[0]);
    h.update(&slot.as_second().to_le_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest.as_bytes()[..16]);
    let n = u128::from_le_bytes(first) % max_nanos;
    // n < max_nanos, so n / 1e9 <= max.as_secs() fits in a u64.
    let secs = (n / 1_000_000_000) as u64;
    if max >= Duration::from_secs(1) {
        Duration::from_secs(secs)
    } else {
        Duration::new(secs, (n % 1_000_000_000) as u32)
    }
}

/// Longest Kubernetes object name (a DNS-1123 subdomain).
const MAX_NAME: usize = 253;

/// The AgentBackup name for an agent's scheduled slot: `<agent>-<yyyymmddhhmm>` in UTC (e.g.
/// `summarizer-202611291500`), a valid DNS-1123 subdomain of at most 253 characters when
/// `agent` is one (as every Kubernetes object name is). If the agent name is too long (over 240
/// characters) it is cut to 231, trailing `-`/`.` dropped, and `-` plus 8 hex characters of
/// BLAKE3(agent name) added, so names stay unique and deterministic.
pub fn backup_name(agent: &str, slot: Timestamp) -> String {
    let t = TimeZone::UTC.to_datetime(slot);
    let stamp = format!(
        "{:04}{:02}{:02}{:02}{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute()
    );
    let room = MAX_NAME - 1 - stamp.len();
    if agent.len() <= room {
        return format!("{agent}-{stamp}");
    }
    let hash = blake3::hash(agent.as_bytes()).to_hex();
    let hash = &hash.as_str()[..8];
    let mut cut = room - 1 - hash.len();
    while !agent.is_char_boundary(cut) {
        cut -= 1;
    }
    let prefix = agent[..cut].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        format!("{hash}-{stamp}")
    } else {
        format!("{prefix}-{hash}-{stamp}")
    }
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(signed(d)).unwrap_or(Timestamp::MAX)
}

/// The newest slot at or before `t`.
fn slot_at_or_before(cron: &croner::Cron, t: Timestamp) -> Option<Timestamp> {
    // Inclusive: croner drops sub-seconds, so 12:00:00.5 still finds a 12:00:00 slot.
    cron.find_previous_occurrence(&t.to_zoned(TimeZone::UTC), true)
        .ok()
        .map(|z| z.timestamp())
        .filter(|&s| s <= t)
}

/// The first slot strictly after `t`.
fn slot_after(cron: &croner::Cron, t: Timestamp) -> Option<Timestamp> {
    cron.find_next_occurrence(&t.to_zoned(TimeZone::UTC), false)
        .ok()
        .map(|z| z.timestamp())
        .filter(|&s| s > t)
}

/// When `slot` is due: after its jitter, the maximum capped at the gap to the following slot.
fn due_at(cron: &croner::Cron, slot: Timestamp, jitter: Duration, seed: &str) -> Timestamp {
    let max = match slot_after(cron, slot) {
        Some(next) if !jitter.is_zero() => {
            let gap = next.duration_since(slot).unsigned_abs();
            jitter.min(gap)
        }
        _ => jitter,
    };
    add(slot, jitter_for(seed, slot, max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use croner::parser::{CronParser, Seconds, Year};

    /// Five fields, as the CRD's `parse_cron` accepts.
    fn cron(s: &str) -> croner::Cron {
        CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(s)
            .unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const MIN: Duration = Duration::from_secs(60);
    const SINCE: &str = "2026-01-01T00:00:00Z";

    #[test]
    fn down_five_hours_run_once_runs_the_newest_missed_slot_once() {
        let hourly = cron("0 * * * *");
        // Last backup for 07:00; slots 08:00 .. 12:00 missed.
        let d = decide(
            &hourly,
            Some(ts("2026-03-01T07:00:00Z")),
            ts(SINCE),
            ts("2026-03-01T12:30:00Z"),
            MissedRunPolicy::RunOnce,
            Duration::ZERO,
            "ns/a",
        );
        assert_eq!(
            d,
            Decision::RunNow {
                slot: ts("2026-03-01T12:00:00Z")
            }
        );
        // After creating it, the next decision waits: no burst for 08:00 .. 11:00.
        let d = decide(
            &hourly,
            Some(ts("2026-03-01T12:00:00Z")),
            ts(SINCE),
            ts("2026-03-01T12:30:01Z"),
            MissedRunPolicy::RunOnce,
            Duration::ZERO,
            "ns/a",
        );
        assert_eq!(
            d,
            Decision::WaitUntil {
                slot: ts("2026-03-01T13:00:00Z"),
                at: ts("2026-03-01T13:00:00Z")
            }
        );
    }

    #[test]
    fn down_five_hours_skip_waits_for_the_next_slot() {
        let hourly = cron("0 * * * *");
        let d = decide(
            &hourly,
            Some(ts("2026-03-01T07:00:00Z")),
            ts(SINCE),
            ts("2026-03-01T12:30:00Z"),
            MissedRunPolicy::Skip,
            Duration::ZERO,
            "ns/a",
        );
        assert_eq!(
            d,
            Decision::WaitUntil {
                slot: ts("2026-03-01T13:00:00Z"),
                at: ts("2026-03-01T13:00:00Z")
            }
        );
    }

    #[test]
    fn skip_still_runs_a_slot_that_is_on_time() {
        let hourly = cron("0 * * * *");
        let run = |now: &str| {
            decide(
                &hourly,
                Some(ts("2026-03-01T07:00:00Z")),
                ts(SINCE),
                ts(now),
                MissedRunPolicy::Skip,
                Duration::ZERO,
                "ns/a",
            )
        };
        let slot = ts("2026-03-01T12:00:00Z");
        assert_eq!(run("2026-03-01T12:00:00Z"), Decision::RunNow { slot });
        assert_eq!(run("2026-03-01T12:05:00Z"), Decision::RunNow { slot });
        assert!(matches!(
            run("2026-03-01T12:05:01Z"),
            Decision::WaitUntil { .. }
        ));
        // With jitter, the grace grows by the maximum jitter.
        let d = decide(
            &hourly,
            Some(ts("2026-03-01T07:00:00Z")),
            ts(SINCE),
            ts("2026-03-01T12:14:59Z"),
            MissedRunPolicy::Skip,
            10 * MIN,
            "ns/a",
        );
        assert_eq!(d, Decision::RunNow { slot });
    }

    #[test]
    fn jitter_delays_the_run() {
        let hourly = cron("0 * * * *");
        let slot = ts("2026-03-01T12:00:00Z");
        let j = jitter_for("ns/a", slot, 10 * MIN);
        assert!(j > Duration::ZERO && j < 10 * MIN, "{j:?}");
        let at = slot + j;
        for policy in [MissedRunPolicy::RunOnce, MissedRunPolicy::Skip] {
            let run = |now: Timestamp| {
                decide(
                    &hourly,
                    Some(ts("2026-03-01T11:00:00Z")),
                    ts(SINCE),
                    now,
                    policy,
                    10 * MIN,
                    "ns/a",
                )
            };
            assert_eq!(run(slot), Decision::WaitUntil { slot, at });
            assert_eq!(
                run(at - SignedDuration::from_secs(1)),
                Decision::WaitUntil { slot, at }
            );
            assert_eq!(run(at), Decision::RunNow { slot });
        }
        // Waiting for a future slot includes its jitter.
        let next = ts("2026-03-01T13:00:00Z");
        let d = decide(
            &hourly,
            Some(slot),
            ts(SINCE),
            ts("2026-03-01T12:30:00Z"),
            MissedRunPolicy::RunOnce,
            10 * MIN,
            "ns/a",
        );
        assert_eq!(
            d,
            Decision::WaitUntil {
                slot: next,
                at: next + jitter_for("ns/a", next, 10 * MIN)
            }
        );
    }

    #[test]
    fn jitter_is_deterministic_bounded_and_spread() {
        let start = ts("2026-01-01T00:00:00Z");
        let max = 10 * MIN;
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..500 {
            let slot = start + SignedDuration::from_hours(i);
            let j = jitter_for("ns/a", slot, max);
            assert_eq!(j, jitter_for("ns/a", slot, max));
            assert!(j < max);
            assert_eq!(j.subsec_nanos(), 0, "whole seconds");
            seen.insert(j);
        }
        assert!(seen.len() > 300, "only {} distinct delays", seen.len());
        // Another seed gives other delays.
        let other: Vec<_> = (0..20)
            .map(|i| jitter_for("ns/b", start + SignedDuration::from_hours(i), max))
            .collect();
        let mine: Vec<_> = (0..20)
            .map(|i| jitter_for("ns/a", start + SignedDuration::from_hours(i), max))
            .collect();
        assert_ne!(other, mine);
        // Degenerate maxima.
        assert_eq!(jitter_for("ns/a", start, Duration::ZERO), Duration::ZERO);
        assert_eq!(
            jitter_for("ns/a", start, Duration::from_nanos(1)),
            Duration::ZERO
        );
        assert!(jitter_for("ns/a", start, Duration::from_millis(500)) < Duration::from_millis(500));
        assert!(jitter_for("ns/a", start, Duration::MAX) < Duration::MAX);
    }

    #[test]
    fn restart_after_run_now_does_not_run_again() {
        let hourly = cron("0 * * * *");
        for now in [
            "2026-03-01T12:00:00Z",
            "2026-03-01T12:00:00.5Z",
            "2026-03-01T12:59:59.999Z",
        ] {
            let d = decide(
                &hourly,
                Some(ts("2026-03-01T12:00:00Z")),
                ts(SINCE),
                ts(now),
                MissedRunPolicy::RunOnce,
                Duration::ZERO,
                "ns/a",
            );
            assert_eq!(
                d,
                Decision::WaitUntil {
                    slot: ts("2026-03-01T13:00:00Z"),
                    at: ts("2026-03-01T13:00:00Z")
                },
                "{now}"
            );
        }
        // A sub-second `now` still sees the slot of its own second.
        let d = decide(
            &hourly,
            Some(ts("2026-03-01T11:00:00Z")),
            ts(SINCE),
            ts("2026-03-01T12:00:00.5Z"),
            MissedRunPolicy::RunOnce,
            Duration::ZERO,
            "ns/a",
        );
        assert_eq!(
            d,
            Decision::RunNow {
                slot: ts("2026-03-01T12:00:00Z")
            }
        );
    }

    #[test]
    fn slots_at_or_before_since_never_run() {
        let hourly = cron("0 * * * *");
        let wait_13 = Decision::WaitUntil {
            slot: ts("2026-03-01T13:00:00Z"),
            at: ts("2026-03-01T13:00:00Z"),
        };
        for since in ["2026-03-01T12:10:00Z", "2026-03-01T12:00:00Z"] {
            let d = decide(
                &hourly,
                None,
                ts(since),
                ts("2026-03-01T12:30:00Z"),
                MissedRunPolicy::RunOnce,
                Duration::ZERO,
                "ns/a",
            );
            assert_eq!(d, wait_13, "since {since}");
        }
        // No backup yet, created before the slot: the slot runs.
        let d = decide(
            &hourly,
            None,
            ts("2026-03-01T11:59:59Z"),
            ts("2026-03-01T12:30:00Z"),
            MissedRunPolicy::RunOnce,
            Duration::ZERO,
            "ns/a",
        );
        assert_eq!(
            d,
            Decision::RunNow {
                slot: ts("2026-03-01T12:00:00Z")
            }
        );
    }

    #[test]
    fn a_last_slot_in_the_future_is_not_run_again() {
        // Another replica's clock ran ahead and created 13:00 already.
        let hourly = cron("0 * * * *");
        let d = decide(
            &hourly,
            Some(ts("2026-03-01T13:00:00Z")),
            ts(SINCE),
            ts("2026-03-01T12:30:00Z"),
            MissedRunPolicy::RunOnce,
            Duration::ZERO,
            "ns/a",
        );
        assert_eq!(
            d,
            Decision::WaitUntil {
                slot: ts("2026-03-01T14:00:00Z"),
                at: ts("2026-03-01T14:00:00Z")
            }
        );
    }

    #[test]
    fn daily_cron_after_a_long_outage_is_bounded_and_runs_once() {
        let daily = cron("0 3 * * *");
        let d = decide(
            &daily,
            Some(ts("2020-01-01T03:00:00Z")),
            ts("2019-06-01T00:00:00Z"),
            ts("2026-03-01T02:00:00Z"),
            MissedRunPolicy::RunOnce,
            Duration::ZERO,
            "ns/a",
        );
        assert_eq!(
            d,
            Decision::RunNow {
                slot: ts("2026-02-28T03:00:00Z")
            }
        );
        let every_minute = cron("* * * * *");
        let d = decide(
            &every_minute,
            None,
            ts("2000-01-01T00:00:00Z"),
            ts("2026-03-01T02:00:30Z"),
            MissedRunPolicy::RunOnce,
            Duration::ZERO,
            "ns/a",
        );
        assert_eq!(
            d,
            Decision::RunNow {
                slot: ts("2026-03-01T02:00:00Z")
            }
        );
    }

    #[test]
    fn jitter_longer_than_the_period_is_capped_so_slots_still_run() {
        let every_minute = cron("* * * * *");
        let hour = 60 * MIN;
        let mut last = Some(ts("2026-03-01T02:00:00Z"));
        let mut runs = 0;
        // Step the clock by 7 seconds for an hour; every WaitUntil is before the next slot.
        let mut now = ts("2026-03-01T02:00:00Z");
        while now < ts("2026-03-01T03:00:00Z") {
            match decide(
                &every_minute,
                last,
                ts(SINCE),
                now,
                MissedRunPolicy::RunOnce,
                hour,
                "ns/a",
            ) {
                Decision::RunNow { slot } => {
                    last = Some(slot);
                    runs += 1;
                }
                Decision::WaitUntil { slot, at } => {
                    assert!(at >= slot && at < slot + SignedDuration::from_mins(1));
                }
                Decision::Never => panic!("never"),
            }
            now += SignedDuration::from_secs(7);
        }
        assert!(runs > 40, "only {runs} runs in an hour");
    }

    #[test]
    fn never_when_the_cron_has_no_future_slot() {
        // Only a cron with a year field can end; the CRD's five-field crons never do.
        let once = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Optional)
            .build()
            .parse("0 0 0 1 1 * 2020")
            .unwrap();
        let d = decide(
            &once,
            Some(ts("2020-01-01T00:00:00Z")),
            ts("2019-01-01T00:00:00Z"),
            ts("2026-03-01T00:00:00Z"),
            MissedRunPolicy::RunOnce,
            MIN,
            "ns/a",
        );
        assert_eq!(d, Decision::Never);
        // Missed and never run: RunOnce still runs it, Skip drops it.
        let run = |p| {
            decide(
                &once,
                None,
                ts("2019-01-01T00:00:00Z"),
                ts("2026-03-01T00:00:00Z"),
                p,
                Duration::ZERO,
                "ns/a",
            )
        };
        assert_eq!(
            run(MissedRunPolicy::RunOnce),
            Decision::RunNow {
                slot: ts("2020-01-01T00:00:00Z")
            }
        );
        assert_eq!(run(MissedRunPolicy::Skip), Decision::Never);
    }

    fn is_dns1123_subdomain(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    }

    #[test]
    fn backup_names() {
        assert_eq!(
            backup_name("summarizer", ts("2026-11-29T15:00:00Z")),
            "summarizer-202611291500"
        );
        assert_eq!(
            backup_name("summarizer", ts("2026-11-29T15:00:59.9Z")),
            "summarizer-202611291500"
        );
        assert_eq!(
            backup_name("a.b-c", ts("2027-01-02T03:04:00Z")),
            "a.b-c-202701020304"
        );
        // A name of 240 characters just fits.
        let fits = "a".repeat(240);
        let n = backup_name(&fits, ts("2026-11-29T15:00:00Z"));
        assert_eq!(n, format!("{fits}-202611291500"));
        assert_eq!(n.len(), 253);
    }

    #[test]
    fn long_agent_names_are_cut_and_hashed() {
        let slot = ts("2026-11-29T15:00:00Z");
        let base = "x".repeat(241);
        let hash = &blake3::hash(base.as_bytes()).to_hex()[..8];
        assert_eq!(
            backup_name(&base, slot),
            format!("{}-{hash}-202611291500", "x".repeat(231))
        );

        let long_a = format!("{}-alpha", "agent".repeat(56));
        let long_b = format!("{}-bravo", "agent".repeat(56));
        let (a, b) = (backup_name(&long_a, slot), backup_name(&long_b, slot));
        assert_ne!(a, b);
        assert_eq!(a, backup_name(&long_a, slot), "deterministic");
        for n in [&a, &b] {
            assert_eq!(n.len(), 253);
            assert!(is_dns1123_subdomain(n), "{n}");
            assert!(n.ends_with("-202611291500"));
        }
        // A cut that ends on '-' or '.' drops it to stay valid.
        for sep in ["-", "."] {
            let agent = format!("{}{sep}{}", "a".repeat(230), "b".repeat(30));
            let n = backup_name(&agent, slot);
            assert!(is_dns1123_subdomain(&n), "{n}");
            assert!(n.starts_with(&format!("{}-", "a".repeat(230))), "{n}");
            assert!(n.len() <= 253);
        }
        // The longest object name still fits.
        let max = format!("{}.{}", "a".repeat(126), "b".repeat(126));
        let n = backup_name(&max, slot);
        assert!(is_dns1123_subdomain(&n) && n.len() == 253, "{n}");
        // Non-ASCII input does not panic (it is not a valid name anyway).
        let n = backup_name(&"é".repeat(200), slot);
        assert!(n.len() <= 253);
    }
}
