//! Key rotation policies (`GET`/`PUT /keys/{name}/rotationpolicy`): their REST shape, the
//! service's validation rules, and automatic rotation when the emulated clock passes a
//! `Rotate` trigger.

use super::Shared;
use super::clock::RotatedKey;
use super::keycrypto::Material;
use super::model::{KeyEntry, KeyVersion, State, random_hex};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

const DAY: i64 = 86_400;
/// The service's lower bounds: a rotated version lives at least 28 days, and rotation is at
/// least 7 days after creation and 7 days before expiry.
const MIN_EXPIRY: i64 = 28 * DAY;
const MIN_ROTATION: i64 = 7 * DAY;
/// Rotations one evaluation may catch up on per key (a jump of years with a 7-day policy
/// would otherwise generate hundreds of RSA keys in one request).
const MAX_CATCH_UP: usize = 32;

/// A rejected policy: the message of the service's 400 `BadParameter`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PolicyError(String);

/// An ISO-8601 duration (`P90D`, `P18M`, `P1Y10D`, `PT48H`) as given, and its length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IsoDuration {
    text: String,
    seconds: i64,
}

impl IsoDuration {
    /// Parses `PnYnMnWnDTnHnMnS` (integer components). Years count 365 days and months 30:
    /// the emulator's clock has no calendar.
    pub fn parse(text: &str) -> Result<IsoDuration, PolicyError> {
        let bad = || {
            PolicyError(format!(
                "'{text}' is not a valid ISO 8601 duration (e.g. P90D, P18M, P1Y10D, PT48H)."
            ))
        };
        let rest = text.strip_prefix('P').ok_or_else(bad)?;
        let (date, time) = rest.split_once('T').unwrap_or((rest, ""));
        if (rest.contains('T') && time.is_empty()) || rest.is_empty() {
            return Err(bad());
        }
        let mut seconds: i64 = 0;
        for (part, units) in [
            (
                date,
                &[
                    ('Y', 365 * DAY),
                    ('M', 30 * DAY),
                    ('W', 7 * DAY),
                    ('D', DAY),
                ][..],
            ),
            (time, &[('H', 3600), ('M', 60), ('S', 1)][..]),
        ] {
            let mut digits = String::new();
            let mut next = 0;
            for c in part.chars() {
                if c.is_ascii_digit() {
                    digits.push(c);
                    continue;
                }
                let i = units[next..]
                    .iter()
                    .position(|(u, _)| *u == c)
                    .ok_or_else(bad)?;
                let n: i64 = digits.parse().map_err(|_| bad())?;
                let add = n.checked_mul(units[next + i].1).ok_or_else(bad)?;
                seconds = seconds.checked_add(add).ok_or_else(bad)?;
                digits.clear();
                next += i + 1;
            }
            if !digits.is_empty() {
                return Err(bad());
            }
        }
        Ok(IsoDuration {
            text: text.to_string(),
            seconds,
        })
    }

    /// The shortest exact form of `d`: whole days as `PnD`, else `PTnS`.
    pub fn from_duration(d: Duration) -> IsoDuration {
        let s = d.as_secs() as i64;
        let text = if s % DAY == 0 {
            format!("P{}D", s / DAY)
        } else {
            format!("PT{s}S")
        };
        IsoDuration { text, seconds: s }
    }

    pub fn seconds(&self) -> i64 {
        self.seconds
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl TryFrom<String> for IsoDuration {
    type Error = PolicyError;
    fn try_from(s: String) -> Result<Self, PolicyError> {
        IsoDuration::parse(&s)
    }
}

impl From<IsoDuration> for String {
    fn from(d: IsoDuration) -> String {
        d.text
    }
}

/// When a lifetime action fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `timeAfterCreate`: this long after the latest version was created.
    AfterCreate(IsoDuration),
    /// `timeBeforeExpiry`: this long before the latest version expires.
    BeforeExpiry(IsoDuration),
}

/// What a lifetime action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Create a new key version.
    Rotate,
    /// Send an Event Grid "near expiry" event (the emulator has no Event Grid: kept, shown,
    /// never fired).
    Notify,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifetimeAction {
    pub trigger: Trigger,
    pub action: Action,
}

/// A key's rotation policy, as set by `PUT /keys/{name}/rotationpolicy` or
/// [`crate::EmulatorHandle::set_rotation_policy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RotationPolicy {
    /// Empty: the service's default (notify 30 days before expiry).
    pub lifetime_actions: Vec<LifetimeAction>,
    /// `attributes.expiryTime`: versions the policy creates expire this long after creation.
    pub expiry_time: Option<IsoDuration>,
    /// Emulated times the policy was first set and last changed (0: not yet stored).
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub updated: i64,
}

