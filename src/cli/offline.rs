//! Offline commands: format, header, probe, rewrap, benchmark. (Owned by the format/XTS work.)

use std::path::Path;

use super::{BenchmarkArgs, CliError, FormatArgs, HeaderCmd, ProbeArgs, RewrapArgs};

fn todo_cmd(what: &str) -> anyhow::Result<()> {
    Err(CliError::Unsupported(format!("{what}: not implemented yet")).into())
}

pub fn format(_config: &Path, _a: FormatArgs) -> anyhow::Result<()> {
    todo_cmd("format")
}
pub fn header(_config: &Path, _h: HeaderCmd) -> anyhow::Result<()> {
    todo_cmd("header")
}
pub fn probe(_a: ProbeArgs) -> anyhow::Result<()> {
    todo_cmd("probe")
}
pub fn rewrap(_config: &Path, _a: RewrapArgs) -> anyhow::Result<()> {
    todo_cmd("rewrap")
}
pub fn benchmark(a: BenchmarkArgs) -> anyhow::Result<()> {
    if !(a.seconds.is_finite() && a.seconds > 0.0 && a.seconds <= 600.0) {
        return Err(CliError::Usage(format!(
            "--seconds {} is out of range: give a duration between 0 and 600 seconds",
            a.seconds
        ))
        .into());
    }
    let report = crate::crypto::bench::run_benchmark(a.seconds);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
