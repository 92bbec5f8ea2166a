//! On-disk volume header. (Owned by the format/XTS work.)

use crate::exit::{Exit, ExitClass};

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("not a kvcrypt volume")]
    NotKvcrypt,
}

impl ExitClass for HeaderError {
    fn exit_class(&self) -> Exit {
        match self {
            HeaderError::NotKvcrypt => Exit::NotKvcrypt,
        }
    }
}
