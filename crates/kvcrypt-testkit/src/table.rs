//! Table-driven tests: a table of rows (a case name and its data), each checked on its own.
//!
//! A row's failure does not stop the other rows: every row runs, each failing row's panic is
//! printed with its name, and the test then fails naming every failing row. Assertion messages
//! inside a check should name the row too, so the panic text alone says which case broke.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs `check` on each `(name, row)`; panics at the end, listing the names of the rows whose
/// check panicked.
pub fn rows<R>(table: impl IntoIterator<Item = (&'static str, R)>, check: impl Fn(&str, R)) {
    let mut failed = Vec::new();
    for (name, row) in table {
        // The row's data is not used after a panic, so unwind safety does not matter here.
        if catch_unwind(AssertUnwindSafe(|| check(name, row))).is_err() {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "failing rows: {failed:?}");
}

/// [`rows`] for async checks: each row runs as its own task (a panic ends only that task), one
/// after another, so rows that share an emulator or a process-wide switch do not race.
pub async fn rows_async<R, F, Fut>(table: impl IntoIterator<Item = (&'static str, R)>, check: F)
where
    F: Fn(&'static str, R) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut failed = Vec::new();
    for (name, row) in table {
        if tokio::spawn(check(name, row)).await.is_err() {
            failed.push(name);
        }
    }
    assert!(failed.is_empty(), "failing rows: {failed:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_runs_and_the_failing_ones_are_named() {
        let seen = std::cell::RefCell::new(Vec::new());
        let r = catch_unwind(AssertUnwindSafe(|| {
            rows([("a", 1), ("b", 2), ("c", 3)], |name, n| {
                seen.borrow_mut().push(name.to_string());
                assert_ne!(n, 2, "{name}: two is refused");
            })
        }));
        assert_eq!(*seen.borrow(), ["a", "b", "c"]);
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("[\"b\"]"), "{msg}");
    }
}