impl RotationPolicy {
    /// A policy rotating `every` after each version's creation.
    pub fn rotate_after(every: Duration) -> RotationPolicy {
        RotationPolicy {
            lifetime_actions: vec![LifetimeAction {
                trigger: Trigger::AfterCreate(IsoDuration::from_duration(every)),
                action: Action::Rotate,
            }],
            ..Default::default()
        }
    }

    /// Adds `expiryTime`: versions created by rotation expire `after` their creation.
    pub fn expires_after(mut self, after: Duration) -> RotationPolicy {
        self.expiry_time = Some(IsoDuration::from_duration(after));
        self
    }

    /// Checks the rules the service enforces.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let expiry = self.expiry_time.as_ref().map(IsoDuration::seconds);
        if let Some(e) = expiry
            && e < MIN_EXPIRY
        {
            return Err(PolicyError(format!(
                "Invalid rotation policy: expiryTime ({}) must be at least 28 days (P28D).",
                self.expiry_time.as_ref().map_or("", |d| d.as_str())
            )));
        }
        for action in [Action::Rotate, Action::Notify] {
            if self
                .lifetime_actions
                .iter()
                .filter(|a| a.action == action)
                .count()
                > 1
            {
                return Err(PolicyError(format!(
                    "Invalid rotation policy: more than one lifetime action of type {action:?}."
                )));
            }
        }
        for a in &self.lifetime_actions {
            let (d, before_expiry) = match &a.trigger {
                Trigger::AfterCreate(d) => (d, false),
                Trigger::BeforeExpiry(d) => (d, true),
            };
            let name = if before_expiry {
                "timeBeforeExpiry"
            } else {
                "timeAfterCreate"
            };
            if a.action == Action::Notify && !before_expiry {
                return Err(PolicyError(
                    "Invalid rotation policy: a Notify action only supports a timeBeforeExpiry trigger.".into(),
                ));
            }
            if a.action == Action::Rotate && before_expiry && expiry.is_none() {
                return Err(PolicyError(
                    "Invalid rotation policy: a Rotate action with timeBeforeExpiry requires attributes.expiryTime.".into(),
                ));
            }
            if d.seconds() < MIN_ROTATION {
                return Err(PolicyError(format!(
                    "Invalid rotation policy: {name} ({}) must be at least 7 days (P7D).",
                    d.as_str()
                )));
            }
            if let Some(e) = expiry
                && d.seconds() > e - MIN_ROTATION
            {
                return Err(PolicyError(format!(
                    "Invalid rotation policy: {name} ({}) must be at least 7 days shorter than expiryTime ({}).",
                    d.as_str(),
                    self.expiry_time.as_ref().map_or("", |d| d.as_str())
                )));
            }
        }
        Ok(())
    }

    /// Parses a `PUT` body (the service's JSON shape) and validates it.
    pub fn from_json(body: &Value) -> Result<RotationPolicy, PolicyError> {
        let obj = body
            .as_object()
            .ok_or_else(|| PolicyError("The rotation policy must be a JSON object.".into()))?;
        let mut policy = RotationPolicy::default();
        match obj.get("lifetimeActions") {
            None | Some(Value::Null) => {}
            Some(Value::Array(actions)) => {
                for a in actions {
                    policy.lifetime_actions.push(action_from_json(a)?);
                }
            }
            Some(_) => {
                return Err(PolicyError(
                    "Property lifetimeActions must be an array.".into(),
                ));
            }
        }
        if let Some(e) = obj
            .get("attributes")
            .and_then(|a| a.get("expiryTime"))
            .filter(|e| !e.is_null())
        {
            let text = e.as_str().ok_or_else(|| {
                PolicyError("Property attributes.expiryTime must be a string.".into())
            })?;
            policy.expiry_time = Some(IsoDuration::parse(text)?);
        }
        policy.validate()?;
        Ok(policy)
    }
}

