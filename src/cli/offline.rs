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
pub fn benchmark(_a: BenchmarkArgs) -> anyhow::Result<()> {
    todo_cmd("benchmark")
}
