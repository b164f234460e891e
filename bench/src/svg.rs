//! Hand-written SVG: grouped bar charts of the tracking benchmark.

use std::fmt::Write;

use serde_json::Value;

pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub values: Vec<Option<f64>>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub y_label: &'a str,
    pub groups: Vec<String>,
    pub series: Vec<Series<'a>>,
    /// Horizontal reference lines: (value, label, color).
    pub lines: Vec<(f64, String, &'a str)>,
    pub log: bool,
}

const W: f64 = 960.0;
const H: f64 = 300.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn nice_ticks(lo: f64, hi: f64, log: bool) -> Vec<f64> {
    if log {
        let mut t = Vec::new();
        let mut v = 10f64.powf(lo.log10().floor());
        while v <= hi * 1.0001 {
            for m in [1.0, 2.0, 5.0] {
                let x = v * m;
                if x >= lo * 0.9999 && x <= hi * 1.0001 {
                    t.push(x);
                }
            }
            v *= 10.0;
        }
        t
    } else {
        let span = (hi - lo).max(1e-9);
        let raw = span / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .into_iter()
            .map(|m| m * mag)
            .find(|s| span / s <= 6.0)
            .unwrap_or(10.0 * mag);
        let mut t = Vec::new();
        let mut v = (lo / step).ceil() * step;
        while v <= hi + 1e-9 {
            t.push(v);
            v += step;
        }
        t
    }
}

fn fmt_tick(v: f64) -> String {
    if v >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Render `chart` at vertical offset `y0`; returns SVG elements.
pub fn chart(c: &Chart, y0: f64) -> String {
    let mut s = String::new();
    let vals: Vec<f64> = c
        .series
        .iter()
        .flat_map(|s| s.values.iter().flatten().copied())
        .chain(c.lines.iter().map(|l| l.0))
        .filter(|v| v.is_finite() && (!c.log || *v > 0.0))
        .collect();
    let (mut lo, mut hi) = if c.log { (1.0, 2.0) } else { (0.0, 1.0) };
    if !vals.is_empty() {
        let max = vals.iter().copied().fold(f64::MIN, f64::max);
        let min = vals.iter().copied().fold(f64::MAX, f64::min);
        if c.log {
            lo = 10f64.powf(min.log10().floor()).min(1.0);
            hi = 10f64.powf(max.log10().ceil());
            if hi <= lo {
                hi = lo * 10.0;
            }
        } else {
            hi = max * 1.15;
        }
    }
    let ph = H - TOP - BOTTOM;
    let pw = W - LEFT - RIGHT;
    let y_of = |v: f64| -> f64 {
        let f = if c.log {
            (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10())
        } else {
            (v - lo) / (hi - lo)
        };
        y0 + TOP + ph * (1.0 - f.clamp(0.0, 1.0))
    };
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        LEFT,
        y0 + 20.0,
        esc(c.title)
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16,{}) rotate(-90)" font-size="12" text-anchor="middle">{}</text>"#,
        y0 + TOP + ph / 2.0,
        esc(c.y_label)
    );
    for t in nice_ticks(lo, hi, c.log) {
        let y = y_of(t);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 5.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    let n = c.groups.len().max(1) as f64;
    let gw = pw / n;
    let k = c.series.len().max(1) as f64;
    let bw = gw * 0.8 / k;
    for (g, label) in c.groups.iter().enumerate() {
        let gx = LEFT + g as f64 * gw;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
            gx + gw / 2.0,
            y0 + H - BOTTOM + 16.0,
            esc(label)
        );
        for (i, ser) in c.series.iter().enumerate() {
            let Some(v) = ser.values.get(g).copied().flatten() else {
                continue;
            };
            if !v.is_finite() {
                continue;
            }
            let x = gx + gw * 0.1 + i as f64 * bw;
            let y = y_of(v);
            let base = y_of(lo);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect>"#,
                bw * 0.95,
                (base - y).max(0.5),
                ser.color,
                esc(ser.name),
                fmt_val(v)
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>"#,
                x + bw * 0.475,
                y - 2.0,
                fmt_val(v)
            );
        }
    }
    // Reference lines; their labels are pushed apart when they would overlap.
    let mut lines: Vec<(f64, &String, &str)> = c
        .lines
        .iter()
        .filter(|l| l.0.is_finite())
        .map(|(v, l, col)| (y_of(*v), l, *col))
        .collect();
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut last_label_y = f64::MIN;
    for (y, label, color) in lines {
        let label_y = (y + 4.0).max(last_label_y + 13.0);
        last_label_y = label_y;
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="{color}" stroke-dasharray="6 3"/><text x="{}" y="{:.1}" font-size="11" fill="{color}">{}</text>"#,
            LEFT + pw,
            LEFT + pw + 5.0,
            label_y,
            esc(label)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#,
        y0 + TOP
    );
    for (i, ser) in c.series.iter().enumerate() {
        let y = y0 + TOP + 10.0 + i as f64 * 16.0;
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}" font-size="11">{}</text>"#,
            LEFT + pw + 8.0,
            y - 9.0,
            ser.color,
            LEFT + pw + 22.0,
            y,
            esc(ser.name)
        );
    }
    s
}

