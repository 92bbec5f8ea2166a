//! The pure core as tables: each row is an event (or the passing of time) and the effects the
//! core must answer with, by short tags (`publish:serving`, `spawn:recover3`, `access:key:2,1`
//! …). No platform, no runtime, no clock but the one the table moves. The shell and the core
//! together are tested with a fake platform in `agent/volume_tests.rs`.

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

use super::core::{Clock, Core, DeadProbe, Effect, Event, Want};
use crate::agent::config::{RevokePolicy, VolumeSettings};
use crate::agent::ports::{
    AccessClass, AccessError, CloseFailed, PlatformError, PlatformFailure, Served, SlotRef,
};
use crate::agent::status::VolumeState;
use crate::agent::volume_tests::settings;

/// The key the shared test settings pin (the volume tests' `PINNED`).
const KEY: &str = "https://v.vault.azure.net/keys/k";

fn slot(version: u32) -> SlotRef {
    slot_for(&format!("{KEY}/{version}"))
}

fn slot_for(key_id: &str) -> SlotRef {
    SlotRef {
        key_id: key_id.into(),
        algorithm: "RSA-OAEP-256".into(),
        wrapped: vec![1],
        check: Some(vec![2]),
        share: None,
    }
}

fn header(versions: &[u32]) -> Event {
    Event::HeaderRead(Ok(versions.iter().map(|v| slot(*v)).collect()))
}

fn dev() -> Option<PathBuf> {
    Some("/dev/fake".into())
}

fn fuse() -> Served {
    Served::new("/dev/fake".into(), "/dev/loop9".into())
}

fn ublk() -> Served {
    Served {
        ublk_dev_id: Some(3),
        ..Served::new("/dev/fake".into(), "/dev/ublkb3".into())
    }
}

fn err(class: AccessClass, m: &str) -> AccessError {
    AccessError::new(class, m)
}

fn denied() -> Event {
    Event::Access(Err(vec![err(AccessClass::Denied, "ForbiddenByRbac")]))
}

fn transient() -> Event {
    Event::Access(Err(vec![err(AccessClass::Transient, "503")]))
}

fn probed(recoverable: bool, fuse_held: bool) -> Event {
    Event::Probed(DeadProbe {
        recoverable,
        fuse_held,
    })
}

