//! Side-by-side measurement and the JSON report format of BENCHMARKS.md.
#![allow(dead_code)]

use std::time::{Duration, Instant};

pub struct Row {
    pub name: &'static str,
    pub ours: f64,
    pub baseline: f64,
    pub unit: &'static str,
    /// ours / baseline for throughputs; baseline / ours would invert "lower is better" units.
    pub ratio: f64,
    pub baseline_is: &'static str,
    pub target: &'static str,
    pub extra: Vec<(&'static str, f64)>,
}

/// Runs `ours` and `baseline` in alternating slices (so machine noise hits both alike) for about
/// `total` and returns operations per second for each.
pub fn ops_per_sec(
    total: Duration,
    mut ours: impl FnMut(),
    mut baseline: impl FnMut(),
) -> (f64, f64) {
    // Warm-up.
    for _ in 0..50 {
        ours();
        baseline();
    }
    let rounds = 10;
    let slice = total / (2 * rounds);
    let (mut n_ours, mut t_ours, mut n_base, mut t_base) =
        (0u64, Duration::ZERO, 0u64, Duration::ZERO);
    for _ in 0..rounds {
        let start = Instant::now();
        while start.elapsed() < slice {
            baseline();
            n_base += 1;
        }
        t_base += start.elapsed();
        let start = Instant::now();
        while start.elapsed() < slice {
            ours();
            n_ours += 1;
        }
        t_ours += start.elapsed();
    }
    (
        n_ours as f64 / t_ours.as_secs_f64(),
        n_base as f64 / t_base.as_secs_f64(),
    )
}

/// Like `ops_per_sec`, with `threads` workers each calling the function (both sides alike).
pub fn parallel_ops_per_sec(
    threads: usize,
    total: Duration,
    ours: impl Fn() + Sync,
    baseline: impl Fn() + Sync,
) -> (f64, f64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let measure = |f: &(dyn Fn() + Sync), slice: Duration| -> (u64, Duration) {
        let count = AtomicU64::new(0);
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    while start.elapsed() < slice {
                        f();
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        (count.into_inner(), start.elapsed())
    };
    let rounds = 6;
    let slice = total / (2 * rounds);
    let (mut n_ours, mut t_ours, mut n_base, mut t_base) =
        (0u64, Duration::ZERO, 0u64, Duration::ZERO);
    for _ in 0..rounds {
        let (n, t) = measure(&baseline, slice);
        n_base += n;
        t_base += t;
        let (n, t) = measure(&ours, slice);
        n_ours += n;
        t_ours += t;
    }
    (
        n_ours as f64 / t_ours.as_secs_f64(),
        n_base as f64 / t_base.as_secs_f64(),
    )
}

/// Prints the table and writes `<AGENTRY_BENCH_OUT or target/bench>/<area>.json`.
pub fn write(area: &str, rows: &[Row]) {
    println!("\n{area}");
    println!(
        "{:<28} {:>14} {:>14} {:>8}  {:<10} baseline",
        "name", "ours", "baseline", "ratio", "target"
    );
    for r in rows {
        println!(
            "{:<28} {:>14.1} {:>14.1} {:>8.3}  {:<10} {}",
            r.name, r.ours, r.baseline, r.ratio, r.target, r.baseline_is
        );
        for (k, v) in &r.extra {
            println!("{:<28} {k} = {v:.1}", "");
        }
    }
    let results: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::json!({
                "name": r.name, "ours": r.ours, "baseline": r.baseline, "unit": r.unit,
                "ratio": (r.ratio * 1000.0).round() / 1000.0, "baseline_is": r.baseline_is, "target": r.target,
            });
            for (k, x) in &r.extra {
                v[*k] = serde_json::json!(x);
            }
            v
        })
        .collect();
    let dir = std::env::var("AGENTRY_BENCH_OUT").unwrap_or_else(|_| "target/bench".into());
    std::fs::create_dir_all(&dir).expect("creating the bench output directory");
    let path = format!("{dir}/{area}.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({"area": area, "results": results}))
            .unwrap(),
    )
    .expect("writing the bench report");
    println!("wrote {path}");
}
