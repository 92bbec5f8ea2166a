//! What the Linux host says about block devices and mounts: whether a device is held open or
//! has holders ([`inuse`]), where things are mounted ([`mountinfo`]), whether a process lives
//! ([`process`]), and taking over descriptors handed over by number ([`inherited`]). Shared by
//! the header writer, the data path and the agent, so none of them re-reads `/proc` or `/sys`
//! or repeats a system call its own way.

pub mod inherited;
pub mod inuse;
pub mod mountinfo;
pub mod process;