/// One row: an event and the effects expected, or time passing.
enum Step {
    Ev(Event, &'static str),
    Wait(Duration),
}

fn e(event: Event, tags: &'static str) -> Step {
    Step::Ev(event, tags)
}

fn tag(fx: &Effect) -> String {
    match fx {
        Effect::Publish(st) => format!("publish:{}", st.state),
        Effect::RememberManual(Some(_)) => "remember".into(),
        Effect::RememberManual(None) => "forget".into(),
        Effect::Watch => "watch".into(),
        Effect::Unwatch => "unwatch".into(),
        Effect::RepairHeader(_) => "repair".into(),
        Effect::Thaw(_) => "thaw".into(),
        Effect::ThawHeld(_) => "thaw-held".into(),
        Effect::ForgetFrozen => "forget-frozen".into(),
        Effect::DropKey => "drop-key".into(),
        Effect::Reply(Ok(_)) => "reply:ok".into(),
        Effect::Reply(Err(_)) => "reply:err".into(),
        Effect::ReplyClose(r) => format!("close-reply:{}", if r.is_ok() { "ok" } else { "err" }),
        Effect::End => "end".into(),
        Effect::Adopt => "adopt".into(),
        Effect::Locate(sels) => format!("locate:{}", sels.len()),
        Effect::ReadHeader(_) => "read-header".into(),
        Effect::Access { slots, want, .. } => {
            let versions: Vec<&str> = slots
                .iter()
                .map(|s| s.key_id.rsplit('/').next().unwrap_or(""))
                .collect();
            let want = if *want == Want::Key { "key" } else { "proof" };
            format!("access:{want}:{}", versions.join(","))
        }
        Effect::Spawn { recover: None, .. } => "spawn".into(),
        Effect::Spawn {
            recover: Some(id), ..
        } => format!("spawn:recover{id}"),
        Effect::ResumeWorker => "resume".into(),
        Effect::WorkerStatus => "status".into(),
        Effect::Suspend { .. } => "suspend".into(),
        Effect::Kill => "kill".into(),
        Effect::Close { force: false } => "close".into(),
        Effect::Close { force: true } => "close:force".into(),
        Effect::ForceRemove { .. } => "force-remove".into(),
        Effect::DeleteUblk(id) => format!("delete{id}"),
        Effect::RunHook { .. } => "hook".into(),
        Effect::Probe { .. } => "probe".into(),
        Effect::CleanDeadWorker(_) => "clean".into(),
        Effect::ReleaseFuse(_) => "release".into(),
        Effect::FollowRotation(_) => "rotate".into(),
        Effect::SystemStopping => "system-stopping".into(),
    }
}

/// Runs `steps` on a fresh core; returns the core and the last step's effects.
fn run(name: &str, s: VolumeSettings, steps: Vec<Step>) -> (Core, Vec<Effect>, Instant) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut core = Core::new(s, false, t0, 1);
    let mut last = Vec::new();
    for (i, step) in steps.into_iter().enumerate() {
        match step {
            Step::Wait(d) => now += d,
            Step::Ev(event, want) => {
                let shown = format!("{event:?}");
                let fx = core.step(
                    event,
                    Clock {
                        now,
                        unix: 1_700_000_000.0,
                    },
                );
                let got: Vec<String> = fx.iter().map(tag).collect();
                assert_eq!(
                    got.join(" "),
                    want,
                    "case {name:?}, row {i} ({shown}): effects differ"
                );
                last = fx;
            }
        }
    }
    (core, last, now)
}

/// Boot with the device present and the vault answering: locked → unlocking → serving.
fn boot() -> Vec<Step> {
    vec![
        e(Event::Start { manual: None }, "adopt"),
        e(Event::Adopted(None), "publish:locked"),
        e(Event::Tick, "locate:1"),
        e(Event::Located(dev()), "publish:unlocking read-header"),
        e(header(&[1]), "access:key:1"),
        e(Event::Access(Ok(vec![slot(1)])), "repair spawn"),
        e(Event::Spawned(Ok(fuse())), "watch publish:serving"),
    ]
}

fn boot_ublk() -> Vec<Step> {
    let mut steps = boot();
    steps.pop();
    steps.push(e(Event::Spawned(Ok(ublk())), "watch publish:serving"));
    steps
}

/// A serving volume whose periodic check is denied: frozen, key wiped, I/O held.
fn revoked(mut steps: Vec<Step>) -> Vec<Step> {
    steps.extend([
        e(Event::Tick, "status"),
        e(
            Event::WorkerStatus(Ok(serde_json::json!({}))),
            "access:proof:1",
        ),
        e(denied(), "unwatch suspend"),
        e(Event::Suspended(Ok(())), "publish:suspended"),
    ]);
    steps
}

fn cat(mut a: Vec<Step>, b: Vec<Step>) -> Vec<Step> {
    a.extend(b);
    a
}

