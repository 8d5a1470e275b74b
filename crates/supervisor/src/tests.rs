//! Deterministic tests of the core, the witness, and scenarios in the
//! simulated world (fixed delays, no loss unless a test sets them).

use crate::sim::World;
use crate::*;

const A: usize = 0;
const B: usize = 1;

fn world(witness: bool) -> World {
    world_with(witness, |_| {})
}

fn world_with(witness: bool, tweak: impl Fn(&mut CoreConfig)) -> World {
    let mut w = World::new(1, witness, tweak);
    w.delay = (2, 2);
    w.op_delay = (10, 10);
    w
}

/// Both nodes started together and settled: alpha PRIM, beta SECOND in sync.
fn settled(witness: bool) -> World {
    let mut w = world(witness);
    w.start_node(A);
    w.start_node(B);
    w.run_for(10_000);
    assert_eq!(w.state(A), Some(NodeState::Prim));
    assert_eq!(w.state(B), Some(NodeState::Second));
    assert!(w.core(A).status().in_sync && w.core(B).status().in_sync);
    assert!(w.violations.is_empty(), "{:?}", w.violations);
    w
}

/// Resource commands of `node` recorded since index `from`.
fn res_cmds(w: &World, node: usize, from: usize) -> Vec<Command> {
    w.cmds[from..]
        .iter()
        .filter(|(_, n, c)| {
            *n == node
                && matches!(
                    c,
                    Command::Mount
                        | Command::Unmount { .. }
                        | Command::TakeVip
                        | Command::ReleaseVip
                        | Command::StartApp
                        | Command::StopApp
                        | Command::StartMirror { .. }
                        | Command::StopMirror
                )
        })
        .map(|(_, _, c)| c.clone())
        .collect()
}

