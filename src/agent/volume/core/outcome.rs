//! Continues the procedure under way with the outcome of its last effect.

use super::*;

impl Core {
    /// Continues the procedure `op` with the outcome `event` of its last effect.
    pub(super) fn resume_op(&mut self, op: Op, event: Event, clock: Clock, fx: &mut Vec<Effect>) {
        match (op, event) {
            (Op::AdoptFind { manual }, Event::Adopted(found)) => {
                self.adopt_found(manual, found, fx)
            }
            (Op::AdoptHeader { manual, served }, Event::HeaderRead(r)) => {
                match r {
                    Ok(slots) => self.slots = Some(slots),
                    Err(e) => self.record_error(&e, clock),
                }
                self.adopt(manual, served, clock, fx);
            }
            (Op::UnlockLocate { from }, Event::Located(found)) => {
                self.unlock_located(from, found, clock, fx)
            }
            (Op::UnlockHeader { from, dev }, Event::HeaderRead(r)) => match r {
                Ok(slots) => {
                    self.slots = Some(slots);
                    self.slot = None;
                    self.access(Want::Key, AfterAccess::Unlock { from, dev }, clock, fx);
                }
                Err(e) => {
                    self.record_error(&e, clock);
                    self.unlock_failed(
                        from,
                        format!("cannot read header of {}", dev.display()),
                        clock,
                        fx,
                    );
                }
            },
            (Op::UnlockSpawn { from, dev }, Event::Spawned(r)) => {
                self.unlock_spawned(from, dev, r, clock, fx)
            }
            (Op::Access { want, then }, Event::HeaderRead(r)) => match r {
                Ok(slots) => {
                    self.slots = Some(slots);
                    self.access(want, then, clock, fx);
                }
                Err(e) => self.accessed(then, Err(e), clock, fx),
            },
            (Op::Access { want: _, then }, Event::Access(r)) => {
                let r = r.map_err(|errors| combine(&errors)).and_then(|granted| {
                    let first = granted.first().cloned().ok_or_else(|| {
                        AccessError::new(AccessClass::Misconfigured, "no slot granted")
                    })?;
                    Ok((first, granted))
                });
                if let Ok((slot, granted)) = &r {
                    if self.slot.as_ref().is_some_and(|s| s.key_id != slot.key_id) {
                        tracing::info!(volume = %self.s.name, key_id = %slot.key_id,
                            "volume {}: key slot {} works; using it from now on", self.s.name, slot.key_id);
                    }
                    self.slot = Some(slot.clone());
                    for g in granted {
                        self.verified.insert(g.key_id.clone(), clock.unix);
                    }
                }
                self.accessed(then, r.map(drop), clock, fx);
            }
            (Op::Rotate, Event::Rotated(r)) => self.rotated(r, clock, fx),
            (Op::CheckStatus, Event::WorkerStatus(r)) => match r {
                Ok(v) => {
                    self.worker = Some(v);
                    self.access(Want::Proof, AfterAccess::CheckServing, clock, fx);
                }
                // The worker died (killed, crashed) without its exit being noticed (e.g. it
                // could not be watched): its key died with it.
                Err(e) => self.worker_died(format!("worker not answering: {e}"), fx),
            },
            (
                Op::LockSuspend {
                    reason,
                    manual,
                    served,
                },
                Event::Suspended(r),
            ) => match r {
                Ok(()) => self.enter_suspended(served, reason, manual, false, clock, fx),
                Err(e) => {
                    // A worker that did not confirm the suspend may still hold the key
                    // (wedged, or its answer lost): end it, so the key is gone for certain.
                    // Its I/O stays held (ublk: the device goes QUIESCED; FUSE: the agent
                    // holds the connection) and the resume path starts a new worker.
                    tracing::error!(volume = %self.s.name, error = %e, "volume {}: suspending the worker failed: {e}; killing it", self.s.name);
                    self.op = Some(Op::LockKill {
                        reason,
                        manual,
                        served,
                        error: e.message,
                    });
                    fx.push(Effect::Kill);
                }
            },
            (
                Op::LockKill {
                    reason,
                    manual,
                    served,
                    error,
                },
                Event::Killed(r),
            ) => {
                let killed = match r {
                    Ok(how) => {
                        tracing::warn!(volume = %self.s.name, "volume {}: {how}", self.s.name);
                        how
                    }
                    Err(k) => {
                        tracing::error!(volume = %self.s.name, error = %k, "volume {}: killing the worker failed: {k}", self.s.name);
                        format!("killing it failed: {k}")
                    }
                };
                let reason = format!("{reason}; suspend failed ({error}), {killed}");
                self.enter_suspended(served, reason, manual, true, clock, fx);
            }
            (Op::RemoveHook { reason, served }, Event::HookRan(r)) => {
                if let Err(e) = r {
                    tracing::warn!(volume = %self.s.name, error = %e, "volume {}: hook failed: {e}; removing anyway", self.s.name);
                }
                self.op = Some(Op::RemoveForce {
                    reason,
                    served: served.clone(),
                });
                fx.push(Effect::ForceRemove {
                    served,
                    suspended: true,
                });
            }
            (Op::RemoveForce { reason, served }, Event::ForceRemoved(r)) => {
                if let Err(e) = r {
                    tracing::error!(volume = %self.s.name, error = %e, "volume {}: closing {} failed: {e}", self.s.name, served.block_device.display());
                }
                // Thaw after removal only to let a lazily unmounted filesystem go away.
                fx.push(Effect::Thaw(served.block_device.clone()));
                self.removed(reason, clock, fx);
            }
            (Op::Resume { why, served, how }, Event::Spawned(r)) => {
                let r = match r {
                    Ok(new) => Ok(new),
                    Err(e) => Err(match how {
                        ResumeHow::Ublk(id) => format!("recovering ublk device {id}: {e}"),
                        _ => format!("starting a worker after the killed one: {e}"),
                    }),
                };
                self.resumed(why, served, r, clock, fx);
            }
            (Op::Resume { why, served, .. }, Event::Resumed(r)) => {
                let r = r.map(|()| served.clone()).map_err(|e| e.message);
                self.resumed(why, served, r, clock, fx);
            }
            (
                Op::ResumeFailed {
                    error,
                    block_device,
                },
                Event::ForceRemoved(_),
            ) => {
                fx.push(Effect::Thaw(block_device));
                self.phase = Phase::Locked;
                self.next = clock.now;
                self.set_state(Some(format!("resume failed: {error}")), fx);
            }
            (
                Op::DiedProbe {
                    detail,
                    served,
                    since,
                },
                Event::Probed(p),
            ) => self.died_probed(detail, served, since, p, clock, fx),
            (
                Op::DiedClean {
                    detail,
                    served,
                    unconfigured,
                    fuse_held,
                    retry_in,
                    delay,
                },
                Event::Cleaned(note),
            ) => {
                let bd = served.block_device.display().to_string();
                if unconfigured {
                    tracing::info!(volume = %self.s.name, block_device = %bd, cleanup = %note,
                        "volume {}: worker ended ({detail}); the volume is no longer in the configuration, so it is not opened again", self.s.name);
                    self.phase = Phase::Locked;
                    self.set_state(
                        Some(format!(
                            "worker ended ({detail}); removed from the configuration"
                        )),
                        fx,
                    );
                    return;
                }
                if fuse_held {
                    tracing::warn!(volume = %self.s.name, block_device = %bd, crashes_in_a_row = self.crash_streak, %retry_in, cleanup = %note,
                        "volume {}: serving worker died ({detail}); its FUSE connection is held, so I/O on {bd} waits for a new worker to take it over in place (restart in {retry_in}, crash {} in a row)",
                        self.s.name, self.crash_streak);
                } else {
                    tracing::warn!(volume = %self.s.name, block_device = %bd, crashes_in_a_row = self.crash_streak, %retry_in, cleanup = %note,
                        "volume {}: serving worker died ({detail}); in-flight and new I/O on {bd} failed (the FUSE connection died with it); opening the volume again in {retry_in} (crash {} in a row)",
                        self.s.name, self.crash_streak);
                }
                self.restart_later(served, fuse_held, detail, retry_in, delay, clock, fx);
            }
            (Op::RecoverAdopt { dead }, Event::Adopted(live)) => {
                // `kvcrypt open` may have restarted it meanwhile: take that worker over.
                match live.filter(|l| !l.suspended && !l.worker_dead) {
                    Some(live) => {
                        tracing::info!(volume = %self.s.name, block_device = %live.block_device.display(),
                            "volume {}: a new worker serves it already ({}); adopting it", self.s.name, live.block_device.display());
                        self.serve(live, clock, fx);
                        self.record_ok(clock);
                        self.next = clock.now + self.interval();
                        self.set_state(
                            Some("adopted a worker started outside the agent".into()),
                            fx,
                        );
                    }
                    None => {
                        // The disk itself went away (hot-unplug: the worker closed its device
                        // when it noticed, see worker::backing). Nothing to restart until it
                        // is back: wait for it like at boot (udev's attach wakes us when it
                        // reappears, possibly under another name). The disk it served from
                        // first (a cheap check): probing every device would read the held
                        // plaintext device too.
                        let sels = vec![
                            Selector::Path(dead.backing.clone()),
                            self.s.selector.clone(),
                        ];
                        self.op = Some(Op::RecoverLocate { dead });
                        fx.push(Effect::Locate(sels));
                    }
                }
            }
            (Op::RecoverLocate { dead }, Event::Located(found)) => match found {
                None => self.backing_gone(dead, clock, fx),
                Some(backing) => {
                    self.access(Want::Key, AfterAccess::Recover { dead, backing }, clock, fx)
                }
            },
            (Op::RecoverProbe { dead, backing }, Event::Probed(p)) => {
                let id = dead.ublk_dev_id.unwrap_or_default();
                let recover = if p.recoverable {
                    Some(id)
                } else {
                    tracing::warn!(volume = %self.s.name, block_device = %dead.block_device.display(),
                        "volume {}: ublk device {id} ({}) is gone (removed) or no longer recoverable; opening a new device instead (I/O that was queued on it is lost)", self.s.name, dead.block_device.display());
                    None
                };
                self.op = Some(Op::RecoverSpawn { dead, recover });
                fx.push(Effect::Spawn {
                    dev: backing,
                    recover,
                });
            }
            (Op::RecoverSpawn { dead, recover }, Event::Spawned(r)) => {
                self.recover_spawned(dead, recover, r, clock, fx)
            }
            (Op::GoneRelease { dead }, Event::Cleaned(note)) => {
                tracing::info!(volume = %self.s.name, block_device = %dead.block_device.display(), cleanup = %note, "volume {}: letting go of the held FUSE connection of {}", self.s.name, dead.block_device.display());
                self.backing_gone_ublk(dead, clock, fx);
            }
            (Op::GoneProbe { dead }, Event::Probed(p)) => match (p.recoverable, dead.ublk_dev_id) {
                (true, Some(id)) => {
                    self.op = Some(Op::GoneDelete { dead });
                    fx.push(Effect::DeleteUblk(id));
                }
                _ => self.backing_gone_done(dead, clock, fx),
            },
            (Op::GoneDelete { dead }, Event::UblkDeleted(r)) => {
                if let Err(e) = r {
                    tracing::error!(volume = %self.s.name, error = %e, "volume {}: deleting {} failed: {e}", self.s.name, dead.block_device.display());
                }
                self.backing_gone_done(dead, clock, fx);
            }
            (
                Op::DeadProbe {
                    reason,
                    manual,
                    dead,
                },
                Event::Probed(p),
            ) => {
                if p.recoverable {
                    self.enter_suspended(dead, reason, manual, false, clock, fx);
                } else if dead.ublk_dev_id.is_none() && p.fuse_held {
                    // A held FUSE connection would keep its I/O waiting for a worker that will
                    // not come: let go of it, so that I/O fails as it did before anything was
                    // held.
                    tracing::debug!(volume = %self.s.name, "volume {}: releasing the dead worker's FUSE connection", self.s.name);
                    self.op = Some(Op::DeadRelease { reason, manual });
                    fx.push(Effect::ReleaseFuse(dead));
                } else {
                    self.dead_locked(reason, manual, clock, fx);
                }
            }
            (Op::DeadRelease { reason, manual }, Event::Cleaned(note)) => {
                if let Phase::Restarting { dead, .. } = &self.phase {
                    tracing::info!(volume = %self.s.name, block_device = %dead.block_device.display(), cleanup = %note,
                        "volume {}: not taking over the dead worker's FUSE connection ({reason}); its held I/O fails", self.s.name);
                }
                self.dead_locked(reason, manual, clock, fx);
            }
            (Op::Closing { served }, Event::Closed(r)) => self.closed(served, r, clock, fx),
            (Op::ShutdownStopping, Event::SystemStopping(stopping)) => {
                self.shutdown_dead(stopping, fx)
            }
            (Op::ShutdownDeadProbe { stopping, dead }, Event::Probed(p)) => {
                if stopping && p.recoverable {
                    tracing::warn!(volume = %self.s.name, block_device = %dead.block_device.display(),
                        "volume {}: system shutting down with its worker dead: removing {} (its held I/O fails)", self.s.name, dead.block_device.display());
                    self.op = Some(Op::ShutdownDeadRemove { stopping });
                    fx.push(Effect::ForceRemove {
                        served: dead,
                        suspended: true,
                    });
                } else {
                    // A dead ublk worker's device stays QUIESCED with its I/O held and its
                    // state file in place: the next agent adopts it as suspended and
                    // recovers it.
                    tracing::warn!(volume = %self.s.name, block_device = %dead.block_device.display(),
                        "volume {}: its worker died and was not restarted before shutdown ({} stays for the next agent)", self.s.name, dead.block_device.display());
                    self.shutdown_served(stopping, fx);
                }
            }
            (Op::ShutdownDeadRemove { stopping }, Event::ForceRemoved(_)) => {
                self.shutdown_served(stopping, fx)
            }
            (
                Op::ShutdownServed {
                    block_device,
                    suspended,
                },
                r,
            ) => {
                let bd = block_device.display().to_string();
                match r {
                    Event::ForceRemoved(Err(e)) if suspended => {
                        tracing::error!(volume = %self.s.name, error = %e, "volume {}: removing {bd} failed: {e}", self.s.name);
                    }
                    Event::Closed(Err(e)) if !suspended => {
                        // A device still in use (mounted) is left to its worker, which a later
                        // agent adopts: closing it under a mounted filesystem would break that
                        // filesystem.
                        tracing::warn!(volume = %self.s.name, error = %e, "volume {}: {bd} not closed ({e}); its worker keeps serving", self.s.name);
                    }
                    _ => {}
                }
                fx.push(Effect::ThawHeld(block_device));
                self.stopped(VolumeState::Locked, "agent stopped", fx);
            }
            (op, event) => {
                if cfg!(any(test, debug_assertions)) {
                    panic!("{event:?} is not the outcome {op:?} waits for");
                }
                tracing::error!(volume = %self.s.name, "volume {}: internal error: {event:?} is not the outcome {op:?} waits for; ignored", self.s.name);
                self.op = Some(op);
            }
        }
    }
}