#[test]
fn transitions() {
    let with = |f: fn(&mut VolumeSettings)| {
        let mut s = settings();
        f(&mut s);
        s
    };
    let cases: Vec<(&str, VolumeSettings, Vec<Step>, VolumeState)> = vec![
        (
            "boot unlocks and serves",
            settings(),
            boot(),
            VolumeState::Serving,
        ),
        (
            "an absent device backs off; a wake retries at once and serves",
            settings(),
            vec![
                e(Event::Start { manual: None }, "adopt"),
                e(Event::Adopted(None), "publish:locked"),
                e(Event::Tick, "locate:1"),
                e(Event::Located(None), "publish:locked"),
                e(Event::Wake, ""),
                e(Event::Tick, "locate:1"),
                e(Event::Located(dev()), "publish:unlocking read-header"),
                e(header(&[1]), "access:key:1"),
                e(Event::Access(Ok(vec![slot(1)])), "repair spawn"),
                e(Event::Spawned(Ok(fuse())), "watch publish:serving"),
            ],
            VolumeState::Serving,
        ),
        (
            "a vault that is down at boot leaves the volume locked",
            settings(),
            vec![
                e(Event::Start { manual: None }, "adopt"),
                e(Event::Adopted(None), "publish:locked"),
                e(Event::Tick, "locate:1"),
                e(Event::Located(dev()), "publish:unlocking read-header"),
                e(header(&[1]), "access:key:1"),
                e(transient(), "publish:locked"),
                // The device was there: a wake is no news, the backoff stands.
                e(Event::Wake, ""),
            ],
            VolumeState::Locked,
        ),
        (
            "a header naming only unpinned keys is never sent to a vault",
            settings(),
            vec![
                e(Event::Start { manual: None }, "adopt"),
                e(Event::Adopted(None), "publish:locked"),
                e(Event::Tick, "locate:1"),
                e(Event::Located(dev()), "publish:unlocking read-header"),
                e(
                    Event::HeaderRead(Ok(vec![slot_for(
                        "https://attacker.vault.azure.net/keys/k/1",
                    )])),
                    "publish:locked",
                ),
            ],
            VolumeState::Locked,
        ),
        (
            "a transient check failure keeps serving",
            settings(),
            cat(
                boot(),
                vec![
                    e(Event::Tick, "status"),
                    e(
                        Event::WorkerStatus(Ok(serde_json::json!({}))),
                        "access:proof:1",
                    ),
                    e(transient(), "publish:serving"),
                ],
            ),
            VolumeState::Serving,
        ),
        (
            "a denied check suspends",
            settings(),
            revoked(boot()),
            VolumeState::Suspended,
        ),
        (
            "offline_lock_after suspends after a long outage",
            with(|s| s.offline_lock_after = Some(Duration::from_secs(30))),
            cat(
                boot(),
                vec![
                    Step::Wait(Duration::from_secs(31)),
                    e(Event::Tick, "status"),
                    e(
                        Event::WorkerStatus(Ok(serde_json::json!({}))),
                        "access:proof:1",
                    ),
                    e(transient(), "unwatch suspend"),
                    e(Event::Suspended(Ok(())), "publish:suspended"),
                ],
            ),
            VolumeState::Suspended,
        ),
        (
            "restored access resumes the FUSE worker in place, then thaws",
            settings(),
            cat(
                revoked(boot()),
                vec![
                    e(Event::Tick, "access:key:1"),
                    e(Event::Access(Ok(vec![slot(1)])), "resume"),
                    e(Event::Resumed(Ok(())), "watch thaw publish:serving"),
                ],
            ),
            VolumeState::Serving,
        ),
        (
            "a suspended ublk volume resumes with a new worker recovering its device",
            settings(),
            cat(
                revoked(boot_ublk()),
                vec![
                    e(Event::Tick, "access:key:1"),
                    e(Event::Access(Ok(vec![slot(1)])), "spawn:recover3"),
                    e(Event::Spawned(Ok(ublk())), "watch thaw publish:serving"),
                ],
            ),
            VolumeState::Serving,
        ),
        (
            "a worker that fails the suspend is killed; resuming starts a new one",
            settings(),
            cat(
                boot(),
                vec![
                    e(Event::Tick, "status"),
                    e(
                        Event::WorkerStatus(Ok(serde_json::json!({}))),
                        "access:proof:1",
                    ),
                    e(denied(), "unwatch suspend"),
                    e(
                        Event::Suspended(Err(PlatformError::new(
                            PlatformFailure::WorkerControl,
                            "no answer",
                        ))),
                        "kill",
                    ),
                    e(Event::Killed(Ok("killed".into())), "publish:suspended"),
                    e(Event::Tick, "access:key:1"),
                    e(Event::Access(Ok(vec![slot(1)])), "spawn"),
                    e(Event::Spawned(Ok(fuse())), "watch thaw publish:serving"),
                ],
            ),
            VolumeState::Serving,
        ),
        (
            "hold expiry runs the hook, removes the device, thaws",
            settings(),
            cat(
                revoked(boot()),
                vec![
                    Step::Wait(Duration::from_secs(10)),
                    e(Event::Tick, "unwatch hook"),
                    e(Event::HookRan(Ok(())), "force-remove"),
                    e(Event::ForceRemoved(Ok(())), "thaw publish:removed"),
                ],
            ),
            VolumeState::Removed,
        ),
        (
            "revoke_policy remove removes at once",
            with(|s| s.revoke_policy = RevokePolicy::Remove),
            cat(
                boot(),
                vec![
                    e(Event::Tick, "status"),
                    e(
                        Event::WorkerStatus(Ok(serde_json::json!({}))),
                        "access:proof:1",
                    ),
                    e(denied(), "unwatch suspend"),
                    e(Event::Suspended(Ok(())), "publish:suspended unwatch hook"),
                    e(Event::HookRan(Ok(())), "force-remove"),
                    e(Event::ForceRemoved(Ok(())), "thaw publish:removed"),
                ],
            ),
            VolumeState::Removed,
        ),
        (
            "a dead ublk worker is replaced at once, recovering the same device",
            settings(),
            cat(
                boot_ublk(),
                vec![
                    e(
                        Event::WorkerExited("killed by signal 9".into()),
                        "unwatch probe",
                    ),
                    e(probed(true, false), "publish:unlocking"),
                    e(Event::Tick, "adopt"),
                    e(Event::Adopted(None), "locate:2"),
                    e(Event::Located(dev()), "access:key:1"),
                    e(Event::Access(Ok(vec![slot(1)])), "probe"),
                    e(probed(true, false), "spawn:recover3"),
                    e(Event::Spawned(Ok(ublk())), "watch publish:serving"),
                ],
            ),
            VolumeState::Serving,
        ),
        (
            "a dead FUSE worker's loop device is cleaned and the volume opened again",
            settings(),
            cat(
                boot(),
                vec![
                    e(
                        Event::WorkerExited("killed by signal 9".into()),
                        "unwatch probe",
                    ),
                    e(probed(false, false), "clean"),
                    e(Event::Cleaned("cleaned".into()), "publish:unlocking"),
                    e(Event::Tick, "adopt"),
                    e(Event::Adopted(None), "locate:2"),
                    e(Event::Located(dev()), "access:key:1"),
                    e(Event::Access(Ok(vec![slot(1)])), "spawn"),
                    e(Event::Spawned(Ok(fuse())), "watch publish:serving"),
                ],
            ),
            VolumeState::Serving,
        ),
        (
            "a revocation while the ublk worker is dead suspends without a new worker",
            settings(),
            cat(
                boot_ublk(),
                vec![
                    e(
                        Event::WorkerExited("killed by signal 9".into()),
                        "unwatch probe",
                    ),
                    e(probed(true, false), "publish:unlocking"),
                    e(Event::Tick, "adopt"),
                    e(Event::Adopted(None), "locate:2"),
                    e(Event::Located(dev()), "access:key:1"),
                    e(denied(), "probe"),
                    e(probed(true, false), "publish:suspended"),
                ],
            ),
            VolumeState::Suspended,
        ),
        (
            "a revocation while the FUSE worker is dead lets go of its held connection",
            settings(),
            cat(
                boot(),
                vec![
                    e(
                        Event::WorkerExited("killed by signal 9".into()),
                        "unwatch probe",
                    ),
                    e(probed(false, true), "clean"),
                    e(Event::Cleaned("cleaned".into()), "publish:unlocking"),
                    e(Event::Tick, "adopt"),
                    e(Event::Adopted(None), "locate:2"),
                    e(Event::Located(dev()), "access:key:1"),
                    e(denied(), "probe"),
                    e(probed(false, true), "release"),
                    e(Event::Cleaned("released".into()), "publish:locked"),
                ],
            ),
            VolumeState::Locked,
        ),
        (
            "a dead worker whose disk went away waits for the device",
            settings(),
            cat(
                boot_ublk(),
                vec![
                    e(
                        Event::WorkerExited("backing device gone".into()),
                        "unwatch probe",
                    ),
                    e(probed(true, false), "publish:unlocking"),
                    e(Event::Tick, "adopt"),
                    e(Event::Adopted(None), "locate:2"),
                    e(Event::Located(None), "probe"),
                    e(probed(true, false), "delete3"),
                    e(Event::UblkDeleted(Ok(())), "publish:locked"),
                ],
            ),
            VolumeState::Locked,
        ),
        (
            "kvcrypt lock suspends and answers once suspended; unlock resumes",
            settings(),
            cat(
                boot(),
                vec![
                    e(Event::Lock, "unwatch suspend"),
                    e(
                        Event::Suspended(Ok(())),
                        "remember publish:suspended reply:ok",
                    ),
                    // Locked by the operator: the timer does not resume it.
                    e(Event::Tick, ""),
                    e(Event::Unlock, "access:key:1"),
                    e(Event::Access(Ok(vec![slot(1)])), "resume"),
                    e(
                        Event::Resumed(Ok(())),
                        "watch thaw forget publish:serving reply:ok",
                    ),
                ],
            ),
            VolumeState::Serving,
        ),
        (
            "kvcrypt close of a mounted device is refused and it keeps serving",
            settings(),
            cat(
                boot(),
                vec![
                    e(Event::Close, "unwatch close"),
                    e(
                        Event::Closed(Err(CloseFailed {
                            busy: true,
                            message: "in use".into(),
                        })),
                        "watch close-reply:err",
                    ),
                ],
            ),
            VolumeState::Serving,
        ),
        (
            "kvcrypt close closes and keeps the volume closed",
            settings(),
            cat(
                boot(),
                vec![
                    e(Event::Close, "unwatch close"),
                    e(
                        Event::Closed(Ok(())),
                        "remember publish:locked close-reply:ok",
                    ),
                    e(Event::Tick, ""),
                ],
            ),
            VolumeState::Locked,
        ),
        (
            "kvcrypt close of a suspended volume is refused",
            settings(),
            cat(revoked(boot()), vec![e(Event::Close, "close-reply:err")]),
            VolumeState::Suspended,
        ),
        (
            "after a rotation the slot that worked is tried first",
            settings(),
            vec![
                e(Event::Start { manual: None }, "adopt"),
                e(Event::Adopted(None), "publish:locked"),
                e(Event::Tick, "locate:1"),
                e(Event::Located(dev()), "publish:unlocking read-header"),
                e(header(&[1, 2]), "access:key:1,2"),
                e(Event::Access(Ok(vec![slot(2)])), "repair spawn"),
                e(Event::Spawned(Ok(fuse())), "watch publish:serving"),
                e(Event::Tick, "status"),
                e(
                    Event::WorkerStatus(Ok(serde_json::json!({}))),
                    "access:proof:2,1",
                ),
                e(Event::Access(Ok(vec![slot(2)])), "publish:serving"),
            ],
            VolumeState::Serving,
        ),
        (
            "one transient slot among denials is not a revocation",
            settings(),
            cat(
                boot(),
                vec![
                    e(Event::Tick, "status"),
                    e(
                        Event::WorkerStatus(Ok(serde_json::json!({}))),
                        "access:proof:1",
                    ),
                    e(
                        Event::Access(Err(vec![
                            err(AccessClass::Denied, "KeyDisabled"),
                            err(AccessClass::Transient, "503"),
                        ])),
                        "publish:serving",
                    ),
                ],
            ),
            VolumeState::Serving,
        ),
        (
            "an operator's lock recorded by an earlier agent holds at start",
            settings(),
            vec![
                e(
                    Event::Start {
                        manual: Some("locked by kvcrypt lock".into()),
                    },
                    "adopt",
                ),
                e(Event::Adopted(None), "publish:locked"),
                e(Event::Tick, ""),
            ],
            VolumeState::Locked,
        ),
        (
            "agent stop while suspended leaves it suspended for the next agent",
            settings(),
            cat(
                revoked(boot()),
                vec![
                    e(Event::Shutdown, "unwatch system-stopping"),
                    e(
                        Event::SystemStopping(false),
                        "forget-frozen publish:suspended",
                    ),
                ],
            ),
            VolumeState::Suspended,
        ),
        (
            "system shutdown while suspended removes the device",
            settings(),
            cat(
                revoked(boot()),
                vec![
                    e(Event::Shutdown, "unwatch system-stopping"),
                    e(Event::SystemStopping(true), "force-remove"),
                    e(Event::ForceRemoved(Ok(())), "thaw-held publish:locked"),
                ],
            ),
            VolumeState::Locked,
        ),
    ];
    let n = cases.len();
    for (name, s, steps, end) in cases {
        let (core, _, _) = run(name, s, steps);
        assert_eq!(core.state(), end, "case {name:?}: final state");
        assert!(
            !core.busy(),
            "case {name:?}: a procedure is still under way"
        );
    }
    assert!(n >= 25, "{n} cases");
}

