//! Outside events: the task's start, reloads, the timer, the operator's commands, udev's wake.

use super::*;

impl Core {
    pub(super) fn outside(&mut self, event: Event, clock: Clock, fx: &mut Vec<Effect>) {
        match event {
            Event::Start { manual } => self.start(manual, clock, fx),
            Event::Reconfigure(d) => self.reconfigure(*d, clock, fx),
            Event::Tick => self.tick(clock, fx),
            Event::WorkerExited(why) => self.worker_died(why, fx),
            Event::Lock => self.lock_command(clock, fx),
            Event::Unlock => self.unlock_command(clock, fx),
            Event::Wake => self.wake(clock),
            Event::Close => self.close_command(clock, fx),
            Event::Shutdown => self.shutdown(fx),
            other => {
                if cfg!(any(test, debug_assertions)) {
                    panic!("outcome {other:?} with no procedure under way");
                }
                tracing::error!(volume = %self.s.name, "volume {}: internal error: outcome {other:?} with no procedure under way; ignored", self.s.name);
            }
        }
    }

    /// Takes over a worker left by a previous agent (crash / restart).
    pub(super) fn start(&mut self, manual: Option<String>, clock: Clock, fx: &mut Vec<Effect>) {
        // `kvcrypt lock` / `kvcrypt close` hold until `kvcrypt unlock`, also across an agent
        // restart or crash (not across a reboot: the record lives in /run).
        if let Some(why) = &manual {
            self.manual = true;
            self.manual_recorded = true;
            self.next = clock.now + IDLE;
            self.reason = Some(why.clone());
        }
        self.op = Some(Op::AdoptFind { manual });
        fx.push(Effect::Adopt);
    }

    /// Applies new settings (reload). The running worker is not touched: policy
    /// (`check_interval`, `hold`, `revoke_policy`, `offline_lock_after`, hook, timeouts, retry)
    /// applies from the next check; the device selector and worker options (transport,
    /// queues, read_only …) apply the next time a worker is started for the volume.
    pub(super) fn reconfigure(&mut self, d: Desired, clock: Clock, fx: &mut Vec<Effect>) {
        if d.settings == self.s && d.configured == self.configured {
            return;
        }
        if d.settings.unlock_retry != self.s.unlock_retry {
            self.backoff = Backoff::new(d.settings.unlock_retry.clone());
            self.restart_backoff = Backoff::new(d.settings.unlock_retry.clone());
        }
        let old_interval = self.s.check_interval;
        self.s = d.settings;
        self.configured = d.configured;
        tracing::info!(volume = %self.s.name, configured = self.configured,
            check_interval = %humantime::format_duration(self.s.check_interval),
            hold = %humantime::format_duration(self.s.hold),
            revoke_policy = ?self.s.revoke_policy,
            "volume {}: settings reloaded (check_interval {}, hold {}, revoke_policy {:?}{})",
            self.s.name,
            humantime::format_duration(self.s.check_interval),
            humantime::format_duration(self.s.hold),
            self.s.revoke_policy,
            if self.configured { "" } else { "; removed from the configuration" });
        // A shorter interval must not wait out the longer one already scheduled.
        if self.s.check_interval < old_interval && !self.manual {
            let sooner = clock.now + self.interval();
            if sooner < self.next {
                self.next = sooner;
            }
        }
        self.publish(fx);
    }

    pub(super) fn tick(&mut self, clock: Clock, fx: &mut Vec<Effect>) {
        match &self.phase {
            Phase::Restarting { dead, .. } => {
                let dead = dead.clone();
                self.recover_worker(dead, fx);
            }
            Phase::Locked | Phase::Unlocking | Phase::Removed => {
                if self.manual {
                    self.next = clock.now + IDLE;
                } else {
                    self.try_unlock(fx);
                }
            }
            Phase::Serving { .. } => {
                self.op = Some(Op::CheckStatus);
                fx.push(Effect::WorkerStatus);
            }
            Phase::Suspended { since, .. } => {
                let since = *since;
                self.check_suspended(since, clock, fx);
            }
            Phase::Stopped(_) => {}
        }
    }

    pub(super) fn lock_command(&mut self, clock: Clock, fx: &mut Vec<Effect>) {
        match &self.phase {
            Phase::Restarting { .. } => {
                self.pending = Some(Pending::LockDead);
                self.dead_to_locked("locked by kvcrypt lock".into(), true, fx);
            }
            Phase::Serving { .. } => {
                self.pending = Some(Pending::Lock);
                self.lock("locked by kvcrypt lock".into(), true, fx);
            }
            Phase::Suspended { .. } => {
                self.manual = true;
                self.next = clock.now + IDLE;
                self.publish(fx);
                fx.push(Effect::Reply(Ok(
                    "already suspended; now stays locked until kvcrypt unlock".to_owned(),
                )));
            }
            _ => {
                self.manual = true;
                self.next = clock.now + IDLE;
                self.publish(fx);
                fx.push(Effect::Reply(Ok(format!(
                    "not served ({}); will not be unlocked until kvcrypt unlock",
                    self.phase.state()
                ))));
            }
        }
    }

