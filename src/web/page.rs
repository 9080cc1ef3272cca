//! The status page: what `outpost status` says, the oldest mail in the
//! queue with each recipient's last reply, and the last 24 hours of queue
//! depth and link state as an inline SVG. One HTML document, inline CSS,
//! no script, no outside asset. Everything that came from a peer (addresses,
//! replies, errors) is escaped; the queue table is cut at [`MAX_ROWS`].

use std::fmt::Write as _;

use crate::cli::status::{age, rfc3339, transfer_line, Status};
use crate::queue::{LinkState, RecipientState, Sample, StoreError};
use crate::shared::Shared;

/// Messages listed at most; the rest are counted.
pub const MAX_ROWS: usize = 100;
/// What the picture covers.
const DAY: i64 = 24 * 3600;
/// Samples further apart than this leave a gap (the daemon was not running).
const GAP: i64 = 3 * 60;

/// HTML-escapes `s` for text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters from a peer show as U+FFFD.
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// The whole page, read from the store now.
pub fn render(shared: &Shared) -> Result<String, StoreError> {
    let config = shared.config();
    let store = &shared.store;
    let logins = shared.logins.report(std::time::Instant::now());
    let status = Status::gather(&config, store, Some(logins))?;
    let (queue, total) = store.oldest_pending(MAX_ROWS)?;
    let samples = store.samples(status.now - DAY)?;
    let mut h = String::with_capacity(32 * 1024);
    let host = esc(&config.hostname);
    let _ = write!(
        h,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="60">
<title>outpost {host}</title>
<style>{CSS}</style></head>
<body>
<h1>outpost <span class="host">{host}</span></h1>
<p class="asof">as of <time id="now" datetime="{now}">{now}</time>; refreshed every minute. Metrics for Prometheus: <a href="/metrics">/metrics</a></p>
"#,
        now = rfc3339(status.now),
    );
    summary(&mut h, &status, &config);
    h.push_str("<h2>The last 24 hours</h2>\n");
    let depth = pending(&status);
    h.push_str(&chart(
        &samples,
        status.now,
        depth,
        status.link.state,
        status.link.since,
    ));
    queue_table(&mut h, &queue, total, status.now);
    h.push_str("</body></html>\n");
    Ok(h)
}

fn pending(s: &Status) -> i64 {
    s.counts.count(RecipientState::Queued)
        + s.counts.count(RecipientState::Deferred)
        + s.counts.count(RecipientState::Held)
}

