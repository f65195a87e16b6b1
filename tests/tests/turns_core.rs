//! The node core in process (no sockets): two `NodeCore`s joined by an in-memory network. Failed
//! turns (Err and panic) roll back and consume their input; a changed root type migrates; the
//! alarm and stdin are inputs. (Output commit under power cuts: turns_output_commit.rs.)

use fams::alloc::PVec;
use fams::transport::NodeId;
use fams::turns::{App, Input, NodeConfig, NodeCore, NodeError, Turn, TurnError, TurnHeap};
use fams_tests::TempDir;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

fn addr(i: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10 + i as u16))
}

fn open<A: App>(dir: &TempDir, id: u64, peer: u64, app: A, now: Instant) -> Result<NodeCore<A>, NodeError> {
    let path = dir.join(&format!("n{id}.heap"));
    if !path.exists() {
        fams_tests::format(&path, 8 << 20, Some(4 << 20));
    }
    let heap = fams::Heap::open(&path, &fams::HeapOptions::default()).expect("open heap");
    let mut config = NodeConfig::new(NodeId(id));
    config.peers.push((NodeId(peer), addr(peer)));
    NodeCore::open(heap, config, app, now, SystemTime::now())
}

/// Move datagrams both ways and step both cores until `done` or a bounded number of rounds.
fn run_until<A: App, B: App>(
    a: &mut NodeCore<A>,
    b: &mut NodeCore<B>,
    now: &mut Instant,
    mut done: impl FnMut(&mut NodeCore<A>, &mut NodeCore<B>) -> bool,
) -> (Vec<u8>, Vec<u8>) {
    let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
    for _ in 0..20_000 {
        a.step(*now, 64).expect("step a");
        b.step(*now, 64).expect("step b");
        while let Some(t) = a.poll_transmit(*now) {
            assert_eq!(t.dest, addr(b.node().0));
            b.handle_datagram(*now, addr(a.node().0), &t.bytes);
        }
        while let Some(t) = b.poll_transmit(*now) {
            a.handle_datagram(*now, addr(b.node().0), &t.bytes);
        }
        while let Some(o) = a.poll_stdout() {
            out_a.extend_from_slice(&o);
        }
        while let Some(o) = b.poll_stdout() {
            out_b.extend_from_slice(&o);
        }
        if done(a, b) {
            return (out_a, out_b);
        }
        // Durability comes from the log writer thread in real time.
        std::thread::sleep(Duration::from_micros(200));
        *now += Duration::from_millis(1);
    }
    panic!("not done after 20,000 rounds");
}

fams::persistent! {
    struct Tally { ok: u64, scribble: u64 }
}

/// Sends a scripted list of messages at Start.
struct Script(Vec<&'static str>);
impl App for Script {
    fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
        if let Input::Start = input {
            for m in &self.0 {
                t.send(NodeId(2), m.as_bytes())?;
            }
        }
        Ok(())
    }
}

/// Counts "ok" messages; fails on "bad" and panics on "panic" — after scribbling on the heap
/// and sending, so a rollback that missed anything would show.
struct Picky;
impl App for Picky {
    fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
        let Input::Message { from, bytes, .. } = input else { return Ok(()) };
        let tally = t.heap.root(|_| Tally { ok: 0, scribble: 0 })?;
        tally.scribble += 1000;
        let ok = bytes == b"ok";
        if ok {
            tally.scribble -= 1000;
            tally.ok += 1;
        }
        t.send(from, b"reply")?;
        t.println("printed by a turn")?;
        match bytes {
            b"bad" => Err(TurnError::new("bad input")),
            b"panic" => panic!("the handler panicked on purpose"),
            _ => Ok(()),
        }
    }
}