    pub(super) fn unlock_command(&mut self, clock: Clock, fx: &mut Vec<Effect>) {
        self.manual = false;
        match &self.phase {
            Phase::Restarting { dead, .. } => {
                let dead = dead.clone();
                self.restart_backoff.reset();
                self.pending = Some(Pending::UnlockDead);
                self.recover_worker(dead, fx);
            }
            Phase::Serving { .. } => fx.push(Effect::Reply(Ok("already serving".to_owned()))),
            Phase::Suspended { .. } => {
                self.pending = Some(Pending::UnlockSuspended);
                self.access(Want::Key, AfterAccess::UnlockSuspended, clock, fx);
            }
            _ => {
                self.backoff.reset();
                self.pending = Some(Pending::Unlock);
                self.try_unlock(fx);
            }
        }
    }

    /// A wake (udev ran `kvcrypt attach` for some device) retries now only if the volume waits
    /// for its device. Anything else the last attempt ran into (header, vault, key check, worker
    /// start) is not fixed by a device event, and such events come in storms: every failed
    /// worker start closes the backing disk it opened for writing, udev's inotify watch turns
    /// that close into a `change` event, and `kvcrypt-attach@` wakes us again — bypassing the
    /// backoff there made a retry loop of about one attempt a second. `kvcrypt unlock` is the
    /// explicit "retry now".
    pub(super) fn wake(&mut self, clock: Clock) {
        let why_not = if self.manual {
            Some("locked by kvcrypt lock")
        } else if !matches!(self.phase, Phase::Locked | Phase::Removed) {
            Some("not waiting for a device")
        } else if !self.waiting_for_device {
            Some("the last attempt did not fail for want of the device; the backoff stands")
        } else {
            None
        };
        match why_not {
            Some(why) => {
                tracing::debug!(volume = %self.s.name, state = %self.phase.state(), "volume {}: wake ignored: {why}", self.s.name);
            }
            None => {
                tracing::debug!(volume = %self.s.name, "volume {}: wake: a device appeared; retrying now", self.s.name);
                // The device is new: its failures start a new backoff sequence.
                self.backoff.reset();
                self.next = clock.now;
            }
        }
    }

    /// `kvcrypt close NAME` through the agent: closes the served device like `kvcrypt close`
    /// does without an agent (refused while mounted or held open) and keeps the volume closed
    /// (`manual`) until `kvcrypt unlock NAME`.
    pub(super) fn close_command(&mut self, clock: Clock, fx: &mut Vec<Effect>) {
        let name = self.s.name.clone();
        let refuse = |fx: &mut Vec<Effect>, r: CloseRefused| fx.push(Effect::ReplyClose(Err(r)));
        match &self.phase {
            Phase::Restarting { .. } => refuse(
                fx,
                CloseRefused::Busy(format!(
                    "its worker died and is being restarted ({}); try again, or kvcrypt lock {name}",
                    self.reason.as_deref().unwrap_or("-")
                )),
            ),
            Phase::Serving { served, .. } => {
                let served = served.clone();
                // Closing ends the worker on purpose: not a crash to recover from.
                fx.push(Effect::Unwatch);
                self.op = Some(Op::Closing { served });
                fx.push(Effect::Close { force: false });
            }
            Phase::Suspended { .. } => refuse(
                fx,
                CloseRefused::Busy(format!(
                    "suspended (filesystems frozen, I/O held): closing it now would fail that I/O; run kvcrypt unlock {name} first"
                )),
            ),
            _ if self.runtime => {
                // Nothing served (revoked and removed, or never unlocked): forget it.
                let was = self.phase.state();
                self.configured = false;
                self.next = clock.now + IDLE;
                self.phase = Phase::Locked;
                self.set_state(Some("closed by kvcrypt close".into()), fx);
                fx.push(Effect::ReplyClose(Ok(format!(
                    "was not open ({was}); no longer managed"
                ))));
            }
            _ => {
                self.manual = true;
                self.next = clock.now + IDLE;
                self.publish(fx);
                refuse(
                    fx,
                    CloseRefused::NotOpen(format!(
                        "not open ({}); it stays closed until kvcrypt unlock {name}",
                        self.phase.state()
                    )),
                );
            }
        }
    }

    pub(super) fn closed(
        &mut self,
        served: Served,
        r: Result<(), CloseFailed>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        let bd = served.block_device.display().to_string();
        match r {
            Ok(()) => {
                self.worker = None;
                self.slots = None;
                self.next = clock.now + IDLE;
                self.phase = Phase::Locked;
                if self.runtime {
                    // Opened by `kvcrypt open`: closing is the end of it. The task ends (see
                    // `finished`) and the daemon forgets the volume and its record.
                    self.configured = false;
                    self.set_state(Some("closed by kvcrypt close".into()), fx);
                } else {
                    self.manual = true;
                    self.set_state(
                        Some("closed by kvcrypt close; kvcrypt unlock serves it again".into()),
                        fx,
                    );
                }
                fx.push(Effect::ReplyClose(Ok(format!("closed {bd}"))));
            }
            Err(CloseFailed { busy, message }) => {
                // Still served by the same worker.
                self.serve(served, clock, fx);
                fx.push(Effect::ReplyClose(Err(if busy {
                    CloseRefused::Busy(message)
                } else {
                    CloseRefused::Failed(message)
                })));
            }
        }
    }
}