fn refused(r: Option<Reply>) -> String {
    match r {
        Some(Reply::Refused { exit_code, reason }) => {
            assert_eq!(exit_code, 3);
            reason
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn ok(r: Option<Reply>) -> String {
    match r {
        Some(Reply::Ok { message }) => message,
        other => panic!("expected Ok, got {other:?}"),
    }
}

fn single(me: &str, peer: &str, tweak: impl Fn(&mut CoreConfig)) -> Core {
    let mut cfg = CoreConfig::new(me, peer);
    tweak(&mut cfg);
    match Core::new(cfg, PersistedState::default()) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

fn last_hb(cmds: &[Command]) -> Option<Heartbeat> {
    cmds.iter().rev().find_map(|c| match c {
        Command::SendHeartbeat(h) => Some(h.clone()),
        _ => None,
    })
}

fn peer_hb(seq: u64, state: NodeState, data_gen: u64) -> Heartbeat {
    Heartbeat {
        from: "beta".into(),
        boot: 1,
        seq,
        echo: None,
        state,
        serving: false,
        data_gen,
        gen_history: Vec::new(),
        known_gen: data_gen,
        in_sync: false,
        stale: false,
        candidate: true,
        intent_prim: false,
        handover: false,
        swap_request: false,
    }
}

// ----- configuration and start ------------------------------------------

#[test]
fn config_errors_name_the_problem() {
    let mut c = CoreConfig::new("a", "a");
    assert_eq!(c.validate(), Err(ConfigError::SameName("a".into())));
    c.peer = "b".into();
    c.timeout_ms = 500;
    assert!(matches!(
        c.validate(),
        Err(ConfigError::TimeoutTooShort { .. })
    ));
    c.timeout_ms = 3000;
    c.preferred = Some("z".into());
    assert_eq!(c.validate(), Err(ConfigError::PreferredUnknown("z".into())));
    c.preferred = None;
    c.interval_ms = 0;
    assert_eq!(c.validate(), Err(ConfigError::IntervalZero));
    let bad = PersistedState {
        data_gen: 5,
        known_gen: 3,
        ..PersistedState::default()
    };
    let err = Core::new(CoreConfig::new("a", "b"), bad).err();
    assert!(
        matches!(err, Some(InitError::Persisted(ref m)) if m.contains("known_gen")),
        "{err:?}"
    );
    let bad = PersistedState {
        data_gen: 5,
        known_gen: 5,
        gen_history: vec![3, 2],
        ..PersistedState::default()
    };
    assert!(Core::new(CoreConfig::new("a", "b"), bad).is_err());
}

#[test]
fn first_call_persists_the_boot_then_heartbeats() {
    let mut c = single("alpha", "beta", |_| {});
    let out = c.tick(1000);
    assert!(
        matches!(&out[0], Command::Persist(p) if p.boot_count == 1 && p.last_state == NodeState::Wait)
    );
    let hb = last_hb(&out).expect("a heartbeat at once");
    assert_eq!((hb.boot, hb.seq, hb.state), (1, 1, NodeState::Wait));
    assert_eq!(c.state(), NodeState::Wait);
    assert!(c.status().split_brain_possible);
    // Next heartbeat exactly one interval later, not before.
    assert!(last_hb(&c.tick(1199)).is_none());
    assert_eq!(last_hb(&c.tick(1200)).map(|h| h.seq), Some(2));
}

#[test]
fn a_stopped_node_restarts_stopped() {
    let p = PersistedState {
        last_state: NodeState::Stop,
        ..PersistedState::default()
    };
    let mut c = Core::new(CoreConfig::new("alpha", "beta"), p).unwrap_or_else(|e| panic!("{e}"));
    c.tick(0);
    c.tick(10_000);
    assert_eq!(c.state(), NodeState::Stop);
    assert!(c.status().transitions.is_empty());
}

// ----- timers -----------------------------------------------------------

#[test]
fn alone_only_after_the_full_timeout_without_a_peer() {
    let mut c = single("alpha", "beta", |_| {});
    c.tick(0);
    let out = c.tick(2999);
    assert_eq!(c.state(), NodeState::Wait, "{out:?}");
    let out = c.tick(3000);
    assert_eq!(c.state(), NodeState::Alone);
    let order: Vec<_> = out
        .iter()
        .filter(|c| !matches!(c, Command::Log { .. } | Command::SendHeartbeat(_)))
        .cloned()
        .collect();
    // The generation is persisted before the replication may go on alone,
    // and the VIP is taken before the mount; the app waits for the mount.
    assert!(
        matches!(order[0], Command::Persist(ref p) if p.data_gen == 2 && p.gen_history == vec![0])
    );
    assert_eq!(order[1], Command::AllowAlone { gen: 2 });
    assert_eq!(order[2], Command::TakeVip);
    assert_eq!(order[3], Command::Mount);
    assert!(!order.contains(&Command::StartApp));
    assert!(c
        .handle(3010, Event::MountReady)
        .contains(&Command::StartApp));
    c.handle(3020, Event::AppStarted);
    assert_eq!(c.resources().app, ResState::Up);
    let st = c.status();
    assert_eq!(st.transitions.len(), 1);
    assert_eq!(
        (st.transitions[0].at_ms, st.transitions[0].to),
        (3000, NodeState::Alone)
    );
}

#[test]
fn peer_is_alive_until_exactly_timeout_after_its_last_heartbeat() {
    let mut c = single("alpha", "beta", |_| {});
    c.tick(0);
    c.handle(100, Event::Heartbeat(peer_hb(1, NodeState::Prim, 0)));
    c.tick(200);
    assert_eq!(c.state(), NodeState::Second);
    c.tick(3099);
    assert!(c.status().peer.alive);
    assert_eq!(c.state(), NodeState::Second);
    let out = c.tick(3100);
    assert!(!c.status().peer.alive);
    assert!(out
        .iter()
        .any(|c| matches!(c, Command::Log { msg, .. } if msg.contains("silent"))));
    // Secondary with data in sync: failover (no witness) at that instant.
    assert_eq!(c.state(), NodeState::Alone);
}

#[test]
fn next_deadline_covers_peer_timeout_and_heartbeat() {
    let mut c = single("alpha", "beta", |_| {});
    c.tick(0);
    assert_eq!(c.next_deadline_ms(), 200);
    c.handle(150, Event::Heartbeat(peer_hb(1, NodeState::Wait, 0)));
    c.tick(3000);
    // Peer heard at 150: it dies at 3150, before the heartbeat at 3200.
    assert_eq!(c.next_deadline_ms(), 3150);
}

// ----- input hygiene ----------------------------------------------------

#[test]
fn foreign_malformed_and_reordered_heartbeats_change_nothing() {
    let mut c = single("alpha", "beta", |_| {});
    c.tick(0);
    let mut h = peer_hb(1, NodeState::Prim, 4);
    h.from = "mallory".into();
    let out = c.handle(10, Event::Heartbeat(h));
    assert!(out.iter().any(
        |c| matches!(c, Command::Log { level: Level::Warn, msg } if msg.contains("unknown node"))
    ));
    assert!(c.status().peer.state.is_none());
    let mut h = peer_hb(1, NodeState::Prim, 4);
    h.known_gen = 1;
    let out = c.handle(20, Event::Heartbeat(h));
    assert!(out
        .iter()
        .any(|c| matches!(c, Command::Log { msg, .. } if msg.contains("malformed"))));
    assert!(c.status().peer.state.is_none());
    assert_eq!(c.persisted().known_gen, 0);
    // A good one, then an older one that arrives late.
    c.handle(30, Event::Heartbeat(peer_hb(5, NodeState::Wait, 0)));
    c.handle(40, Event::Heartbeat(peer_hb(4, NodeState::Prim, 0)));
    assert_eq!(c.status().peer.state, Some(NodeState::Wait));
}

// ----- elections ----------------------------------------------------------

#[test]
fn simultaneous_start_elects_by_name() {
    for witness in [false, true] {
        let w = settled(witness);
        let t = w.core(A).status().transitions;
        assert_eq!(t.len(), 2, "{t:?}"); // WAIT -> ALONE -> PRIM
        assert!(w
            .core(B)
            .status()
            .transitions
            .iter()
            .all(|t| !t.to.is_primary()));
    }
}

#[test]
fn simultaneous_start_prefers_the_preferred_node() {
    for witness in [false, true] {
        let mut w = world_with(witness, |c| c.preferred = Some("beta".into()));
        w.start_node(A);
        w.start_node(B);
        w.run_for(10_000);
        assert_eq!(w.state(B), Some(NodeState::Prim));
        assert_eq!(w.state(A), Some(NodeState::Second));
        assert!(w.violations.is_empty());
    }
}

#[test]
fn freshest_data_wins_the_election_over_name() {
    let mut w = world(false);
    w.nodes[B].disk = PersistedState {
        data_gen: 3,
        gen_history: vec![0],
        known_gen: 3,
        ..PersistedState::default()
    };
    w.nodes[A].disk = PersistedState {
        known_gen: 0,
        ..PersistedState::default()
    };
    w.start_node(A);
    w.start_node(B);
    w.run_for(10_000);
    assert_eq!(w.state(B), Some(NodeState::Prim));
    assert_eq!(w.state(A), Some(NodeState::Second));
    assert_eq!(
        w.core(A).persisted().data_gen,
        w.core(B).persisted().data_gen
    );
}

// ----- planned stop / swap / failback --------------------------------------

#[test]
fn stop_of_prim_fails_over_in_order() {
    let mut w = settled(true);
    let mark = w.cmds.len();
    assert!(ok(w.admin(A, AdminCmd::Stop)).contains("moves to beta"));
    w.run_for(8000);
    assert_eq!(
        res_cmds(&w, A, mark),
        vec![
            Command::StopApp,
            Command::Unmount { flush: true },
            Command::ReleaseVip
        ]
    );
    assert_eq!(
        res_cmds(&w, B, mark),
        vec![
            Command::StopMirror,
            Command::TakeVip,
            Command::Mount,
            Command::StartApp
        ]
    );
    // B's first acquisition comes after A's release.
    let released = w.cmds[mark..]
        .iter()
        .position(|(_, n, c)| *n == A && *c == Command::ReleaseVip);
    let taken = w.cmds[mark..]
        .iter()
        .position(|(_, n, c)| *n == B && *c == Command::TakeVip);
    assert!(released < taken);
    assert_eq!(w.state(A), Some(NodeState::Stop));
    assert_eq!(w.state(B), Some(NodeState::Alone));
    // beta serves without a secondary: a new generation.
    assert!(w.core(B).persisted().data_gen > w.core(A).persisted().data_gen);
    assert!(w.violations.is_empty(), "{:?}", w.violations);
    // Restart alpha: it resyncs and becomes SECOND in sync.
    ok(w.admin(A, AdminCmd::Start));
    w.run_for(10_000);
    assert_eq!(w.state(A), Some(NodeState::Second));
    assert_eq!(w.state(B), Some(NodeState::Prim));
    assert!(w.core(A).status().in_sync);
}

#[test]
fn swap_moves_the_service_and_back() {
    let mut w = settled(true);
    let gen = w.core(A).persisted().data_gen;
    let mark = w.cmds.len();
    assert!(ok(w.admin(A, AdminCmd::Swap)).contains("swapping"));
    // Taking the service back during the handover is refused.
    let r = refused(w.admin(A, AdminCmd::Prim { force: false }));
    assert!(r.contains("handing the service over"), "{r}");
    w.run_for(5000);
    assert_eq!(w.state(B), Some(NodeState::Prim));
    assert_eq!(w.state(A), Some(NodeState::Second));
    assert_eq!(
        res_cmds(&w, A, mark),
        vec![
            Command::StopApp,
            Command::Unmount { flush: true },
            Command::ReleaseVip,
            Command::StartMirror { keep_aside: false }
        ]
    );
    assert_eq!(
        res_cmds(&w, B, mark),
        vec![
            Command::StopMirror,
            Command::TakeVip,
            Command::Mount,
            Command::StartApp
        ]
    );
    // A swap between in-sync nodes keeps the generation: nothing diverged.
    assert_eq!(w.core(B).persisted().data_gen, gen);
    // Swap asked on the secondary this time.
    assert!(ok(w.admin(A, AdminCmd::Swap)).contains("requested"));
    w.run_for(5000);
    assert_eq!(w.state(A), Some(NodeState::Prim));
    assert_eq!(w.state(B), Some(NodeState::Second));
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn failback_to_the_preferred_node_once_in_sync() {
    let mut w = world_with(true, |c| c.preferred = Some("alpha".into()));
    w.start_node(B);
    w.run_for(8000);
    assert_eq!(w.state(B), Some(NodeState::Alone));
    w.start_node(A);
    w.run_for(15_000);
    assert_eq!(w.state(A), Some(NodeState::Prim));
    assert_eq!(w.state(B), Some(NodeState::Second));
    assert!(w
        .core(B)
        .status()
        .transitions
        .iter()
        .any(|t| t.reason.contains("failback")));
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

// ----- refusals -------------------------------------------------------------

#[test]
fn refusals_say_the_state_and_what_to_do() {
    let mut w = settled(true);
    let r = refused(w.admin(B, AdminCmd::Prim { force: false }));
    assert!(
        r.contains("SECOND") && r.contains("alpha is PRIM") && r.contains("swap"),
        "{r}"
    );
    let r = refused(w.admin(A, AdminCmd::Second));
    assert!(r.contains("PRIM") && r.contains("hapair swap"), "{r}");
    assert!(ok(w.admin(A, AdminCmd::Prim { force: false })).contains("already PRIM"));
    assert!(ok(w.admin(B, AdminCmd::Second)).contains("already"));
    assert!(ok(w.admin(A, AdminCmd::Start)).contains("already started"));
    // Swap needs an in-sync pair: cut the replication so beta falls behind.
    w.set_link(A, B, false);
    w.run_for(1000);
    let r = refused(w.admin(A, AdminCmd::Swap));
    assert!(r.contains("not an in-sync secondary"), "{r}");
    w.run_for(5000);
    let r = refused(w.admin(B, AdminCmd::Swap));
    assert!(r.contains("WAIT"), "{r}");
    // Refused commands changed nothing.
    assert_eq!(w.state(A), Some(NodeState::Alone));
    assert_eq!(w.state(B), Some(NodeState::Wait));
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn stale_node_waits_and_prim_needs_force() {
    let mut w = settled(true);
    // beta goes away; alpha serves alone in a new generation.
    w.crash_node(B);
    w.run_for(6000);
    assert_eq!(w.state(A), Some(NodeState::Alone));
    let newer = w.core(A).persisted().data_gen;
    // alpha dies; beta comes back alone: its data is older than what the
    // witness registered, so it must not serve.
    w.crash_node(A);
    w.start_node(B);
    w.run_for(15_000);
    assert_eq!(w.state(B), Some(NodeState::Wait));
    assert!(w.core(B).persisted().data_gen < newer);
    assert!(
        w.core(B).status().detail.contains("witness refused"),
        "{}",
        w.core(B).status().detail
    );
    assert!(w.violations.is_empty(), "{:?}", w.violations);
    // The operator decides to serve the old data anyway.
    ok(w.admin(B, AdminCmd::Prim { force: true }));
    w.run_for(3000);
    assert_eq!(w.state(B), Some(NodeState::Alone));
    assert!(w.core(B).persisted().data_gen > newer);
    // alpha returns: it diverged (its newest generation was never seen by
    // beta), so its data is kept aside before the resync.
    w.start_node(A);
    w.run_for(15_000);
    assert_eq!(w.state(A), Some(NodeState::Second));
    let keep = w
        .cmds
        .iter()
        .any(|(_, n, c)| *n == A && *c == Command::StartMirror { keep_aside: true });
    assert!(keep);
}

#[test]
fn prim_refuses_stale_data_without_force() {
    let mut c = single("alpha", "beta", |_| {});
    c.tick(0);
    // The peer says it has a newer generation.
    c.handle(10, Event::Heartbeat(peer_hb(1, NodeState::Stop, 5)));
    let out = c.handle(
        20,
        Event::Admin {
            id: 7,
            cmd: AdminCmd::Prim { force: false },
        },
    );
    let reply = out.iter().find_map(|c| match c {
        Command::Reply { id: 7, reply } => Some(reply.clone()),
        _ => None,
    });
    let r = refused(reply);
    assert!(
        r.contains("WAIT") && r.contains("stale") && r.contains("--force"),
        "{r}"
    );
    assert_eq!(c.state(), NodeState::Wait);
    let out = c.handle(
        30,
        Event::Admin {
            id: 8,
            cmd: AdminCmd::Prim { force: true },
        },
    );
    assert!(out.iter().any(|c| matches!(
        c,
        Command::Reply {
            id: 8,
            reply: Reply::Ok { .. }
        }
    )));
    assert_eq!(c.state(), NodeState::Alone);
    // Minted above everything known, with this node's parity (alpha: even).
    assert_eq!(c.persisted().data_gen, 6);
}

// ----- failures -------------------------------------------------------------

#[test]
fn crash_of_primary_fails_over_after_timeout_not_before() {
    let mut w = settled(true);
    let gen = w.core(A).persisted().data_gen;
    w.crash_node(A);
    w.run_for(50);
    let heard = w.core(B).status().peer.last_heard_ms.unwrap_or(0);
    w.run_for(heard + 2999 - w.now);
    assert_eq!(w.state(B), Some(NodeState::Second));
    w.run_for(3000);
    assert_eq!(w.state(B), Some(NodeState::Alone));
    let t = w
        .core(B)
        .status()
        .transitions
        .last()
        .cloned()
        .expect("a transition");
    // Timeout, then one round trip to the witness.
    assert!(
        t.at_ms >= heard + 3000 && t.at_ms <= heard + 3010,
        "{t:?} heard {heard}"
    );
    assert!(w.core(B).persisted().data_gen > gen);
    assert!(w.core(B).persisted().gen_history.contains(&gen));
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn witness_loss_alone_changes_nothing() {
    let mut w = settled(true);
    w.crash_witness();
    w.run_for(20_000);
    assert_eq!(w.state(A), Some(NodeState::Prim));
    assert_eq!(w.state(B), Some(NodeState::Second));
}

#[test]
fn losing_peer_and_witness_stops_service_everywhere() {
    let mut w = settled(true);
    w.set_link(A, 2, false);
    w.set_link(B, 2, false);
    w.run_for(500);
    let mark = w.cmds.len();
    w.set_link(A, B, false);
    w.run_for(10_000);
    assert_eq!(w.state(A), Some(NodeState::Wait));
    assert_eq!(w.state(B), Some(NodeState::Wait));
    // Emergency order: VIP first, no flush.
    assert_eq!(
        res_cmds(&w, A, mark),
        vec![
            Command::ReleaseVip,
            Command::StopApp,
            Command::Unmount { flush: false }
        ]
    );
    assert!(!w.nodes[A].vip && !w.nodes[B].vip);
    // The witness comes back: exactly one node serves again.
    w.heal_all();
    w.set_link(A, B, false);
    w.run_for(10_000);
    assert_eq!(w.primaries().len(), 1);
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn one_way_cut_never_gives_two_primaries() {
    for dir in [(A, B), (B, A)] {
        let mut w = settled(true);
        w.link[dir.0][dir.1] = false;
        w.run_for(20_000);
        assert_eq!(w.primaries().len(), 1, "cut {dir:?}");
        assert!(w.violations.is_empty(), "cut {dir:?}: {:?}", w.violations);
        w.heal_all();
        w.run_for(15_000);
        assert_eq!(w.primaries().len(), 1);
        assert!(w.violations.is_empty(), "{:?}", w.violations);
    }
}

#[test]
fn flapping_link_does_not_fail_over() {
    let mut w = settled(true);
    for _ in 0..15 {
        w.set_link(A, B, false);
        w.run_for(1000);
        w.set_link(A, B, true);
        w.run_for(1000);
    }
    w.run_for(10_000);
    assert!(w
        .core(B)
        .status()
        .transitions
        .iter()
        .all(|t| !t.to.is_primary()));
    assert_eq!(w.state(A), Some(NodeState::Prim));
    assert_eq!(w.state(B), Some(NodeState::Second));
    assert!(w.core(B).status().in_sync);
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn split_brain_without_witness_keeps_the_loser_aside() {
    let mut w = settled(false);
    assert!(w.core(A).status().split_brain_possible);
    w.set_link(A, B, false);
    w.run_for(8000);
    assert_eq!(w.primaries().len(), 2);
    w.set_link(A, B, true);
    w.run_for(15_000);
    assert_eq!(w.primaries().len(), 1);
    let (win, lose) = if w.state(A).is_some_and(|s| s.is_primary()) {
        (A, B)
    } else {
        (B, A)
    };
    assert!(
        w.core(win).status().split_brains_detected + w.core(lose).status().split_brains_detected
            >= 1
    );
    assert_eq!(w.state(lose), Some(NodeState::Second));
    assert!(w
        .cmds
        .iter()
        .any(|(_, n, c)| *n == lose && *c == Command::StartMirror { keep_aside: true }));
    assert!(w.core(lose).status().in_sync);
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn auto_failover_off_waits_for_the_operator() {
    let mut w = world_with(true, |c| c.auto_failover = false);
    w.start_node(A);
    w.start_node(B);
    w.run_for(10_000);
    w.crash_node(A);
    w.run_for(10_000);
    assert_eq!(w.state(B), Some(NodeState::Wait));
    assert!(w.core(B).status().detail.contains("hapair prim"));
    ok(w.admin(B, AdminCmd::Prim { force: false }));
    w.run_for(2000);
    assert_eq!(w.state(B), Some(NodeState::Alone));
}

#[test]
fn app_failures_restart_then_fail_over() {
    let mut w = settled(true);
    let mark = w.cmds.len();
    for _ in 0..3 {
        w.deliver(
            A,
            Event::AppCheckFailed {
                reason: "tcp 8080 refused".into(),
            },
        );
        w.run_for(100);
    }
    let restarts = w.cmds[mark..]
        .iter()
        .filter(|(_, n, c)| *n == A && *c == Command::RestartApp)
        .count();
    assert_eq!(restarts, 3);
    assert_eq!(w.core(A).status().restarts.in_window, 3);
    assert_eq!(w.state(A), Some(NodeState::Prim));
    w.deliver(
        A,
        Event::AppCheckFailed {
            reason: "tcp 8080 refused".into(),
        },
    );
    w.run_for(6000);
    assert_eq!(w.state(B), Some(NodeState::Prim));
    assert_eq!(w.state(A), Some(NodeState::Second));
    let st = w.core(A).status();
    assert_eq!(
        st.app_check.last_failure.as_deref(),
        Some("tcp 8080 refused")
    );
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn restart_of_the_secondary_resyncs_it() {
    let mut w = settled(true);
    w.crash_node(B);
    w.run_for(1000);
    w.start_node(B);
    w.run_for(15_000);
    assert_eq!(w.state(B), Some(NodeState::Second));
    assert!(w.core(B).status().in_sync);
    assert_eq!(
        w.core(A).persisted().data_gen,
        w.core(B).persisted().data_gen
    );
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}

#[test]
fn transitions_ring_is_bounded_and_timestamped() {
    let mut w = settled(false);
    for _ in 0..30 {
        ok(w.admin(A, AdminCmd::Swap)
            .or_else(|| w.admin(B, AdminCmd::Swap)));
        w.run_for(3000);
        let p = w.primaries();
        assert_eq!(p.len(), 1);
        ok(w.admin(p[0], AdminCmd::Swap));
        w.run_for(3000);
    }
    let st = w.core(A).status();
    assert_eq!(st.transitions.len(), MAX_TRANSITIONS);
    assert!(st.transitions.windows(2).all(|p| p[0].at_ms <= p[1].at_ms));
    assert_eq!(st.transitions.last().map(|t| t.to), Some(st.state));
}

// ----- the witness ------------------------------------------------------------

fn witness(now: u64) -> WitnessCore {
    WitnessCore::new(
        WitnessConfig {
            nodes: ["alpha".into(), "beta".into()],
            max_lease_ms: 3000,
        },
        WitnessPersisted::default(),
        now,
    )
}

fn wreq(from: &str, req: u64, data_gen: u64, new_gen: u64) -> WitnessRequest {
    WitnessRequest {
        from: from.into(),
        req,
        data_gen,
        new_gen,
        force: false,
        lease_ms: 5000,
    }
}

fn denied(o: &WitnessOutput) -> Option<DenyReason> {
    match o.reply.answer {
        WitnessAnswer::Denied { reason, .. } => Some(reason),
        WitnessAnswer::Granted { .. } => None,
    }
}

#[test]
fn witness_grants_one_holder_and_the_freshest_data() {
    let mut w = witness(0);
    assert_eq!(
        denied(&w.handle_request(100, &wreq("alpha", 1, 0, 2))),
        Some(DenyReason::Restarting)
    );
    let o = w.handle_request(3000, &wreq("alpha", 2, 0, 2));
    assert_eq!(
        o.reply.answer,
        WitnessAnswer::Granted {
            gen: 2,
            lease_ms: 3000
        }
    );
    assert_eq!(o.persist.map(|p| p.latest_gen), Some(2));
    assert_eq!(w.holder(5999), Some(("alpha", 6000)));
    assert_eq!(
        denied(&w.handle_request(5999, &wreq("beta", 1, 2, 3))),
        Some(DenyReason::HeldByPeer)
    );
    // Lease over: beta is refused for its data, not for the lease.
    assert_eq!(
        denied(&w.handle_request(6000, &wreq("beta", 2, 0, 3))),
        Some(DenyReason::StaleData)
    );
    assert_eq!(
        denied(&w.handle_request(6000, &wreq("beta", 3, 2, 1))),
        Some(DenyReason::Malformed)
    );
    assert_eq!(
        denied(&w.handle_request(6000, &wreq("mallory", 1, 9, 11))),
        Some(DenyReason::Malformed)
    );
    // A forced claim skips the freshness check but must go above.
    let mut f = wreq("beta", 4, 0, 3);
    f.force = true;
    assert!(denied(&w.handle_request(6000, &f)).is_none());
    assert_eq!(w.persisted().latest_gen, 3);
}

#[test]
fn witness_regrants_an_unused_registration_to_its_owner_only() {
    let mut w = witness(0);
    assert!(denied(&w.handle_request(3000, &wreq("alpha", 1, 2, 4))).is_none());
    // alpha crashed before learning it; beta (same old data) cannot serve.
    assert_eq!(
        denied(&w.handle_request(7000, &wreq("beta", 1, 2, 5))),
        Some(DenyReason::StaleData)
    );
    // alpha claims again from the same base (with another number): it gets
    // the generation it registered.
    let o = w.handle_request(7000, &wreq("alpha", 2, 2, 6));
    assert_eq!(
        o.reply.answer,
        WitnessAnswer::Granted {
            gen: 4,
            lease_ms: 3000
        }
    );
    // Released unused: the registration goes back.
    let p = w.handle_release(&WitnessRelease {
        from: "alpha".into(),
        gen: 4,
        revert_to: Some(2),
    });
    assert_eq!(p.map(|p| p.latest_gen), Some(2));
    assert!(w.holder(7001).is_none());
    assert!(denied(&w.handle_request(7001, &wreq("beta", 2, 2, 5))).is_none());
}

#[test]
fn core_claims_through_the_witness_and_uses_the_lease() {
    let mut c = single("alpha", "beta", |c| c.witness = true);
    c.tick(0);
    let out = c.tick(3000);
    let req = out.iter().find_map(|c| match c {
        Command::RequestWitness(r) => Some(r.clone()),
        _ => None,
    });
    let Some(req) = req else {
        panic!("no witness request in {out:?}")
    };
    assert_eq!((req.data_gen, req.new_gen, req.force), (0, 2, false));
    assert_eq!(c.state(), NodeState::Wait);
    let out = c.handle(
        3010,
        Event::WitnessGranted {
            req: req.req,
            gen: 2,
            lease_ms: 3000,
        },
    );
    assert_eq!(c.state(), NodeState::Alone);
    assert!(out.contains(&Command::AllowAlone { gen: 2 }));
    // Lease counted from the request's send time minus one interval.
    assert_eq!(c.status().witness.lease_until_ms, Some(3000 + 3000 - 200));
    // The state change sent a heartbeat at once: next one at 3210.
    assert_eq!(c.next_deadline_ms(), 3210);
    // It renews while alone; if the witness never answers, it stops
    // serving at the end of the lease, not one millisecond later.
    let mut t = 3010;
    while t < 5799 {
        t = c.next_deadline_ms().min(5799);
        c.tick(t);
    }
    assert_eq!(c.state(), NodeState::Alone);
    let out = c.tick(5800);
    assert_eq!(c.state(), NodeState::Wait);
    assert_eq!(
        out.iter()
            .find(|c| matches!(c, Command::ReleaseVip | Command::StopApp)),
        Some(&Command::ReleaseVip)
    );
}

#[test]
fn peer_says_stop_lets_the_secondary_take_over_without_waiting() {
    let mut c = single("alpha", "beta", |_| {});
    c.tick(0);
    let mut h = peer_hb(1, NodeState::Prim, 0);
    h.in_sync = true;
    c.handle(100, Event::Heartbeat(h));
    c.tick(150);
    assert_eq!(c.state(), NodeState::Second);
    c.handle(
        500,
        Event::PeerSaysStop {
            from: "beta".into(),
        },
    );
    assert_eq!(c.state(), NodeState::Alone);
    assert_eq!(c.status().transitions.last().map(|t| t.at_ms), Some(500));
}
