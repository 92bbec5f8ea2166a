//! The table tests/memscan.rs prints: one row per (phase, process), one column per key form.
//! Rows go straight to the test's stderr as they are scanned (not through `eprintln!`, which
//! the test harness captures on success), so the table is visible in every run, and a phase
//! that fails half-way still leaves the rows before it.

use std::fmt::Write as _;
use std::io::Write as _;

use super::scan::{Kind, Report};

pub struct Row {
    pub phase: String,
    /// "agent", "worker demo", "open --foreground", …
    pub process: String,
    pub report: Report,
}

#[derive(Default)]
pub struct Table {
    pub rows: Vec<Row>,
}

impl Table {
    pub fn add(&mut self, phase: &str, process: &str, report: Report) {
        let row = Row {
            phase: phase.into(),
            process: process.into(),
            report,
        };
        if self.rows.is_empty() {
            say(&header());
        }
        say(&line(&row));
        self.rows.push(row);
    }

    pub fn render(&self) -> String {
        let mut s = header();
        for r in &self.rows {
            s.push_str(&line(r));
        }
        s.push_str(&self.footer());
        s
    }

    /// Which mappings could not be read, per process (secret memory should be among them for
    /// every process holding the key).
    pub fn footer(&self) -> String {
        let mut seen = std::collections::BTreeMap::<&str, std::collections::BTreeSet<&str>>::new();
        for r in &self.rows {
            let set = seen.entry(r.process.as_str()).or_default();
            set.extend(r.report.refused.iter().map(String::as_str));
        }
        let mut s = String::from("unreadable mappings (skipped):\n");
        for (process, names) in seen {
            let names: Vec<&str> = names.into_iter().collect();
            let _ = writeln!(s, "  {process}: {}", names.join(", "));
        }
        s
    }

    /// Rows with any copy, with where the copies are.
    pub fn leaks(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| r.report.total() > 0)
            .map(|r| {
                format!(
                    "{} / {} (pid {}): {}",
                    r.phase,
                    r.process,
                    r.report.pid,
                    r.report.places_text()
                )
            })
            .collect()
    }
}

fn header() -> String {
    let mut s = format!(
        "\n{:<26} {:<28} {:>8} {:>11}",
        "phase", "process (pid)", "MiB read", "KiB refused"
    );
    for k in Kind::ALL {
        let _ = write!(s, " {:>9}", k.label());
    }
    s.push('\n');
    s
}

fn line(r: &Row) -> String {
    let mut s = format!(
        "{:<26} {:<28} {:>8.1} {:>11}",
        r.phase,
        format!("{} ({})", r.process, r.report.pid),
        r.report.bytes_read as f64 / (1 << 20) as f64,
        r.report.bytes_refused / 1024,
    );
    for k in Kind::ALL {
        let _ = write!(s, " {:>9}", r.report.count(k));
    }
    s.push('\n');
    s
}

/// Writes to the real stderr, past the harness's output capture.
pub fn say(text: &str) {
    let mut e = std::io::stderr().lock();
    let _ = e.write_all(text.as_bytes());
    let _ = e.flush();
}
