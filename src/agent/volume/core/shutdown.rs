//! The agent stopping: close what is served, leave a suspended volume for the next agent —
//! unless the whole system goes down.

use super::*;

impl Core {
    pub(super) fn shutdown(&mut self, fx: &mut Vec<Effect>) {
        fx.push(Effect::Unwatch);
        // A suspended volume (key gone, I/O held) is left as it is when only the agent stops
        // (`systemctl restart`): the next agent adopts it and resumes it in place. When the
        // whole machine goes down nothing will ever resume it, and its held I/O would hang the
        // shutdown (the final sync waits on it; thawing writes the superblock into it): then
        // the device is removed, the held I/O fails (none of it was acknowledged; the freeze
        // wrote back everything that was), and the filesystem is thawed onto the dead device.
        if matches!(
            self.phase,
            Phase::Suspended { .. } | Phase::Restarting { .. }
        ) {
            self.op = Some(Op::ShutdownStopping);
            fx.push(Effect::SystemStopping);
            return;
        }
        self.shutdown_dead(false, fx);
    }

    pub(super) fn shutdown_dead(&mut self, stopping: bool, fx: &mut Vec<Effect>) {
        if let Phase::Restarting { dead, .. } = &self.phase {
            let dead = dead.clone();
            self.phase = Phase::Locked;
            match dead.ublk_dev_id {
                Some(_) => {
                    self.op = Some(Op::ShutdownDeadProbe {
                        stopping,
                        dead: dead.clone(),
                    });
                    fx.push(Effect::Probe { served: dead });
                }
                None => {
                    tracing::warn!(volume = %self.s.name, block_device = %dead.block_device.display(),
                        "volume {}: its worker died and was not restarted before shutdown ({} stays for the next agent)", self.s.name, dead.block_device.display());
                    self.shutdown_served(stopping, fx);
                }
            }
            return;
        }
        self.shutdown_served(stopping, fx);
    }

    pub(super) fn shutdown_served(&mut self, stopping: bool, fx: &mut Vec<Effect>) {
        let (served, suspended) = match &self.phase {
            Phase::Serving { served, .. } => (served.clone(), false),
            Phase::Suspended { served, .. } => (served.clone(), true),
            _ => {
                self.stopped(VolumeState::Locked, "agent stopped", fx);
                return;
            }
        };
        let bd = served.block_device.display().to_string();
        if suspended && !stopping {
            // Thawing now would block on the held I/O; the next agent thaws after resume.
            tracing::info!(volume = %self.s.name, block_device = %bd,
                "volume {}: agent stopping while {bd} is suspended: left suspended for the next agent", self.s.name);
            fx.push(Effect::ForgetFrozen);
            self.stopped(VolumeState::Suspended, "agent stopped; left suspended", fx);
            return;
        }
        self.op = Some(Op::ShutdownServed {
            block_device: served.block_device.clone(),
            suspended,
        });
        if suspended {
            tracing::warn!(volume = %self.s.name, block_device = %bd,
                "volume {}: system shutting down while suspended: removing {bd} (I/O held since the suspension fails)", self.s.name);
            fx.push(Effect::ForceRemove {
                served,
                suspended: true,
            });
        } else {
            fx.push(Effect::Close { force: false });
        }
    }

    pub(super) fn stopped(&mut self, state: VolumeState, reason: &str, fx: &mut Vec<Effect>) {
        self.worker = None;
        self.phase = Phase::Stopped(state);
        self.set_state(Some(reason.into()), fx);
    }
}
