//! Sector I/O on the backing device. (Owned by the data-path work.)