/// `outpost status`, as a table.
fn summary(h: &mut String, s: &Status, config: &crate::config::Config) {
    let now = s.now;
    let row = |h: &mut String, label: &str, html: String| {
        let _ = writeln!(h, "<tr><th>{label}</th><td>{html}</td></tr>");
    };
    h.push_str("<table class=\"status\">\n");
    let state = s.link.state.as_str();
    row(
        h,
        "link",
        format!(
            r#"<span id="link-state" class="state {state}">{state}</span> since <time id="link-since" datetime="{since}">{since}</time> ({ago} ago)"#,
            since = rfc3339(s.link.since),
            ago = age(now - s.link.since),
        ),
    );
    if let Some(e) = &s.link.last_error {
        let label = if s.link.state == LinkState::Closed {
            "closed"
        } else {
            "last error"
        };
        row(
            h,
            label,
            format!("<span id=\"link-error\">{}</span>", esc(e)),
        );
    }
    if s.waiting.total() > 0 {
        let mut why = Vec::new();
        for (n, what) in [
            (s.waiting.window, "flush.windows"),
            (s.waiting.large_window, "flush.large_message_window"),
            (s.waiting.budget, "flush.daily_byte_budget"),
        ] {
            if n > 0 {
                why.push(format!("{n} for {what}"));
            }
        }
        let next = s
            .gate_change
            .map(|t| format!(" (next change {})", t.format("%Y-%m-%d %H:%M")))
            .unwrap_or_default();
        row(h, "waiting", format!("{}{next}", why.join(", ")));
    }
    for t in &s.transfers {
        row(h, "transfer", esc(&transfer_line(t, now)));
    }
    if config.flush.daily_byte_budget > 0 {
        row(
            h,
            "budget",
            format!(
                "<span id=\"budget-sent\">{}</span> of {} octets sent today",
                s.sent_today, config.flush.daily_byte_budget
            ),
        );
    }
    match s.link.last_flush_at {
        Some(at) => row(
            h,
            "last flush",
            format!(
                "{} ({} ago): {}",
                rfc3339(at),
                age(now - at),
                esc(s.link.last_flush_result.as_deref().unwrap_or(""))
            ),
        ),
        None => row(h, "last flush", "never".into()),
    }
    let mut queue = format!(
        r#"<span id="count-queued">{}</span> queued, <span id="count-deferred">{}</span> deferred, <span id="count-held">{}</span> held"#,
        s.counts.count(RecipientState::Queued),
        s.counts.count(RecipientState::Deferred),
        s.counts.count(RecipientState::Held),
    );
    if s.counts.uncertain > 0 {
        let _ = write!(
            queue,
            " (<span id=\"count-uncertain\">{}</span> delivery uncertain)",
            s.counts.uncertain
        );
    }
    row(h, "queue", queue);
    row(
        h,
        "oldest",
        match s.oldest_age {
            Some(a) => format!("<span id=\"oldest\" data-seconds=\"{a}\">{}</span>", age(a)),
            None => "<span id=\"oldest\" data-seconds=\"\">(queue empty)</span>".into(),
        },
    );
    if let (Some(at), Some(result)) = (s.etrn.0, &s.etrn.1) {
        row(
            h,
            "last ETRN",
            format!("{} ({} ago): {}", rfc3339(at), age(now - at), esc(result)),
        );
    }
    for d in &s.held {
        row(
            h,
            "held",
            format!(
                "{} messages for {} (last asked {})",
                d.messages,
                esc(&d.domain),
                d.last_asked
                    .map(|t| format!("{} ago", age(now - t)))
                    .unwrap_or_else(|| "never".into())
            ),
        );
    }
    if let Some(r) = &s.logins {
        if r.blocked.is_empty() {
            row(h, "logins", "no client blocked".into());
        }
        for b in &r.blocked {
            row(
                h,
                "blocked",
                format!(
                    "{} after {} failed logins (for {} more)",
                    esc(&b.client),
                    b.failures,
                    age(b.seconds_left as i64)
                ),
            );
        }
        for a in &r.accounts_under_attack {
            row(
                h,
                "attacked",
                format!(
                    "account {}: {} failed logins from several clients",
                    esc(&a.account),
                    a.failures
                ),
            );
        }
    }
    row(
        h,
        "next flush",
        match s.next_flush {
            Some(t) if t <= now => "now (mail is due)".into(),
            Some(t) => format!("{} (in {})", rfc3339(t), age(t - now)),
            None => "on <code>outpost flush</code> only (no flush.interval)".into(),
        },
    );
    row(
        h,
        "store",
        format!(
            "{} {} + {} WAL ({} free inside)",
            esc(&config.store.path.display().to_string()),
            mib(s.disk.size_bytes),
            mib(s.disk.wal_bytes),
            mib(s.disk.free_bytes)
        ),
    );
    h.push_str("</table>\n");
}