#[test]
fn failed_turns_roll_back_and_consume_their_input() {
    let dir = TempDir::new("turns-fail");
    let mut now = Instant::now();
    let mut a = open(&dir, 1, 2, Script(vec!["ok", "bad", "ok", "panic", "ok"]), now).expect("a");
    let mut b = open(&dir, 2, 1, Picky, now).expect("b");
    let (_, out_b) = run_until(&mut a, &mut b, &mut now, |a, b| {
        b.stats().messages_consumed == 5 && a.is_quiescent() && b.is_quiescent()
    });
    let s = b.stats();
    assert_eq!((s.turns_failed, s.messages_consumed), (2, 5), "{s:?}");
    // Only the three good turns printed and replied.
    assert_eq!(String::from_utf8_lossy(&out_b).matches("printed by a turn").count(), 3);
    assert_eq!(a.stats().messages_consumed, 3, "replies of failed turns must not exist");
    let snap = b.snapshot().expect("snapshot");
    assert_eq!(snap.turns_failed, 2);
    assert!(snap.last_failure.contains("panicked on purpose"), "{snap:?}");
    assert_eq!(snap.peers[0].consumed, 5);
    drop(a);
    b.close(now).expect("close");
    // Reopened: the heap holds the three good turns and none of the failed ones' scribbles.
    let heap = fams::Heap::open(dir.join("n2.heap"), &fams::HeapOptions::default()).expect("reopen");
    let mut objects = fams::ObjectHeap::open(heap, &fams::ObjectOptions::default()).expect("objects");
    let tally = objects.root(|_| Tally { ok: 0, scribble: 0 }).expect("root");
    assert_eq!((tally.ok, tally.scribble), (3, 0));
}

fams::persistent! {
    struct RootV1 { count: u64 }
}
fams::persistent! {
    struct RootV2<'h> { count: u64, note: PVec<'h, u8> }
}

struct V1;
impl App for V1 {
    const SCHEMA_VERSION: u64 = 1;
    fn turn(&mut self, t: &mut Turn<'_>, _input: Input<'_>) -> Result<(), TurnError> {
        t.heap.root(|_| RootV1 { count: 0 })?.count += 1;
        Ok(())
    }
}

struct V2;
impl App for V2 {
    const SCHEMA_VERSION: u64 = 2;
    fn turn(&mut self, t: &mut Turn<'_>, _input: Input<'_>) -> Result<(), TurnError> {
        let (root, _) = t.heap.root_with_alloc(|a| RootV2 { count: 0, note: PVec::new_in(a) })?;
        root.count += 1;
        Ok(())
    }
    fn migrate(&mut self, heap: &mut TurnHeap<'_>, from: u64) -> Result<(), TurnError> {
        assert_eq!(from, 1);
        let old = heap.take_root::<RootV1>()?.ok_or_else(|| TurnError::new("no v1 root"))?;
        let (root, _) = heap.root_with_alloc(|a| {
            let mut note = PVec::new_in(a);
            note.extend_from_slice(b"migrated");
            RootV2 { count: old.count, note }
        })?;
        assert_eq!(root.count, old.count);
        Ok(())
    }
}

struct Idle;
impl App for Idle {
    fn turn(&mut self, _t: &mut Turn<'_>, _input: Input<'_>) -> Result<(), TurnError> {
        Ok(())
    }
}