fn fmt_val(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A stack of charts as one SVG document.
pub fn document(title: &str, charts: &[Chart]) -> String {
    let total = 40.0 + H * charts.len() as f64;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{total}" viewBox="0 0 {W} {total}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" font-size="17" font-weight="bold" text-anchor="middle">{}</text>
"#,
        W / 2.0,
        esc(title)
    );
    for (i, c) in charts.iter().enumerate() {
        s.push_str(&chart(c, 40.0 + H * i as f64));
    }
    s.push_str("</svg>\n");
    s
}

/// The tracking benchmark's plot, from its JSON report.
pub fn tracking_plot(report: &Value) -> String {
    let results = report["results"].as_array().cloned().unwrap_or_default();
    let mut groups: Vec<(u64, f64)> = Vec::new();
    for r in &results {
        let key = (
            r["resident_mib"].as_u64().unwrap_or(0),
            r["frac"].as_f64().unwrap_or(0.0),
        );
        if !groups.contains(&key) {
            groups.push(key);
        }
    }
    let labels: Vec<String> = groups
        .iter()
        .map(|(mib, f)| {
            let size = if mib % 1024 == 0 {
                format!("{} GiB", mib / 1024)
            } else {
                format!("{mib} MiB")
            };
            format!("{size}, {}%", f * 100.0)
        })
        .collect();
    let get = |mode: &str, key: &str| -> Vec<Option<f64>> {
        groups
            .iter()
            .map(|&(mib, f)| {
                results
                    .iter()
                    .find(|r| {
                        r["resident_mib"].as_u64() == Some(mib)
                            && r["frac"].as_f64() == Some(f)
                            && r["mode"].as_str() == Some(mode)
                    })
                    .and_then(|r| r[key].as_f64())
            })
            .collect()
    };
    let modes = [
        ("uffd-ebpf", "uffd-wp + eBPF", "#1f77b4"),
        ("uffd-noebpf", "uffd-wp, --no-ebpf", "#2ca02c"),
        ("full", "full copy", "#ff7f0e"),
    ];
    let series = |key: &str, which: &[usize]| -> Vec<Series<'static>> {
        which
            .iter()
            .map(|&i| Series {
                name: modes[i].1,
                color: modes[i].2,
                values: get(modes[i].0, key),
            })
            .collect()
    };
    let floor = report["floor"]["measured_us"].as_f64().unwrap_or(f64::NAN);
    let design = report["floor"]["design_us"].as_f64().unwrap_or(1.15);
    let machine = &report["machine"];
    let title = format!(
        "tern: cost of dirty tracking ({}, {} cores, Linux {}; rounds every {} ms)",
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["kernel"].as_str().unwrap_or("?"),
        report["params"]["period_ms"]
    );
    let charts = vec![
        Chart {
            title: "Slowdown of the workload (untracked throughput / tracked throughput)",
            y_label: "slowdown (x, log)",
            groups: labels.clone(),
            series: series("slowdown", &[0, 1, 2]),
            lines: vec![(1.0, "untracked".into(), "#555")],
            log: true,
        },
        Chart {
            title: "Cost per tracked first write (lost time / pages written)",
            y_label: "us per first write",
            groups: labels.clone(),
            series: series("cost_per_first_write_us", &[0, 1]),
            lines: vec![
                (floor, format!("floor here {floor:.2} us"), "#d62728"),
                (design * 1.2, format!("1.2 x {design} us"), "#9467bd"),
            ],
            log: false,
        },
        Chart {
            title: "Scan + copy time per pre-dump round (tern's duration_ms, median)",
            y_label: "ms per round (log)",
            groups: labels,
            series: series("round_duration_ms", &[0, 1, 2]),
            lines: vec![],
            log: true,
        },
    ];
    document(&title, &charts)
}