fn mib(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// The oldest messages first, each recipient with its state and last reply.
fn queue_table(h: &mut String, queue: &[crate::queue::MessageSummary], total: i64, now: i64) {
    let _ = writeln!(
        h,
        "<h2>Queue: <span id=\"queue-total\">{total}</span> message{}</h2>",
        if total == 1 { "" } else { "s" }
    );
    if queue.is_empty() {
        h.push_str("<p>Nothing waits.</p>\n");
        return;
    }
    h.push_str("<table class=\"queue\" id=\"queue\">\n<thead><tr><th>id</th><th>age</th><th>size</th><th>sender</th><th>recipient</th><th>state</th><th>attempts</th><th>last reply</th></tr></thead>\n<tbody>\n");
    for m in queue {
        let n = m.recipients.len().max(1);
        for (i, r) in m.recipients.iter().enumerate() {
            h.push_str("<tr>");
            if i == 0 {
                let sender = if m.sender.is_empty() {
                    "&lt;&gt;".to_string()
                } else {
                    esc(&m.sender)
                };
                let _ = write!(
                    h,
                    "<td rowspan=\"{n}\" class=\"id\">{}</td><td rowspan=\"{n}\" class=\"num\">{}</td><td rowspan=\"{n}\" class=\"num\">{}</td><td rowspan=\"{n}\">{sender}</td>",
                    esc(&m.id),
                    age(now - m.received_at),
                    mib(m.size.max(0) as u64),
                );
            }
            let state = r.state.as_str();
            let _ = writeln!(
                h,
                "<td>{}</td><td class=\"state {state}\">{state}</td><td>{}</td><td class=\"reply\">{}</td></tr>",
                esc(&r.address),
                r.attempts,
                esc(r.last_reply.as_deref().unwrap_or("")),
            );
        }
    }
    h.push_str("</tbody></table>\n");
    let more = total - queue.len() as i64;
    if more > 0 {
        let _ = writeln!(
            h,
            "<p id=\"queue-more\">and {more} more (<code>outpost queue list</code> shows them all)</p>"
        );
    }
}

const W: f64 = 960.0;
const PLOT_TOP: f64 = 10.0;
const PLOT_H: f64 = 160.0;
const LEFT: f64 = 50.0;
const BAND_Y: f64 = 186.0;
const BAND_H: f64 = 16.0;
const H: f64 = 240.0;

fn link_color(s: LinkState) -> &'static str {
    match s {
        LinkState::Up => "#2e7d32",
        LinkState::Down => "#c62828",
        LinkState::Closed => "#9e9e9e",
        LinkState::Unknown => "#cfd8dc",
    }
}

