//! Adopting a worker at start, unlocking, and the access check every procedure shares.

use super::*;

impl Core {
    pub(super) fn adopt_found(
        &mut self,
        manual: Option<String>,
        found: Option<Served>,
        fx: &mut Vec<Effect>,
    ) {
        let Some(sv) = found else {
            if manual.is_some() {
                tracing::info!(volume = %self.s.name, "volume {}: stays locked ({}) until kvcrypt unlock", self.s.name, self.reason.as_deref().unwrap_or("-"));
            }
            self.publish(fx);
            return;
        };
        tracing::info!(volume = %self.s.name, block_device = %sv.block_device.display(),
            "volume {}: adopting the running worker serving {}{}", self.s.name, sv.block_device.display(),
            if sv.suspended { " (suspended)" } else { "" });
        let dev = sv.backing.clone();
        self.op = Some(Op::AdoptHeader { manual, served: sv });
        fx.push(Effect::ReadHeader(dev));
    }

    pub(super) fn adopt(
        &mut self,
        manual: Option<String>,
        sv: Served,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        if sv.worker_dead {
            // Agent and worker died together (e.g. `systemctl kill`): the worker's FUSE
            // connection survived in systemd's file descriptor store, its I/O waiting. Recover
            // it as if the worker had just died under us.
            let bd = sv.block_device.display().to_string();
            tracing::warn!(volume = %self.s.name, block_device = %bd,
                "volume {}: its worker is dead; its FUSE connection was kept, so I/O on {bd} waits for a new worker to take it over in place", self.s.name);
            self.phase = Phase::Restarting {
                dead: sv,
                shown: true,
            };
            self.record_ok(clock);
            if let Some(why) = manual {
                self.dead_to_locked(why, true, fx);
                return;
            }
            self.crash_streak = 1;
            self.next = clock.now;
            self.set_state(
                Some("worker found dead at agent start; taking its device over in place".into()),
                fx,
            );
            return;
        }
        let suspended = sv.suspended;
        // Counting from now is the conservative choice for offline_lock_after: the previous
        // agent's last check is unknown.
        self.record_ok(clock);
        if suspended {
            self.phase = Phase::Suspended {
                served: sv,
                since: clock.now,
                killed: false,
            };
            self.suspended_unix = Some(clock.unix);
            let why = match &manual {
                Some(m) => format!("adopted a suspended worker; {m}"),
                None => "adopted a suspended worker".into(),
            };
            self.set_state(Some(why), fx);
        } else {
            // Serving although recorded as locked (the previous agent died half-way): the
            // running device wins; the record is dropped with the next publish.
            self.manual = false;
            self.serve(sv, clock, fx);
            self.set_state(Some("adopted running worker".into()), fx);
        }
        self.next = if self.manual {
            clock.now + IDLE
        } else {
            clock.now
        };
    }

    /// locked/removed → unlocking → serving (or back, with a retry scheduled).
    pub(super) fn try_unlock(&mut self, fx: &mut Vec<Effect>) {
        let from = self.phase.state();
        self.op = Some(Op::UnlockLocate { from });
        fx.push(Effect::Locate(vec![self.s.selector.clone()]));
    }

    pub(super) fn unlock_failed(
        &mut self,
        from: VolumeState,
        reason: String,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        // A removed volume waits for restored access: poll it at the check interval.
        // A locked one (boot, absent, vault down) backs off.
        let (back, delay) = if from == VolumeState::Removed {
            (Phase::Removed, self.interval())
        } else {
            (Phase::Locked, self.backoff.next_delay(&mut self.rng))
        };
        self.next = clock.now + delay;
        self.phase = back;
        self.set_state(Some(reason), fx);
    }

    pub(super) fn unlock_located(
        &mut self,
        from: VolumeState,
        found: Option<PathBuf>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        let Some(dev) = found else {
            let r = format!("device not present ({})", self.s.selector);
            self.unlock_failed(from, r, clock, fx);
            self.waiting_for_device = true;
            return;
        };
        // Every later outcome (success or a failure with the device present) makes a wake
        // carry no news.
        self.waiting_for_device = false;
        self.phase = Phase::Unlocking;
        self.set_state(Some(format!("unlocking {}", dev.display())), fx);
        self.op = Some(Op::UnlockHeader {
            from,
            dev: dev.clone(),
        });
        fx.push(Effect::ReadHeader(dev));
    }

    pub(super) fn unlock_spawned(
        &mut self,
        from: VolumeState,
        dev: PathBuf,
        r: Result<Served, PlatformError>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        match r {
            Ok(sv) => {
                self.serve(sv, clock, fx);
                self.record_ok(clock);
                self.backoff.reset();
                self.manual = false;
                // Re-attached after removal: no longer suspended (status showed the old time).
                self.suspended_unix = None;
                self.next = clock.now + self.interval();
                let why = if from == VolumeState::Removed {
                    "access restored, re-attached"
                } else {
                    "unlocked"
                };
                self.set_state(Some(why.into()), fx);
            }
            Err(msg) => {
                let e = AccessError::new(
                    AccessClass::Transient,
                    format!("cannot start the worker for {}: {msg}", dev.display()),
                );
                self.record_error(&e, clock);
                self.unlock_failed(from, "worker failed to start".into(), clock, fx);
            }
        }
    }