/// The timer the core asks for, for the states where it matters.
#[test]
fn timers() {
    let t = |steps: Vec<Step>| {
        let (core, _, now) = run("timer", settings(), steps);
        core.next().saturating_duration_since(now)
    };
    // Serving: the next check one interval later (jitter 0).
    assert_eq!(t(boot()), Duration::from_secs(1));
    // Locked after a failed start: unlock_retry backoff, 500 ms then doubling.
    let fail = |n: usize| {
        let mut steps = vec![
            e(Event::Start { manual: None }, "adopt"),
            e(Event::Adopted(None), "publish:locked"),
        ];
        for _ in 0..n {
            steps.push(e(Event::Tick, "locate:1"));
            steps.push(e(Event::Located(None), "publish:locked"));
        }
        steps
    };
    assert_eq!(t(fail(1)), Duration::from_millis(500));
    assert_eq!(t(fail(3)), Duration::from_secs(2));
    assert_eq!(t(fail(5)), Duration::from_secs(4), "capped at max");
    // The first death of a worker restarts at once; the second in a row backs off.
    let die = |mut steps: Vec<Step>, second: bool| {
        steps.extend([
            e(Event::WorkerExited("signal 9".into()), "unwatch probe"),
            e(probed(true, false), "publish:unlocking"),
        ]);
        if second {
            steps.extend([
                e(Event::Tick, "adopt"),
                e(Event::Adopted(None), "locate:2"),
                e(Event::Located(dev()), "access:key:1"),
                e(Event::Access(Ok(vec![slot(1)])), "probe"),
                e(probed(true, false), "spawn:recover3"),
                e(Event::Spawned(Ok(ublk())), "watch publish:serving"),
                e(Event::WorkerExited("signal 9".into()), "unwatch probe"),
                e(probed(true, false), "publish:unlocking"),
            ]);
        }
        steps
    };
    assert_eq!(t(die(boot_ublk(), false)), Duration::ZERO);
    assert_eq!(t(die(boot_ublk(), true)), Duration::from_millis(500));
    // Suspended: checks at the interval, never past the end of `hold`.
    assert_eq!(t(revoked(boot())), Duration::from_secs(1));
    let mut steps = revoked(boot());
    steps.extend([
        Step::Wait(Duration::from_millis(9_500)),
        e(Event::Tick, "access:key:1"),
        e(transient(), "publish:suspended"),
    ]);
    assert_eq!(t(steps), Duration::from_millis(500));
}

