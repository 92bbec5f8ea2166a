//! What the Linux host says about block devices and mounts: whether a device is held open or
//! has holders ([`inuse`]), and where things are mounted ([`mountinfo`]), and whether a process lives ([`process`]). Shared by the header
//! writer, the data path and the agent, so none of them re-reads `/proc` or `/sys` its own way.

pub mod inuse;
pub mod mountinfo;
pub mod process;
