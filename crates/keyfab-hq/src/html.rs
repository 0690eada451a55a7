//! The HTML report: one self-contained file (inline CSS and SVG, no script, nothing
//! fetched), readable offline. Charts per entitlement: devices per day against the daily
//! limit, quota consumption, refusals by code; a table per site; the violations.

use crate::report::{EntitlementReport, Report};
use std::fmt::Write;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Bars of devices per day, with the daily limit as a line.
fn days_chart(e: &EntitlementReport) -> String {
    let days: Vec<(&String, &u64)> = e
        .days
        .iter()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if days.is_empty() {
        return "<p class=\"muted\">No devices yet.</p>".into();
    }
    let (w, h, pad) = (640.0f64, 160.0f64, 24.0f64);
    let max = days
        .iter()
        .map(|(_, n)| **n)
        .max()
        .unwrap_or(1)
        .max(e.daily_limit.unwrap_or(0))
        .max(1) as f64;
    // One slot per day, at most 40 px wide, so a few days do not fill the chart.
    let bw = ((w - 2.0 * pad) / days.len() as f64).min(40.0);
    let mut svg = format!(
        "<svg viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"devices per day\">",
        h + 20.0
    );
    for (i, (day, n)) in days.iter().enumerate() {
        let bh = (**n as f64 / max) * (h - pad);
        let x = pad + i as f64 * bw;
        let over = e.daily_limit_on(day).is_some_and(|l| **n > l);
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" class=\"{}\"><title>{} : {n}</title></rect>",
            h - bh,
            (bw - 2.0).max(1.0),
            if over { "bar over" } else { "bar" },
            esc(day)
        );
        if bw >= 18.0 {
            let _ = write!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"label\" text-anchor=\"middle\">{n}</text>",
                x + bw / 2.0 - 1.0,
                h - bh - 3.0
            );
        }
    }
    if let Some(limit) = e.daily_limit {
        let y = h - (limit as f64 / max) * (h - pad);
        let _ = write!(svg, "<line x1=\"{pad}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" class=\"limit\"/><text x=\"{}\" y=\"{:.1}\" class=\"label\">daily limit {limit}</text>", w - pad, w - pad - 90.0, y - 4.0);
    }
    let _ = write!(svg, "<text x=\"{pad}\" y=\"{}\" class=\"label\">{}</text><text x=\"{}\" y=\"{}\" class=\"label\">{}</text></svg>", h + 16.0, esc(days[0].0), pad + (days.len() - 1) as f64 * bw, h + 16.0, if days.len() > 1 { esc(days[days.len() - 1].0) } else { String::new() });
    svg
}

fn quota_bar(e: &EntitlementReport) -> String {
    let q = e.quota.max(1) as f64;
    let used = e.released as f64 / q * 100.0;
    let destroyed = e.destroyed as f64 / q * 100.0;
    format!(
        "<div class=\"quota\" title=\"{} released, {} destroyed, {} unused of {}\"><span class=\"used\" style=\"width:{used:.2}%\"></span><span class=\"destroyed\" style=\"width:{destroyed:.2}%\"></span></div><p class=\"muted\">{} of {} released ({used:.1}%), {} destroyed, {} unused</p>",
        e.released, e.destroyed, e.unused, e.quota, e.released, e.quota, e.destroyed, e.unused
    )
}

fn refusals_chart(e: &EntitlementReport) -> String {
    if e.refusals.is_empty() {
        return "<p class=\"muted\">No refusals.</p>".into();
    }
    let max = e.refusals.values().copied().max().unwrap_or(1).max(1) as f64;
    let mut out = String::from("<table class=\"refusals\">");
    for (code, n) in &e.refusals {
        let _ = write!(
            out,
            "<tr><td>{}</td><td><span class=\"hbar\" style=\"width:{:.0}px\"></span> {n}</td></tr>",
            esc(code),
            *n as f64 / max * 240.0
        );
    }
    out.push_str("</table>");
    out
}

/// The report as one self-contained HTML page.
pub fn render(r: &Report, hq: &str, generated: &str) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>keyfab report — {hq}</title><style>\
         body{{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}}h1{{font-size:20px}}h2{{font-size:17px;margin-top:2em}}\
         table{{border-collapse:collapse}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}}\
         .muted{{color:#777}}.bar{{fill:#4a7bd0}}.bar.over{{fill:#d0494a}}.limit{{stroke:#d0494a;stroke-dasharray:4 3}}\
         .label{{font-size:11px;fill:#555}}.quota{{width:640px;height:16px;background:#eee;display:flex}}\
         .quota .used{{background:#4a7bd0}}.quota .destroyed{{background:#aaa}}.hbar{{display:inline-block;height:10px;background:#d08b4a}}\
         .bad{{color:#b00;font-weight:600}}svg{{width:640px;max-width:100%}}\
         </style></head><body><h1>keyfab report — HQ {}</h1><p class=\"muted\">generated {}</p>",
        esc(hq),
        esc(generated)
    );
    let mut sites: Vec<&str> = r.entitlements.iter().map(|e| e.site.as_str()).collect();
    sites.dedup();
    for site in sites {
        let _ = write!(html, "<h2>Site {}</h2><table><tr><th>entitlement</th><th>product</th><th>today / limit</th><th>total / quota</th><th>programmed / failed</th><th>refusals</th><th>violations</th></tr>", esc(site));
        for e in r.entitlements.iter().filter(|e| e.site == site) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{} / {}</td><td>{} / {}</td><td>{} / {}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                esc(&e.entitlement),
                esc(&e.product),
                e.today,
                e.daily_limit.map_or("-".into(), |d| d.to_string()),
                e.released,
                e.quota,
                e.confirmed,
                e.burned,
                e.refusals.values().sum::<u64>(),
                if e.violations > 0 { "bad" } else { "" },
                e.violations
            );
        }
        html.push_str("</table>");
        for e in r.entitlements.iter().filter(|e| e.site == site) {
            let _ = write!(
                html,
                "<h3>{} — {}{}</h3><h4>Devices per day <span class=\"muted\">(days in {})</span></h4>{}<h4>Quota</h4>{}<h4>Refusals by code</h4>{}",
                esc(&e.product),
                esc(&e.entitlement),
                if e.revoked { " (revoked)" } else { "" },
                esc(&e.timezone),
                days_chart(e),
                quota_bar(e),
                refusals_chart(e)
            );
        }
    }
    html.push_str("<h2>Violations</h2>");
    if r.violations.is_empty() {
        html.push_str("<p>None: every decision in the sites' logs is one the policy allows.</p>");
    } else {
        html.push_str("<table><tr><th>site</th><th>record</th><th>kind</th><th>device</th><th>detail</th></tr>");
        for v in &r.violations {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td class=\"bad\">{}</td><td>{}</td><td>{}</td></tr>",
                esc(&v.site),
                v.sequence,
                esc(v.kind.as_str()),
                esc(v.device_id.as_deref().unwrap_or("")),
                esc(&v.detail)
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>\n");
    html
}
