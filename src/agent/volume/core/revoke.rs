//! The periodic check of a serving volume, and revocation: suspend, hold, remove, resume.

use super::*;

impl Core {
    pub(super) fn checked_serving(
        &mut self,
        r: Result<(), AccessError>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        match r {
            Ok(()) => {
                self.record_ok(clock);
                self.next = clock.now + self.interval();
                if self.rotation_is_due(clock.now) {
                    self.start_rotation(fx);
                } else {
                    self.publish(fx);
                }
                return;
            }
            Err(e) => {
                self.record_error(&e, clock);
                if e.class == AccessClass::NotPinned {
                    // E.g. a reload removed the pin: a configuration error, not Key Vault's
                    // answer, so no revocation (no freeze, no wipe). Only offline_lock_after,
                    // the operator's limit on time without a successful check, still applies.
                    tracing::error!(volume = %self.s.name, class = %e.class, error = %e.message,
                        "volume {}: access check not made, its key is not pinned (configuration error, not a revocation; the volume keeps serving): {}", self.s.name, e.message);
                } else {
                    tracing::warn!(volume = %self.s.name, class = %e.class, error = %e.message,
                        "volume {}: access check failed ({}): {}", self.s.name, e.class, e.message);
                }
                if e.class == AccessClass::Denied {
                    self.lock(format!("access denied: {}", e.message), false, fx);
                    return;
                }
                if let Some(offline) = self.offline_for(clock.now) {
                    self.lock(offline_reason(offline), false, fx);
                    return;
                }
                self.publish(fx);
            }
        }
        self.next = clock.now + self.interval();
    }

    /// serving → suspended (→ removed with policy `remove`): freeze, wipe, hold I/O.
    pub(super) fn lock(&mut self, reason: String, manual: bool, fx: &mut Vec<Effect>) {
        self.manual = manual;
        let Phase::Serving { served, .. } = &self.phase else {
            self.phase = Phase::Locked;
            self.set_state(Some(reason), fx);
            return;
        };
        let served = served.clone();
        // Suspending a ublk worker ends it (and closing any worker does): not a crash.
        fx.push(Effect::Unwatch);
        // Freeze first so everything the filesystem acknowledged is on the device before
        // I/O stops; thaw only after resume (thawing writes the superblock).
        let block_device = served.block_device.clone();
        self.op = Some(Op::LockSuspend {
            reason,
            manual,
            served,
        });
        fx.push(Effect::Suspend { block_device });
    }

    /// The key is gone and I/O is held: record when, then apply the revoke policy (`remove`
    /// deletes the device at once; `hold` waits for access to come back).
    pub(super) fn enter_suspended(
        &mut self,
        served: Served,
        reason: String,
        manual: bool,
        killed: bool,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        self.manual = manual;
        self.counters.suspensions += 1;
        self.phase = Phase::Suspended {
            served,
            since: clock.now,
            killed,
        };
        self.suspended_unix = Some(clock.unix);
        self.set_state(Some(reason.clone()), fx);
        if self.s.revoke_policy == RevokePolicy::Remove {
            self.remove(reason, clock, fx);
            return;
        }
        self.next = self.next_check(manual, clock.now);
    }

    pub(super) fn check_suspended(&mut self, since: Instant, clock: Clock, fx: &mut Vec<Effect>) {
        if self.manual {
            self.next = clock.now + IDLE;
            return;
        }
        if self.s.revoke_policy == RevokePolicy::Remove {
            // Switched to `remove` by a reload while suspended.
            self.remove("revoke_policy is remove".into(), clock, fx);
            return;
        }
        if clock.now.saturating_duration_since(since) >= self.s.hold {
            let r = format!(
                "access not restored within hold ({})",
                humantime::format_duration(self.s.hold)
            );
            self.remove(r, clock, fx);
            return;
        }
        self.access(Want::Key, AfterAccess::CheckSuspended { since }, clock, fx);
    }

    /// suspended → removed: hook, then close the device.
    pub(super) fn remove(&mut self, reason: String, clock: Clock, fx: &mut Vec<Effect>) {
        fx.push(Effect::Unwatch);
        match &self.phase {
            Phase::Suspended { served, .. } => {
                let served = served.clone();
                self.op = Some(Op::RemoveHook {
                    reason: reason.clone(),
                    served: served.clone(),
                });
                fx.push(Effect::RunHook {
                    block_device: served.block_device,
                    reason,
                });
            }
            _ => self.removed(reason, clock, fx),
        }
    }

    pub(super) fn removed(&mut self, reason: String, clock: Clock, fx: &mut Vec<Effect>) {
        self.counters.removals += 1;
        self.slots = None;
        self.worker = None;
        self.next = self.next_check(self.manual, clock.now);
        self.phase = Phase::Removed;
        self.set_state(Some(reason), fx);
    }

    /// suspended → serving: the held key to a worker, then thaw.
    pub(super) fn resume(&mut self, why: String, fx: &mut Vec<Effect>) {
        let Phase::Suspended { served, killed, .. } = &self.phase else {
            fx.push(Effect::DropKey);
            self.outcome = Some(Err("not suspended".into()));
            return;
        };
        let served = served.clone();
        let spawn = |recover| Effect::Spawn {
            dev: served.backing.clone(),
            recover,
        };
        let (how, effect) = match served.ublk_dev_id {
            // ublk: suspend ended the worker and left the device QUIESCED with its I/O held
            // (there is no in-process resume); a new worker recovers the same device.
            Some(id) => (ResumeHow::Ublk(id), spawn(Some(id))),
            // Killed after a failed suspend: a new worker takes over the held device.
            None if *killed => (ResumeHow::AfterKill, spawn(None)),
            None => (ResumeHow::InProcess, Effect::ResumeWorker),
        };
        self.op = Some(Op::Resume { why, served, how });
        fx.push(effect);
    }

    pub(super) fn resumed(
        &mut self,
        why: String,
        old: Served,
        r: Result<Served, String>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        match r {
            Ok(served) => {
                let bd = served.block_device.clone();
                self.serve(served, clock, fx);
                fx.push(Effect::Thaw(bd));
                self.counters.resumes += 1;
                self.record_ok(clock);
                self.manual = false;
                self.suspended_unix = None;
                self.next = clock.now + self.interval();
                self.set_state(Some(why), fx);
                self.outcome = Some(Ok("resumed".to_owned()));
            }
            Err(e) => {
                tracing::error!(volume = %self.s.name, error = %e, "volume {}: resuming the worker failed: {e}; re-attaching", self.s.name);
                self.outcome = Some(Err(e.clone()));
                self.op = Some(Op::ResumeFailed {
                    error: e,
                    block_device: old.block_device.clone(),
                });
                fx.push(Effect::ForceRemove {
                    served: old,
                    suspended: true,
                });
            }
        }
    }
}