    /// Starts an access check: unwraps the volume key (unlock, resume) or proves access
    /// (serving), from the slot that worked last first, then every other pinned slot. Reads
    /// the header of the served device first when none is held.
    pub(super) fn access(
        &mut self,
        want: Want,
        then: AfterAccess,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        let Some(slots) = &self.slots else {
            let dev = match &self.phase {
                Phase::Serving { served, .. } | Phase::Suspended { served, .. } => {
                    served.backing.clone()
                }
                _ => {
                    let e = AccessError::new(
                        AccessClass::Misconfigured,
                        "no device to read the header from",
                    );
                    return self.accessed(then, Err(e), clock, fx);
                }
            };
            self.op = Some(Op::Access { want, then });
            fx.push(Effect::ReadHeader(dev));
            return;
        };
        match plan_slots(&self.s, slots, self.slot.as_ref()) {
            Ok(slots) => {
                self.op = Some(Op::Access { want, then });
                self.check_sent = Some(clock.now);
                fx.push(Effect::Access {
                    slots,
                    want,
                    timeout: self.s.check_timeout,
                });
            }
            Err(e) => self.accessed(then, Err(e), clock, fx),
        }
    }

    /// The access check's result, to the procedure that asked for it.
    pub(super) fn accessed(
        &mut self,
        then: AfterAccess,
        r: Result<(), AccessError>,
        clock: Clock,
        fx: &mut Vec<Effect>,
    ) {
        // Every check counts, also one refused before any request (not pinned, no header);
        // only those that asked Key Vault have a latency.
        self.counters
            .checks
            .record(r.as_ref().err().map(|e| e.class));
        if let Some(sent) = self.check_sent.take() {
            let took = clock.now.saturating_duration_since(sent);
            self.counters.check_seconds.observe(took.as_secs_f64());
        }
        match then {
            AfterAccess::Unlock { from, dev } => match r {
                Ok(()) => {
                    fx.push(Effect::RepairHeader(dev.clone()));
                    self.op = Some(Op::UnlockSpawn {
                        from,
                        dev: dev.clone(),
                    });
                    fx.push(Effect::Spawn { dev, recover: None });
                }
                Err(e) => {
                    self.record_error(&e, clock);
                    if e.class == AccessClass::NotPinned {
                        tracing::error!(volume = %self.s.name, error = %e.message,
                            "volume {}: not unlocked, its key is not pinned: {}", self.s.name, e.message);
                        self.unlock_failed(
                            from,
                            format!("key not pinned: {}", e.message),
                            clock,
                            fx,
                        );
                        return;
                    }
                    self.unlock_failed(
                        from,
                        format!("cannot unwrap the key ({})", e.class),
                        clock,
                        fx,
                    );
                }
            },
            AfterAccess::CheckServing => self.checked_serving(r, clock, fx),
            AfterAccess::CheckSuspended { since } => match r {
                Ok(()) => self.resume("access restored".into(), fx),
                Err(e) => {
                    self.record_error(&e, clock);
                    self.publish(fx);
                    let hold_end = since + self.s.hold;
                    self.next = (clock.now + self.interval()).min(hold_end);
                }
            },
            AfterAccess::UnlockSuspended => match r {
                Ok(()) => self.resume("unlocked by kvcrypt unlock".into(), fx),
                Err(e) => {
                    self.record_error(&e, clock);
                    self.next = clock.now + self.interval();
                    self.publish(fx);
                    self.outcome = Some(Err(format!(
                        "cannot unwrap the key ({}): {}",
                        e.class, e.message
                    )));
                }
            },
            AfterAccess::Recover { dead, backing } => match r {
                Ok(()) => match dead.ublk_dev_id {
                    Some(_) => {
                        self.op = Some(Op::RecoverProbe {
                            dead: dead.clone(),
                            backing,
                        });
                        fx.push(Effect::Probe { served: dead });
                    }
                    None => {
                        self.op = Some(Op::RecoverSpawn {
                            dead,
                            recover: None,
                        });
                        fx.push(Effect::Spawn {
                            dev: backing,
                            recover: None,
                        });
                    }
                },
                Err(e) => {
                    self.record_error(&e, clock);
                    let offline = self.offline_for(clock.now);
                    if e.class == AccessClass::Denied || offline.is_some() {
                        let why = match offline {
                            Some(offline) => offline_reason(offline),
                            None => format!("access denied: {}", e.message),
                        };
                        tracing::warn!(volume = %self.s.name, reason = %why, "volume {}: not restarting the dead worker: {why}", self.s.name);
                        self.dead_to_locked(
                            format!("{why} (while its worker was down)"),
                            false,
                            fx,
                        );
                        return;
                    }
                    let d = self.restart_backoff.next_delay(&mut self.rng);
                    self.next = clock.now + d;
                    self.set_state(
                        Some(format!(
                            "worker died; cannot unwrap the key to restart it ({}), retrying in {}",
                            e.class,
                            short(d)
                        )),
                        fx,
                    );
                }
            },
        }
    }
}