/// Queue depth (pending recipients) as a step line and the link's state as
/// a band, over the 24 hours before `now`. `samples` are the recorded
/// ones; the current depth and link state end the picture, and the link's
/// current state is drawn from `link_since` even where no sample was taken.
pub fn chart(
    samples: &[Sample],
    now: i64,
    depth_now: i64,
    link_now: LinkState,
    link_since: i64,
) -> String {
    let start = now - DAY;
    let plot_w = W - LEFT - 10.0;
    let x = |t: i64| LEFT + ((t - start).clamp(0, DAY) as f64 / DAY as f64) * plot_w;
    let mut points: Vec<(i64, i64, LinkState)> = samples
        .iter()
        .filter(|s| s.at >= start && s.at <= now)
        .map(|s| (s.at, s.queued + s.deferred + s.held, s.link))
        .collect();
    points.push((now, depth_now, link_now));
    let max = points.iter().map(|p| p.1).max().unwrap_or(0).max(1);
    // A round top for the scale: 1, 2, 5, 10, 20, 50...
    let mut top = 1;
    while top < max {
        top = match top.to_string().as_bytes()[0] {
            b'1' => top * 2,
            b'2' => top * 5 / 2,
            _ => top * 2,
        };
    }
    let y = |v: i64| PLOT_TOP + PLOT_H - (v as f64 / top as f64) * PLOT_H;
    let mut svg = String::with_capacity(16 * 1024);
    let _ = write!(
        svg,
        r##"<svg id="history" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="Queue depth and link state over the last 24 hours" data-samples="{n}" data-max="{max}">
<rect x="{LEFT}" y="{PLOT_TOP}" width="{plot_w}" height="{PLOT_H}" fill="#fafafa" stroke="#ddd"/>
"##,
        n = samples.len(),
    );
    // Grid: the scale's top and middle, and every 3 hours.
    for v in [top, top / 2] {
        if v == 0 {
            continue;
        }
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{r}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e0e0e0"/><text x="{lx}" y="{ty:.1}" class="axis" text-anchor="end">{v}</text>"##,
            r = LEFT + plot_w,
            yy = y(v),
            lx = LEFT - 6.0,
            ty = y(v) + 4.0,
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{lx}" y="{ty:.1}" class="axis" text-anchor="end">0</text>"##,
        lx = LEFT - 6.0,
        ty = y(0) + 4.0,
    );
    for h in (0..=24).step_by(3) {
        let t = start + h * 3600;
        let xx = x(t);
        let label = if h == 24 {
            "now".to_string()
        } else {
            format!("-{}h", 24 - h)
        };
        let _ = writeln!(
            svg,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{PLOT_TOP}" y2="{b}" stroke="#eee"/><text x="{xx:.1}" y="{ty}" class="axis" text-anchor="middle">{label}</text>"##,
            b = BAND_Y + BAND_H,
            ty = BAND_Y + BAND_H + 16.0,
        );
    }
    // The link band: the current state since it began, then each sample
    // until the next (a gap where none was taken).
    let _ = writeln!(
        svg,
        r##"<text x="{lx}" y="{ty}" class="axis" text-anchor="end">link</text>"##,
        lx = LEFT - 6.0,
        ty = BAND_Y + BAND_H - 4.0,
    );
    // Runs of one state are one rectangle.
    let mut runs: Vec<(i64, i64, LinkState)> = Vec::new();
    let mut band = |from: i64, to: i64, s: LinkState| {
        if to <= from || to <= start {
            return;
        }
        match runs.last_mut() {
            Some(last) if last.2 == s && last.1 >= from => last.1 = last.1.max(to),
            _ => runs.push((from, to, s)),
        }
    };
    for pair in points.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let end = if b.0 - a.0 > GAP { a.0 + 60 } else { b.0 };
        band(a.0, end.min(link_since.max(a.0)), a.2);
    }
    band(link_since.max(start), now, link_now);
    for (from, to, s) in runs {
        let (x0, x1) = (x(from), x(to));
        let _ = writeln!(
            svg,
            r##"<rect class="link {s}" x="{x0:.1}" y="{BAND_Y}" width="{w:.1}" height="{BAND_H}" fill="{c}"><title>link {s}</title></rect>"##,
            s = s.as_str(),
            w = (x1 - x0).max(0.5),
            c = link_color(s),
        );
    }
    // The depth: a step line, broken at gaps.
    let mut path = String::new();
    let mut pen_down = false;
    let mut last_v = None;
    for (i, p) in points.iter().enumerate() {
        let (t, v) = (p.0, p.1);
        if !pen_down {
            let _ = write!(path, "M{:.1},{:.1} ", x(t), y(v));
            pen_down = true;
        } else if last_v != Some(v) {
            let _ = write!(path, "V{:.1} ", y(v));
        }
        last_v = Some(v);
        match points.get(i + 1) {
            Some(next) if next.0 - t > GAP => {
                let _ = write!(path, "H{:.1} ", x(t + 60));
                pen_down = false;
            }
            // The level goes on: one H for the whole run.
            Some(next) if next.1 == v => {}
            Some(next) => {
                let _ = write!(path, "H{:.1} ", x(next.0));
            }
            None => {
                let _ = write!(path, "H{:.1} ", x(t));
            }
        }
    }
    let _ = writeln!(
        svg,
        r##"<path id="depth" d="{}" fill="none" stroke="#1565c0" stroke-width="2"/>"##,
        path.trim_end()
    );
    let _ = writeln!(
        svg,
        r##"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="#1565c0"><title>now: {depth_now} recipients waiting</title></circle>"##,
        x(now),
        y(depth_now),
    );
    // The legend.
    let ly = H - 4.0;
    let _ = writeln!(
        svg,
        r##"<g class="legend"><line x1="{LEFT}" x2="{l2}" y1="{m}" y2="{m}" stroke="#1565c0" stroke-width="2"/><text x="{t1}" y="{ly}">recipients waiting</text>"##,
        l2 = LEFT + 20.0,
        m = ly - 4.0,
        t1 = LEFT + 26.0,
    );
    let mut lx = LEFT + 170.0;
    for s in [
        LinkState::Up,
        LinkState::Down,
        LinkState::Closed,
        LinkState::Unknown,
    ] {
        let _ = write!(
            svg,
            r##"<rect x="{lx}" y="{ry}" width="12" height="10" fill="{c}"/><text x="{tx}" y="{ly}">link {s}</text>"##,
            ry = ly - 9.0,
            c = link_color(s),
            tx = lx + 16.0,
            s = s.as_str(),
        );
        lx += 100.0;
    }
    svg.push_str("</g>\n</svg>\n");
    if samples.is_empty() {
        svg.push_str("<p class=\"note\">No samples yet: the picture fills in as the daemon records the queue every minute.</p>\n");
    }
    svg
}

