//! When Key Vault will rotate a key next, from its rotation policy
//! (`GET /keys/{name}/rotationpolicy`): what `kvcrypt status` shows beside the key's expiry.
//!
//! Only `Rotate` actions count (`Notify` only sends an Event Grid event). A `timeAfterCreate`
//! trigger is due that long after the current version was created, a `timeBeforeExpiry`
//! trigger that long before it expires; the earlier of the two is the next rotation.

/// An ISO 8601 duration of a rotation policy in seconds. The service counts a month as 30
/// days and a year as 365 (its documented minimums, e.g. `P28D`, are in days), and so does
/// this; `None` when the text is not an ISO 8601 duration.
pub fn duration_secs(text: &str) -> Option<i64> {
    let secs = match iso8601::duration(text).ok()? {
        iso8601::Duration::Weeks(w) => i64::from(w) * 7 * 86_400,
        iso8601::Duration::YMDHMS {
            year,
            month,
            day,
            hour,
            minute,
            second,
            millisecond: _,
        } => {
            i64::from(year) * 365 * 86_400
                + i64::from(month) * 30 * 86_400
                + i64::from(day) * 86_400
                + i64::from(hour) * 3600
                + i64::from(minute) * 60
                + i64::from(second)
        }
    };
    Some(secs)
}

/// One `Rotate` lifetime action's trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateTrigger {
    AfterCreate(String),
    BeforeExpiry(String),
}

/// The next rotation (Unix seconds) of a version `created` / expiring at `expires` under
/// these triggers; `None` when no trigger applies (no `Rotate` action, a `timeBeforeExpiry`
/// on a version without expiry, an unreadable duration).
pub fn next_rotation(
    triggers: &[RotateTrigger],
    created: Option<i64>,
    expires: Option<i64>,
) -> Option<i64> {
    triggers
        .iter()
        .filter_map(|t| match t {
            RotateTrigger::AfterCreate(d) => Some(created? + duration_secs(d)?),
            RotateTrigger::BeforeExpiry(d) => Some(expires? - duration_secs(d)?),
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_the_earliest_rotate_trigger() {
        assert_eq!(duration_secs("P90D"), Some(90 * 86_400));
        assert_eq!(duration_secs("P1Y"), Some(365 * 86_400));
        assert_eq!(duration_secs("P18M"), Some(18 * 30 * 86_400));
        assert_eq!(duration_secs("P2W"), Some(14 * 86_400));
        assert_eq!(duration_secs("PT48H"), Some(48 * 3600));
        assert_eq!(duration_secs("90 days"), None);
        let day = 86_400;
        let after = RotateTrigger::AfterCreate("P30D".into());
        let before = RotateTrigger::BeforeExpiry("P7D".into());
        assert_eq!(
            next_rotation(std::slice::from_ref(&after), Some(0), None),
            Some(30 * day)
        );
        assert_eq!(
            next_rotation(std::slice::from_ref(&before), Some(0), None),
            None
        );
        assert_eq!(
            next_rotation(&[after.clone(), before.clone()], Some(0), Some(20 * day)),
            Some(13 * day)
        );
        assert_eq!(next_rotation(&[], Some(0), Some(day)), None);
        assert_eq!(
            next_rotation(&[RotateTrigger::AfterCreate("soon".into())], Some(0), None),
            None
        );
    }
}
