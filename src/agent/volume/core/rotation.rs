//! Rotation following, as the state machine sees it: when a round is due, what its outcome is
//! logged as. The round itself (lookups, the new slot, the header write) is the platform's
//! (`KeyPort::follow_rotation`); nothing here locks a volume.

use super::*;

impl Core {
    /// A serving volume whose last access check just succeeded follows rotation when a round
    /// is due (after a failed check it waits: access comes first).
    pub(super) fn rotation_is_due(&self, now: Instant) -> bool {
        self.s.follow_rotation
            && now >= self.rotation_due
            && matches!(self.phase, Phase::Serving { .. })
    }

    pub(super) fn start_rotation(&mut self, fx: &mut Vec<Effect>) {
        let Phase::Serving { served, .. } = &self.phase else {
            return;
        };
        let dev = served.backing.clone();
        self.op = Some(Op::Rotate);
        fx.push(Effect::FollowRotation(dev));
    }

    pub(super) fn rotated(
        &mut self,
        r: Result<RotationReport, PlatformError>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        let every = jitter(self.s.rotation_check, self.s.check_jitter, &mut self.rng);
        self.rotation_due = clock.now + every;
        self.rotation_due_unix = Some(clock.unix + every.as_secs_f64());
        let name = self.s.name.clone();
        let report = match r {
            Ok(report) => report,
            Err(e) => {
                tracing::error!(volume = %name, error = %e,
                    "volume {name}: following key rotation failed: {e}; the volume keeps serving \
                     (the header on disk is the old one or the new one, both unlock)");
                self.publish(fx);
                return;
            }
        };
        for k in &report.verified {
            self.verified.insert(k.clone(), clock.unix);
        }
        if let Some(slots) = report.slots {
            // The new version's slot is tried first from now on, so the customer can disable
            // the old version without a single denied check.
            if let Some((_, k)) = report.added.last()
                && let Some(s) = slots.iter().find(|s| &s.key_id == k)
            {
                self.slot = Some(s.clone());
            }
            self.slots = Some(slots);
        }
        for (id, key_id) in &report.added {
            tracing::info!(volume = %name, key_id = %key_id, slot = id,
                "volume {name}: key rotated: added key slot {id} for {key_id} (verified by \
                 unwrapping it) and wrote both header copies");
        }
        for (id, key_id) in &report.pruned {
            tracing::info!(volume = %name, key_id = %key_id, slot = id,
                "volume {name}: removed key slot {id} ({key_id}): the current version's slot has \
                 been in place for rotation_grace ({})", short(self.s.rotation_grace));
        }
        for p in &report.problems {
            tracing::warn!(volume = %name, problem = %p,
                "volume {name}: following key rotation: {p} (the volume keeps serving)");
        }
        let now = clock.unix as i64;
        for k in &report.keys {
            if !k.enabled {
                tracing::warn!(volume = %name, key_id = %k.current,
                    "volume {name}: the current version of {} ({}) is disabled: no slot is added \
                     for it", k.key, k.current);
            }
            match k.expires {
                Some(exp) if exp <= now => {
                    tracing::error!(volume = %name, key_id = %k.current, expires = exp,
                        "volume {name}: key {} expired at {}: rotate it in Key Vault", k.current,
                        unix_text(exp));
                }
                Some(exp) if exp - now <= self.s.expiry_warning.as_secs() as i64 => {
                    tracing::warn!(volume = %name, key_id = %k.current, expires = exp,
                        "volume {name}: key {} expires at {} (in {}): rotate it in Key Vault \
                         before then", k.current, unix_text(exp),
                        short(Duration::from_secs((exp - now) as u64)));
                }
                _ => {}
            }
        }
        self.keys = report.keys;
        self.publish(fx);
    }
}

/// RFC 3339 (UTC, seconds) of a Unix time, for messages.
fn unix_text(t: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}
