//! Agent commands: agent, lock, unlock, status, demo. (Owned by the agent work.)

use std::path::Path;

use super::{AgentArgs, CliError, DemoArgs, NameArgs, StatusArgs};

fn todo_cmd(what: &str) -> anyhow::Result<()> {
    Err(CliError::Unsupported(format!("{what}: not implemented yet")).into())
}

pub fn agent(_config: &Path, _a: AgentArgs) -> anyhow::Result<()> {
    todo_cmd("agent")
}
pub fn lock(_a: NameArgs) -> anyhow::Result<()> {
    todo_cmd("lock")
}
pub fn unlock(_a: NameArgs) -> anyhow::Result<()> {
    todo_cmd("unlock")
}
pub fn status(_a: StatusArgs) -> anyhow::Result<()> {
    todo_cmd("status")
}
pub fn demo(_a: DemoArgs) -> anyhow::Result<()> {
    todo_cmd("demo")
}
