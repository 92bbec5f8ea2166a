//! A worker that died: its replacement, or what a revocation, a lock or a vanished disk
//! makes of its device meanwhile.

use super::*;

impl Core {
    /// The serving worker ended without being asked to (crash, SIGKILL, OOM kill). Its key
    /// died with it. ublk keeps the device (`UBLK_F_USER_RECOVERY | REISSUE`): QUIESCED, I/O
    /// held, to be recovered in place by a new worker. FUSE loses its connection: the loop
    /// device fails I/O, so it is detached and the volume opened again. The first death after
    /// a stable run restarts at once; deaths in a row back off.
    pub(super) fn worker_died(&mut self, detail: String, fx: &mut Vec<Effect>) {
        fx.push(Effect::Unwatch);
        self.worker = None;
        let Phase::Serving { served, since } = &self.phase else {
            return;
        };
        let (served, since) = (served.clone(), Some(*since));
        self.op = Some(Op::DiedProbe {
            detail,
            served: served.clone(),
            since,
        });
        fx.push(Effect::Probe { served });
    }

    pub(super) fn died_probed(
        &mut self,
        detail: String,
        served: Served,
        since: Option<Instant>,
        p: DeadProbe,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        // The worker is gone: it no longer serves, whatever follows.
        self.phase = Phase::Restarting {
            dead: served.clone(),
            shown: served.ublk_dev_id.is_some() || p.fuse_held,
        };
        if !self.configured && !p.recoverable {
            // Removed from the configuration: its worker ending (`kvcrypt close`, or a crash)
            // ends the agent's care for it; it is not opened again. A ublk device still
            // QUIESCED with I/O held is the exception: dropping it would hang that I/O
            // forever, so it is recovered as usual.
            let effect = if p.fuse_held {
                Effect::ReleaseFuse(served.clone())
            } else {
                Effect::CleanDeadWorker(served.clone())
            };
            self.op = Some(Op::DiedClean {
                detail,
                served,
                unconfigured: true,
                fuse_held: p.fuse_held,
                retry_in: String::new(),
                delay: Duration::ZERO,
            });
            fx.push(effect);
            return;
        }
        if since.is_some_and(|t| clock.now.saturating_duration_since(t) >= STABLE_RUN) {
            self.crash_streak = 0;
            self.restart_backoff.reset();
        }
        self.crash_streak = self.crash_streak.saturating_add(1);
        let delay = if self.crash_streak == 1 {
            Duration::ZERO
        } else {
            self.restart_backoff.next_delay(&mut self.rng)
        };
        let bd = served.block_device.display().to_string();
        let retry_in = short(delay);
        if served.ublk_dev_id.is_some() {
            tracing::warn!(volume = %self.s.name, block_device = %bd, crashes_in_a_row = self.crash_streak, %retry_in,
                "volume {}: serving worker died ({detail}); {bd} holds its I/O until a new worker recovers it (restart in {retry_in}, crash {} in a row)",
                self.s.name, self.crash_streak);
            self.restart_later(served, false, detail, retry_in, delay, clock, fx);
            return;
        }
        self.op = Some(Op::DiedClean {
            detail,
            served: served.clone(),
            unconfigured: false,
            fuse_held: p.fuse_held,
            retry_in,
            delay,
        });
        fx.push(Effect::CleanDeadWorker(served));
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn restart_later(
        &mut self,
        dead: Served,
        fuse_held: bool,
        detail: String,
        retry_in: String,
        delay: Duration,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        self.phase = Phase::Restarting {
            shown: dead.ublk_dev_id.is_some() || fuse_held,
            dead,
        };
        self.next = clock.now + delay;
        self.set_state(
            Some(format!("worker died ({detail}); restarting in {retry_in}")),
            fx,
        );
    }

    /// Replaces a dead worker: unwrap the key again (the agent does not keep it), then recover
    /// the same ublk device, or open the volume again (FUSE, or a ublk device that is gone).
    /// A denial (or `offline_lock_after`) on the way ends in suspended/locked, not a worker.
    pub(super) fn recover_worker(&mut self, dead: Served, fx: &mut Vec<Effect>) {
        self.op = Some(Op::RecoverAdopt { dead });
        fx.push(Effect::Adopt);
    }

    pub(super) fn recover_spawned(
        &mut self,
        dead: Served,
        recover: Option<u32>,
        r: Result<Served, PlatformError>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        let bd = dead.block_device.display().to_string();
        match r {
            Ok(new) => {
                self.restarts = self.restarts.saturating_add(1);
                let nb = new.block_device.display().to_string();
                let how = match (recover, dead.ublk_dev_id) {
                    (Some(_), _) => format!("recovered {nb} in place; held I/O resumes"),
                    (None, None) if new.in_place => {
                        format!("recovered {nb} in place; held I/O resumes")
                    }
                    (None, Some(_)) => format!("opened a new device {nb} ({bd} was gone)"),
                    (None, None) => format!("re-opened as {nb} (I/O on {bd} failed meanwhile)"),
                };
                tracing::warn!(volume = %self.s.name, block_device = %nb, restarts = self.restarts, crashes_in_a_row = self.crash_streak,
                    "volume {}: worker restarted after it died: {how}", self.s.name);
                self.serve(new, clock, fx);
                self.record_ok(clock);
                self.next = clock.now + self.interval();
                self.set_state(Some(format!("worker restarted: {how}")), fx);
            }
            Err(msg) => {
                let e = AccessError::new(
                    AccessClass::Transient,
                    format!(
                        "cannot restart the worker for {}: {msg}",
                        dead.backing.display()
                    ),
                );
                self.record_error(&e, clock);
                let d = self.restart_backoff.next_delay(&mut self.rng);
                let retry_in = short(d);
                tracing::error!(volume = %self.s.name, error = %msg, %retry_in,
                    "volume {}: restarting the dead worker failed: {msg}; retrying in {retry_in}", self.s.name);
                self.next = clock.now + d;
                self.set_state(
                    Some("worker died; restarting it failed, retrying".into()),
                    fx,
                );
            }
        }
    }

    /// The backing disk of a dead worker is gone: no worker can serve it. A ublk device still
    /// QUIESCED would hold its I/O forever (nothing can recover it without the disk), so it is
    /// deleted and that I/O fails, as it would on the vanished disk. The volume then waits for
    /// its device, as at boot.
    pub(super) fn backing_gone(&mut self, dead: Served, clock: Clock, fx: &mut Vec<Effect>) {
        let held = matches!(self.phase, Phase::Restarting { shown: true, .. });
        if dead.ublk_dev_id.is_none() && held {
            self.op = Some(Op::GoneRelease { dead: dead.clone() });
            fx.push(Effect::ReleaseFuse(dead));
            return;
        }
        self.backing_gone_ublk(dead, clock, fx);
    }

    pub(super) fn backing_gone_ublk(&mut self, dead: Served, clock: Clock, fx: &mut Vec<Effect>) {
        if dead.ublk_dev_id.is_some() {
            self.op = Some(Op::GoneProbe { dead: dead.clone() });
            fx.push(Effect::Probe { served: dead });
            return;
        }
        self.backing_gone_done(dead, clock, fx);
    }

    pub(super) fn backing_gone_done(&mut self, dead: Served, clock: Clock, fx: &mut Vec<Effect>) {
        let bd = dead.block_device.display().to_string();
        let reason = format!(
            "backing device {} removed; {bd} closed",
            dead.backing.display()
        );
        tracing::warn!(volume = %self.s.name, block_device = %bd, "volume {}: {reason}; waiting for the device", self.s.name);
        self.slots = None;
        self.slot = None;
        self.worker = None;
        self.crash_streak = 0;
        self.restart_backoff.reset();
        self.backoff.reset();
        self.next = clock.now + self.backoff.next_delay(&mut self.rng);
        // As at boot without the disk: a wake (udev attach) retries at once when it is back.
        self.waiting_for_device = true;
        self.phase = Phase::Locked;
        self.set_state(Some(format!("device not present ({reason})")), fx);
    }

    /// A revocation, `kvcrypt lock` or the offline limit while the worker is dead: no worker
    /// is started. A ublk device still QUIESCED is exactly a suspended ublk volume (I/O held, no
    /// key anywhere): it becomes `suspended` (resume recovers it, hold expiry deletes it).
    /// Otherwise (FUSE: the device is gone with the worker) the volume is `locked`.
    pub(super) fn dead_to_locked(&mut self, reason: String, manual: bool, fx: &mut Vec<Effect>) {
        let Phase::Restarting { dead, .. } = &self.phase else {
            return;
        };
        let dead = dead.clone();
        self.manual = manual;
        self.op = Some(Op::DeadProbe {
            reason,
            manual,
            dead: dead.clone(),
        });
        fx.push(Effect::Probe { served: dead });
    }

    pub(super) fn dead_locked(
        &mut self,
        reason: String,
        manual: bool,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        self.phase = Phase::Locked;
        self.next = self.next_check(manual, clock.now);
        self.set_state(Some(reason), fx);
    }
}