const CSS: &str = "
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:1.5em auto;max-width:1000px;color:#222;padding:0 1em}
h1{font-size:1.5em;margin:0 0 .2em}h1 .host{color:#555;font-weight:normal}
h2{font-size:1.15em;margin:1.4em 0 .5em}
.asof{color:#666;margin:0 0 1em}
table{border-collapse:collapse}
table.status th{text-align:left;padding:.2em 1.2em .2em 0;color:#555;font-weight:600;vertical-align:top;white-space:nowrap}
table.status td{padding:.2em 0}
table.queue{width:100%;font-size:13px}
table.queue th,table.queue td{border-bottom:1px solid #e5e5e5;padding:.3em .5em;text-align:left;vertical-align:top}
table.queue th{background:#f3f3f3}
td.id{font-family:ui-monospace,monospace}
td.num{white-space:nowrap}
td.reply{font-family:ui-monospace,monospace;font-size:12px;color:#444;word-break:break-word}
.state{font-weight:600}
.state.up{color:#2e7d32}.state.down{color:#c62828}.state.closed,.state.unknown{color:#757575}
.state.deferred{color:#ef6c00}.state.held{color:#6a1b9a}.state.queued{color:#1565c0}
svg{display:block;max-width:100%;height:auto}
svg text{font:11px system-ui,sans-serif;fill:#444}
.note{color:#666}
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_text_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(esc("a\u{1b}[31mb"), "a\u{fffd}[31mb");
    }

    #[test]
    fn the_chart_has_a_line_a_band_and_gaps() {
        let now = 100_000;
        let s = |at, queued, link| Sample {
            at,
            queued,
            deferred: 0,
            held: 0,
            link,
        };
        let samples = vec![
            s(now - 3600, 3, LinkState::Down),
            s(now - 3540, 5, LinkState::Down),
            // Nothing for most of an hour: a gap.
            s(now - 120, 2, LinkState::Up),
            s(now - 60, 2, LinkState::Up),
        ];
        let svg = chart(&samples, now, 1, LinkState::Up, now - 120);
        assert!(svg.starts_with("<svg id=\"history\""), "{svg}");
        assert!(svg.contains("data-samples=\"4\""), "{svg}");
        assert!(svg.contains("data-max=\"5\""), "{svg}");
        assert!(svg.contains("class=\"link down\""), "{svg}");
        assert!(svg.contains("class=\"link up\""), "{svg}");
        let d = svg.split("id=\"depth\" d=\"").nth(1).unwrap();
        let d = &d[..d.find('"').unwrap()];
        // Two runs: before and after the gap.
        assert_eq!(d.matches('M').count(), 2, "{d}");
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn an_empty_history_says_so() {
        let svg = chart(&[], 100_000, 0, LinkState::Unknown, 0);
        assert!(svg.contains("No samples yet"), "{svg}");
        assert!(svg.contains("class=\"link unknown\""), "{svg}");
    }
}