#[test]
fn a_new_app_version_migrates_the_heap_in_a_turn() {
    let dir = TempDir::new("turns-migrate");
    let mut now = Instant::now();
    let peer_dir = TempDir::new("turns-migrate-peer");
    let mut idle = open(&peer_dir, 2, 1, Idle, now).expect("peer");
    let mut v1 = open(&dir, 1, 2, V1, now).expect("v1");
    run_until(&mut v1, &mut idle, &mut now, |a, _| a.turns_in_flight() == 0 && a.stats().turns >= 1);
    v1.close(now).expect("close v1");
    // Reopened by the new version: migrate, then Restarted.
    let mut v2 = open(&dir, 1, 2, V2, now).expect("v2");
    run_until(&mut v2, &mut idle, &mut now, |a, _| a.turns_in_flight() == 0 && a.stats().turns >= 1);
    v2.close(now).expect("close v2");
    let heap = fams::Heap::open(dir.join("n1.heap"), &fams::HeapOptions::default()).expect("reopen");
    let mut objects = fams::ObjectHeap::open(heap, &fams::ObjectOptions::schema(2)).expect("schema 2 recorded");
    let (root, _) = objects.root_with_alloc(|a| RootV2 { count: 0, note: PVec::new_in(a) }).expect("v2 root");
    // Start (v1) + Restarted (v2) each counted once.
    assert_eq!((root.count, &root.note[..]), (2, &b"migrated"[..]));
    drop(objects);
    // The old program refuses the newer heap instead of misreading it.
    match open(&dir, 1, 2, V1, now) {
        Err(NodeError::SchemaTooNew { found: 2, supported: 1, .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("the old version opened a migrated heap"),
    }
}

/// Sets an alarm at Start; echoes stdin lines; prints when the alarm fires.
struct Clock;
impl App for Clock {
    fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
        match input {
            Input::Start => t.set_alarm(Duration::from_millis(50)),
            Input::Alarm => t.println("alarm")?,
            Input::Stdin(line) => t.println(&format!("echo {}", String::from_utf8_lossy(line)))?,
            Input::Restarted => t.println("restarted")?,
            Input::Message { .. } => {}
        }
        Ok(())
    }
}

#[test]
fn alarm_and_stdin_are_inputs_and_a_clean_restart_reprints_nothing() {
    let dir = TempDir::new("turns-clock");
    let mut now = Instant::now();
    let mut a = open(&dir, 1, 2, Clock, now).expect("a");
    let mut b = open(&dir, 2, 1, Idle, now).expect("b");
    assert!(a.push_stdin(b"one".to_vec()));
    assert!(a.push_stdin(b"two".to_vec()));
    let (out, _) = run_until(&mut a, &mut b, &mut now, |a, _| a.stats().alarms == 1 && a.turns_in_flight() == 0);
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("echo one\necho two\n") && out.ends_with("alarm\n"), "{out:?}");
    assert_eq!(a.snapshot().unwrap().alarm_unix_ns, 0, "a fired alarm is cleared");
    a.close(now).expect("close");
    let mut a = open(&dir, 1, 2, Clock, now).expect("reopen");
    let (out, _) = run_until(&mut a, &mut b, &mut now, |a, _| a.stats().turns >= 1 && a.turns_in_flight() == 0);
    assert_eq!(String::from_utf8(out).unwrap(), "restarted\n");
}

/// Sends each stdin line to every peer it knows.
struct Fanout;
impl App for Fanout {
    fn turn(&mut self, t: &mut Turn<'_>, input: Input<'_>) -> Result<(), TurnError> {
        if let Input::Stdin(line) = input {
            for p in t.peers() {
                t.send(p, line)?;
            }
            t.println("sent")?;
        }
        Ok(())
    }
}

#[test]
fn a_dead_peer_fills_the_outbox_and_stops_input_until_it_is_retired() {
    let dir = TempDir::new("turns-retire");
    let now = Instant::now();
    let path = dir.join("n1.heap");
    fams_tests::format(&path, 8 << 20, Some(4 << 20));
    let heap = fams::Heap::open(&path, &fams::HeapOptions::default()).expect("open");
    let mut config = NodeConfig::new(NodeId(1));
    config.peers.push((NodeId(2), addr(2))); // never answers
    config.limits.outbox_messages_max = 8;
    config.limits.sends_per_turn_max = 2;
    let mut a = NodeCore::open(heap, config, Fanout, now, SystemTime::now()).expect("node");
    for i in 0..20 {
        assert!(a.push_stdin(format!("line {i}").into_bytes()));
    }
    for _ in 0..50 {
        a.step(now, 64).expect("step");
        a.flush(now).expect("flush");
    }
    // Input stops once the outbox to the silent peer is past outbox_messages_max - sends_per_turn_max.
    let stalled = a.stats().stdin_lines;
    assert_eq!(stalled, 7, "{:?}", a.stats());
    assert_eq!(a.snapshot().unwrap().peers[0].unacked_messages, 7);
    a.retire_peer(NodeId(2)).expect("retire");
    for _ in 0..50 {
        a.step(now, 64).expect("step");
        a.flush(now).expect("flush");
    }
    assert_eq!(a.stats().stdin_lines, 20, "input resumes after the retirement");
    let snap = a.snapshot().unwrap();
    assert!(snap.peers[0].retired && snap.peers[0].unacked_messages == 0, "{snap:?}");
    a.close(now).expect("close");
}