fn action_from_json(a: &Value) -> Result<LifetimeAction, PolicyError> {
    let trigger = a.get("trigger").unwrap_or(&Value::Null);
    let text = |k: &str| -> Result<Option<IsoDuration>, PolicyError> {
        match trigger.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => IsoDuration::parse(s).map(Some),
            Some(_) => Err(PolicyError(format!(
                "Property trigger.{k} must be a string."
            ))),
        }
    };
    let trigger = match (text("timeAfterCreate")?, text("timeBeforeExpiry")?) {
        (Some(d), None) => Trigger::AfterCreate(d),
        (None, Some(d)) => Trigger::BeforeExpiry(d),
        _ => {
            return Err(PolicyError(
                "Invalid rotation policy: each lifetime action's trigger needs exactly one of timeAfterCreate and timeBeforeExpiry.".into(),
            ));
        }
    };
    let kind = a
        .get("action")
        .and_then(|x| x.get("type"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let action = if kind.eq_ignore_ascii_case("rotate") {
        Action::Rotate
    } else if kind.eq_ignore_ascii_case("notify") {
        Action::Notify
    } else {
        return Err(PolicyError(format!(
            "Invalid rotation policy: action type '{kind}' is not Rotate or Notify."
        )));
    };
    Ok(LifetimeAction { trigger, action })
}

/// The policy in the service's JSON shape. A key whose policy was never set answers the
/// service's default: notify 30 days before expiry, no attributes.
pub fn to_json(policy: Option<&RotationPolicy>, id: &str) -> Value {
    let default = [LifetimeAction {
        trigger: Trigger::BeforeExpiry(IsoDuration {
            text: "P30D".into(),
            seconds: 30 * DAY,
        }),
        action: Action::Notify,
    }];
    let actions = match policy {
        Some(p) if !p.lifetime_actions.is_empty() => &p.lifetime_actions[..],
        _ => &default[..],
    };
    let actions: Vec<Value> = actions
        .iter()
        .map(|a| {
            let trigger = match &a.trigger {
                Trigger::AfterCreate(d) => json!({ "timeAfterCreate": d.as_str() }),
                Trigger::BeforeExpiry(d) => json!({ "timeBeforeExpiry": d.as_str() }),
            };
            json!({ "trigger": trigger, "action": { "type": format!("{:?}", a.action) } })
        })
        .collect();
    let mut attributes = json!({});
    if let Some(p) = policy {
        if let Some(e) = &p.expiry_time {
            attributes["expiryTime"] = e.as_str().into();
        }
        attributes["created"] = p.created.into();
        attributes["updated"] = p.updated.into();
    }
    json!({ "id": id, "lifetimeActions": actions, "attributes": attributes })
}

/// When `entry`'s policy next rotates it (emulated Unix time), if it has a Rotate action.
fn next_rotation(entry: &KeyEntry) -> Option<i64> {
    let policy = entry.rotation_policy.as_ref()?;
    let latest = entry.latest()?;
    policy
        .lifetime_actions
        .iter()
        .filter(|a| a.action == Action::Rotate)
        .find_map(|a| match &a.trigger {
            Trigger::AfterCreate(d) => Some(latest.created + d.seconds()),
            Trigger::BeforeExpiry(d) => latest.exp.map(|exp| exp - d.seconds()),
        })
}

/// Whether any key is due for rotation at `now` (cheap: run on every request).
pub fn any_due(st: &State, now: i64) -> bool {
    st.keys
        .values()
        .any(|e| next_rotation(e).is_some_and(|t| t <= now))
}

/// The `exp` a version created at `created` gets from `entry`'s policy.
pub fn policy_expiry(entry: Option<&KeyEntry>, created: i64) -> Option<i64> {
    let e = entry?.rotation_policy.as_ref()?.expiry_time.as_ref()?;
    Some(created + e.seconds())
}

/// One due rotation: the key, the version it replaces and what the new one looks like.
struct Plan {
    key: String,
    after: String,
    kty: String,
    bits: usize,
    rsa: bool,
    key_ops: Vec<String>,
    created: i64,
}

/// Creates every version the policies owe at the emulated now, each `created` at its
/// trigger time (as if the service had rotated on schedule). Blocks while RSA keys are
/// generated: call it off the reactor. Rotations run one at a time.
pub fn run(shared: &Shared) -> Vec<RotatedKey> {
    let _one_at_a_time = shared.rotation_lock();
    let mut done = Vec::new();
    for _ in 0..MAX_CATCH_UP {
        let now = shared.clock.now();
        let plans: Vec<Plan> = {
            let st = shared.state();
            st.keys
                .iter()
                .filter_map(|(k, e)| {
                    let at = next_rotation(e).filter(|t| *t <= now)?;
                    let latest = e.latest()?;
                    Some(Plan {
                        key: k.clone(),
                        after: latest.version.clone(),
                        kty: latest.kty.clone(),
                        bits: latest.material.bits(),
                        rsa: latest.material.is_rsa(),
                        key_ops: latest.key_ops.clone(),
                        created: at,
                    })
                })
                .collect()
        };
        if plans.is_empty() {
            break;
        }
        for p in plans {
            let material = if p.rsa {
                match Material::generate_rsa(p.bits) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::error!("emulator: rotating key {}: {e}", p.key);
                        return done;
                    }
                }
            } else {
                Material::generate_oct(p.bits)
            };
            let rotated = shared.mutate(|st| {
                let entry = st.keys.get_mut(&p.key)?;
                // Someone else (a manual rotate) may have added a version meanwhile.
                if entry.latest()?.version != p.after {
                    return None;
                }
                let version = KeyVersion {
                    version: random_hex(16),
                    kty: p.kty,
                    key_ops: p.key_ops,
                    material,
                    enabled: true,
                    nbf: None,
                    exp: policy_expiry(Some(entry), p.created),
                    created: p.created,
                    updated: p.created,
                    tags: Default::default(),
                };
                let r = RotatedKey {
                    name: entry.name.clone(),
                    version: version.version.clone(),
                    created: p.created,
                };
                entry.versions.push(version);
                Some(r)
            });
            done.extend(rotated);
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> i64 {
        IsoDuration::parse(s).unwrap().seconds()
    }

    #[test]
    fn iso_durations() {
        assert_eq!(d("P90D"), 90 * DAY);
        assert_eq!(d("P3M"), 90 * DAY);
        assert_eq!(d("P1Y10D"), 375 * DAY);
        assert_eq!(d("PT48H"), 2 * DAY);
        assert_eq!(d("P2W"), 14 * DAY);
        assert_eq!(d("P1DT1H1M1S"), DAY + 3661);
        for bad in [
            "", "P", "90D", "PT", "P1H", "PD", "P1D2", "P1M1Y", "P-1D", "P1.5D",
        ] {
            assert!(IsoDuration::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            IsoDuration::from_duration(Duration::from_secs(30 * 86_400)).as_str(),
            "P30D"
        );
        assert_eq!(
            IsoDuration::from_duration(Duration::from_secs(90)).as_str(),
            "PT90S"
        );
    }

    fn policy(v: Value) -> Result<RotationPolicy, PolicyError> {
        RotationPolicy::from_json(&v)
    }

    #[test]
    fn validation_follows_the_service() {
        let rotate = |t: &str, k: &str| json!({"trigger": {k: t}, "action": {"type": "Rotate"}});
        assert!(policy(json!({"lifetimeActions": [rotate("P30D", "timeAfterCreate")]})).is_ok());
        assert!(policy(json!({"lifetimeActions": [rotate("P6D", "timeAfterCreate")]})).is_err());
        assert!(
            policy(json!({"lifetimeActions": [], "attributes": {"expiryTime": "P27D"}})).is_err()
        );
        assert!(policy(json!({"attributes": {"expiryTime": "P28D"}})).is_ok());
        // Rotation at least 7 days before expiry.
        let p = |t| json!({"lifetimeActions": [rotate(t, "timeAfterCreate")], "attributes": {"expiryTime": "P90D"}});
        assert!(policy(p("P83D")).is_ok());
        assert!(policy(p("P84D")).is_err());
        // timeBeforeExpiry needs expiryTime.
        assert!(policy(json!({"lifetimeActions": [rotate("P30D", "timeBeforeExpiry")]})).is_err());
        // Exactly one trigger; a known action; Notify only before expiry; one of each.
        assert!(
            policy(json!({"lifetimeActions": [{"trigger": {}, "action": {"type": "Rotate"}}]}))
                .is_err()
        );
        assert!(policy(json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Explode"}}]})).is_err());
        assert!(policy(json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Notify"}}]})).is_err());
        assert!(policy(json!({"lifetimeActions": [rotate("P30D", "timeAfterCreate"), rotate("P40D", "timeAfterCreate")]})).is_err());
        assert!(policy(json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "soon"}, "action": {"type": "Rotate"}}]})).is_err());
    }

    #[test]
    fn unset_policy_reports_the_default() {
        let v = to_json(None, "https://v/keys/k/rotationpolicy");
        assert_eq!(
            v["lifetimeActions"][0]["trigger"]["timeBeforeExpiry"],
            "P30D"
        );
        assert_eq!(v["lifetimeActions"][0]["action"]["type"], "Notify");
        assert_eq!(v["attributes"], json!({}));
    }
}
