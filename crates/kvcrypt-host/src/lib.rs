//! What the Linux host says about block devices and mounts: whether a device is held open or
//! has holders ([`inuse`]), and where things are mounted ([`mountinfo`]). Shared by the header
//! writer, the data path and the agent, so none of them re-reads `/proc` or `/sys` its own way.

pub mod inuse;
pub mod mountinfo;