/// The shell may give an outside event only between procedures, and only the outcome the
/// procedure waits for while one runs: anything else is a bug in the shell, caught here.
#[test]
#[should_panic(expected = "is not the outcome")]
fn a_wrong_outcome_is_refused() {
    run(
        "wrong outcome",
        settings(),
        vec![
            e(Event::Start { manual: None }, "adopt"),
            e(Event::Tick, ""),
        ],
    );
}

#[test]
#[should_panic(expected = "with no procedure under way")]
fn an_outcome_without_a_procedure_is_refused() {
    run(
        "stray outcome",
        settings(),
        vec![
            e(Event::Start { manual: None }, "adopt"),
            e(Event::Adopted(None), "publish:locked"),
            e(Event::Located(dev()), ""),
        ],
    );
}

/// The unwrapped key never reaches the core: the only effects that use it are the spawn and
/// resume right after a successful [`Want::Key`] access, and a key check never asks for one.
#[test]
fn only_unlock_and_resume_ask_for_the_key() {
    let (_, fx, _) = run(
        "serving check",
        settings(),
        cat(
            boot(),
            vec![
                e(Event::Tick, "status"),
                e(
                    Event::WorkerStatus(Ok(serde_json::json!({}))),
                    "access:proof:1",
                ),
            ],
        ),
    );
    assert!(matches!(
        fx.last(),
        Some(Effect::Access {
            want: Want::Proof,
            ..
        })
    ));
}

/// The counters behind the metrics: every access check by result (the latency of those that
/// asked the vault, from the step that sent the request to the step of its answer), and each
/// suspension, resume and removal.
#[test]
fn counters_count_checks_and_transitions() {
    let counters = |steps: Vec<Step>| {
        let (_, fx, _) = run("counters", settings(), steps);
        fx.iter()
            .rev()
            .find_map(|f| match f {
                Effect::Publish(st) => Some(st.counters.clone()),
                _ => None,
            })
            .expect("the last step publishes")
    };
    // Boot: the unwrap answered after 30 ms.
    let mut slow_boot = boot();
    slow_boot.insert(5, Step::Wait(Duration::from_millis(30)));
    let c = counters(slow_boot);
    assert_eq!((c.checks.ok, c.checks.denied), (1, 0));
    assert_eq!(c.check_seconds.count, 1);
    assert!((c.check_seconds.sum - 0.03).abs() < 1e-9, "{c:?}");
    // 0.03 s is in the (0.025, 0.05] bucket: cumulative counts 0, 0, 0, 1, …
    assert_eq!(&c.check_seconds.cumulative()[..4], &[0, 0, 0, 1]);
    assert_eq!((c.suspensions, c.resumes, c.removals), (0, 0, 0));

    // Revoked, then restored: one denied check, one suspension, one resume.
    let c = counters(cat(
        revoked(boot()),
        vec![
            e(Event::Tick, "access:key:1"),
            e(transient(), "publish:suspended"),
            e(Event::Tick, "access:key:1"),
            e(Event::Access(Ok(vec![slot(1)])), "resume"),
            e(Event::Resumed(Ok(())), "watch thaw publish:serving"),
        ],
    ));
    assert_eq!(
        (
            c.checks.ok,
            c.checks.denied,
            c.checks.transient,
            c.check_seconds.count
        ),
        (2, 1, 1, 4)
    );
    assert_eq!((c.suspensions, c.resumes, c.removals), (1, 1, 0));

    // Hold expired: removed.
    let c = counters(cat(
        revoked(boot()),
        vec![
            Step::Wait(Duration::from_secs(10)),
            e(Event::Tick, "unwatch hook"),
            e(Event::HookRan(Ok(())), "force-remove"),
            e(Event::ForceRemoved(Ok(())), "thaw publish:removed"),
        ],
    ));
    assert_eq!((c.suspensions, c.resumes, c.removals), (1, 0, 1));

    // A header naming no pinned key: counted as not_pinned, with no latency (no request).
    let c = counters(vec![
        e(Event::Start { manual: None }, "adopt"),
        e(Event::Adopted(None), "publish:locked"),
        e(Event::Tick, "locate:1"),
        e(Event::Located(dev()), "publish:unlocking read-header"),
        e(
            Event::HeaderRead(Ok(vec![slot_for(
                "https://attacker.vault.azure.net/keys/k/1",
            )])),
            "publish:locked",
        ),
    ]);
    assert_eq!((c.checks.not_pinned, c.check_seconds.count), (1, 0));
}
