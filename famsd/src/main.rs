//! `famsd`: format, inspect and recover fams heaps; demonstrate and torture-test them.

use clap::{Parser, Subcommand};
use fams::{FlushMode, FormatOptions, Heap, HeapOptions, IoPath, TrackerKind};
use famsd::{demo, torture};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "famsd",
    version,
    about = "fams: a persistent heap whose changes become durable only at commit(), all or nothing",
    long_about = "fams maps a heap file into memory at a fixed address; a program writes it like ordinary \
memory and calls commit() to make everything written so far durable, atomically, through a redo log \
written with io_uring (O_DIRECT + RWF_DSYNC) to a file or a raw block device.\n\n\
Start with `famsd demo`. Make a heap with `famsd format`, look at it with `famsd inspect`, \
prove crash safety on your machine with `famsd torture`."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a heap file and its redo log.
    #[command(after_help = "Examples:\n  famsd format --heap /var/lib/app/app.heap --size 1G\n  \
famsd format --heap app.heap --size 256M --log /dev/nvme0n1p3   # log on a raw partition")]
    Format {
        /// The heap file to create (must not exist).
        #[arg(long)]
        heap: PathBuf,
        /// Heap size, e.g. 64M, 1G, 1GiB, 4096 (rounded up to 4 KiB). Disk space is reserved for it.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// The largest the heap may grow to (`famsd grow`, `Heap::grow`), e.g. 1T. Only address
        /// space is reserved for it, no disk (default: --size, a heap that never grows).
        #[arg(long, value_parser = parse_size)]
        max_size: Option<u64>,
        /// The log: a file to create (default: <heap>.log beside the heap) or a block device
        /// (a raw partition; its contents are destroyed).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Log size (default 64M for a file, the whole device for a block device).
        #[arg(long, value_parser = parse_size)]
        log_size: Option<u64>,
        /// Fixed base address to map the heap at, e.g. 0x300000000000 (default: picked at random).
        #[arg(long, value_parser = parse_addr)]
        base: Option<u64>,
        /// Take over a block device even if it holds a filesystem.
        #[arg(long)]
        force: bool,
        /// How the log is written: uring or sync (default: measured on the device now, the
        /// fastest durable 4 KiB write wins; recorded in the log, used by every open).
        #[arg(long)]
        io_path: Option<IoPath>,
        /// How log writes are made durable: dsync (RWF_DSYNC) or fdatasync (default: measured,
        /// like --io-path).
        #[arg(long)]
        flush_mode: Option<FlushMode>,
        #[arg(long)]
        json: bool,
    },
    /// Show a heap's identity, sizes, log superblock and what recovery would replay; for the heap
    /// of a turn node also its identity, peers, sequence numbers, outbox and counters.
    #[command(long_about = "Show a heap's identity, sizes, log superblock and what recovery would replay \
(read from the files without opening the heap).\n\n\
For the heap of a turn node (`famsd node …`) also: node id, incarnation, turns, and per peer the sequence \
numbers (next to send, acknowledged by the peer, consumed from it) and the unacknowledged outbox. While the \
node runs, its heap is locked and these come from the status file it rewrites every second \
(<heap>.status.json, with the transport's counters: retransmissions, duplicates dropped, rejected datagrams); \
when it is stopped, the heap is opened to read them — which, like any open, first replays its log.")]
    Inspect {
        #[arg(long)]
        heap: PathBuf,
        /// Use this log instead of the one recorded in the heap.
        #[arg(long)]
        log: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Grow a heap (offline: no other process may have it open) up to the maximum size it was
    /// formatted with. Disk space is reserved first; a crash part way leaves the old size or
    /// the new one.
    #[command(after_help = "Examples:\n  famsd format --heap data.heap --size 64M --max-size 1T\n  \
famsd grow --heap data.heap --size 10G\n  famsd inspect --heap data.heap   # size, max size, disk used")]
    Grow {
        #[arg(long)]
        heap: PathBuf,
        /// The new size, e.g. 10G (rounded up to 4 KiB); at most the heap's maximum size.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        log: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Rewrite a heap's header in the current format version, and raise the maximum size it may
    /// grow to (offline: no other process may have it open). Heaps made by earlier versions open
    /// without it; an upgrade lets them grow. Crash-safe: the new header is made durable beside
    /// the heap first, so a crash leaves the old header or the new one (the next open finishes
    /// an interrupted upgrade).
    #[command(
        after_help = "Examples:\n  famsd upgrade --heap data.heap                  # header to the current version\n  \
famsd upgrade --heap data.heap --max-size 1T    # and let it grow to 1 TiB\n  \
famsd grow --heap data.heap --size 10G"
    )]
    Upgrade {
        #[arg(long)]
        heap: PathBuf,
        /// Raise the maximum size to this, e.g. 1T (rounded up to 4 KiB). It cannot be lowered,
        /// and the address range [base, base + max) must be free: the base never moves.
        #[arg(long, value_parser = parse_size)]
        max_size: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Replay the log into the heap file now (opening a heap does this too).
    Recover {
        #[arg(long)]
        heap: PathBuf,
        #[arg(long)]
        log: Option<PathBuf>,
        /// On media corruption, keep what precedes the damage and drop the rest (says what is lost).
        #[arg(long)]
        salvage: bool,
        #[arg(long)]
        json: bool,
    },
    /// Measure commit latency and recovery on this machine's device, next to the device floor
    /// (an O_DIRECT write + flush of the same bytes) and the baselines (SQLite WAL, LMDB, Ken-style
    /// checkpoint files, plain msync), all in one run. With --turns: turn latency, throughput and
    /// restart time of two node processes, next to their floors and a Ken-style ping-pong.
    #[command(
        after_help = "Examples:\n  famsd bench --quick\n  famsd bench --dir /mnt/nvme/bench --json > result.json\n  \
famsd bench --log /dev/nvme0n1p3 --svg bench.svg   # destroys the partition's contents\n  \
famsd bench --turns --quick                     # ping-pong turns vs 2 × commit floor + UDP round trip\n  \
famsd bench --mount --quick                     # fsync/msync on a famsd mount vs SQLite WAL, msync, Heap::commit (root)"
    )]
    Bench {
        /// Benchmark turns instead of the heap: two `famsd node pingpong` processes on 127.0.0.1
        /// (window 1 and 64), the heap's commit_async rate, a Ken-style ping-pong and
        /// SIGKILL → restart → next turn; each next to its floor or baseline of the same run.
        #[arg(long, conflicts_with_all = ["log", "svg", "force"])]
        turns: bool,
        /// Benchmark a `famsd mount` (needs root or fusermount3): SQLite journal_mode=OFF on the
        /// mount vs SQLite WAL on the plain file system of --dir (1-row UPDATE, 100-row INSERT),
        /// msync(MS_SYNC) of 1 and 64 pages on the mount vs on the plain file system vs
        /// Heap::commit of the same pages, and the device floor; all in one run, interleaved.
        #[arg(long, conflicts_with_all = ["turns", "log", "svg", "force"])]
        mount: bool,
        /// With --mount: timed updates per row (default 1000, 200 with --quick).
        #[arg(long, requires = "mount", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        iterations: Option<u64>,
        /// Directory on the device under test (heap files, file logs, baselines).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Put the fams log (and the floor measurement) on this block device. Its contents are
        /// destroyed; a device holding a filesystem or a fams log is refused without --force.
        #[arg(long)]
        log: Option<PathBuf>,
        /// A shorter run (under a minute here): fewer rows and iterations.
        #[arg(long)]
        quick: bool,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
        /// Also draw the results into this SVG file.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Also write the JSON object into this file (the table still goes to stdout).
        #[arg(long)]
        save_json: Option<PathBuf>,
        /// Overwrite a block device even if it holds a filesystem or a fams log.
        #[arg(long)]
        force: bool,
    },
    /// Run a workload, kill it with SIGKILL mid-commit several times, recover, verify, report.
    Demo {
        /// Data directory to create and use.
        #[arg(long, default_value = "fams-demo")]
        dir: PathBuf,
    },
    /// Crash test: a child commits a verifiable pattern and is SIGKILLed at random moments; after
    /// each kill the heap must hold exactly one committed state, at or after the last acknowledged.
    /// With --power-loss: the same promise under simulated power cuts (unflushed writes kept,
    /// dropped or torn per 512-byte sector), including cuts during recovery.
    #[command(after_help = "Examples:\n  famsd torture --cycles 300 --json\n  \
famsd torture --cycles 300 --log /dev/loop0 --tracker mprotect\n  \
famsd torture --power-loss --states 100000 --seed 7 --json\n  \
famsd torture --power-loss --mount --states 2000 --seed 7 --json\n  \
famsd torture --turns --seeds 1000 --nodes 5 --app ring --json\n  \
famsd torture --list-mutations\n  \
famsd torture --power-loss --states 2000 --mutation skip-full-page-image   (a `--features mutations` build)")]
    Torture {
        /// Simulated power cuts instead of SIGKILL: the heap runs on a simulated machine whose
        /// disks have volatile write caches.
        #[arg(long)]
        power_loss: bool,
        /// With --power-loss: the mount's explorer instead of the heap's — the mount's request
        /// logic over a store on the simulated machine, a workload of creates, writes, truncates,
        /// syncs, closes without a sync, unlinks and renames cut at random I/O operations; every
        /// file must be exactly its last synced state (or, for the sync in flight, the new one).
        #[arg(long)]
        mount: bool,
        /// A deterministic simulation of a whole turn cluster (simulated network, clock and
        /// machines; kills, power cuts, partitions): runs --seeds seeds from --seed on and checks
        /// output commit, exactly-once FIFO delivery, liveness and the app's invariants. A failing
        /// seed S replays with --seed S --seeds 1.
        #[arg(long)]
        turns: bool,
        /// With --turns: how many seeds.
        #[arg(long, default_value_t = 1000)]
        seeds: u64,
        /// With --turns: nodes in the cluster (2 to 7).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// With --turns: the application, bank or ring.
        #[arg(long, default_value = "bank")]
        app: famsd::turn_sim::SimApp,
        /// Switch on a deliberate bug (a negative control; builds with `--features mutations`
        /// only): a heap mutation with --power-loss or the SIGKILL torture, a turn mutation with
        /// --turns. The checks must then report violations. See --list-mutations.
        #[arg(long)]
        mutation: Option<String>,
        /// List the deliberate bugs --mutation takes: name, layer (heap or turns), what it breaks
        /// (with --json: one JSON array). Works in every build; only `mutations` builds run them.
        #[arg(long)]
        list_mutations: bool,
        /// With --power-loss: how many crash states to explore and verify.
        #[arg(long, default_value_t = 10_000)]
        states: u64,
        /// With --power-loss: synchronous commits only, so a seed replays bit-exactly.
        #[arg(long)]
        sync_only: bool,
        /// Number of kill/recover/verify cycles.
        #[arg(long, default_value_t = 100)]
        cycles: u64,
        /// End the SIGKILL torture at the first violation (a negative control needs only one).
        #[arg(long)]
        stop_at_first_violation: bool,
        /// Dirty tracker: uffd, regions (uffd inside mprotect-gated 2 MiB regions: fastest small
        /// commits on large heaps) or mprotect (default: uffd where available).
        #[arg(long)]
        tracker: Option<TrackerKind>,
        /// Put the log on this file or block device (default: a file in --dir). A block device is
        /// overwritten.
        #[arg(long)]
        log: Option<PathBuf>,
        /// Working directory (default: a new one under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Heap size.
        #[arg(long, value_parser = parse_size, default_value = "8M")]
        heap_size: u64,
        /// Log size (small by default so the log wraps and checkpoints often).
        #[arg(long, value_parser = parse_size, default_value = "4M")]
        log_size: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Longest time a child runs before the kill, in milliseconds.
        #[arg(long, default_value_t = 40)]
        kill_after_ms_max: u64,
        /// Log I/O path: uring or sync (default: io_uring where the kernel allows it).
        #[arg(long)]
        io_path: Option<IoPath>,
        /// How log writes are made durable: dsync (RWF_DSYNC, FUA on a block device) or fdatasync.
        /// With --power-loss: the simulated log's mode for every state (default: drawn per state).
        #[arg(long)]
        flush_mode: Option<FlushMode>,
        /// Take over a block device even if it holds a filesystem.
        #[arg(long)]
        force: bool,
        /// Print one JSON object (cycles, violations, tracker, log_kind, ...).
        #[arg(long)]
        json: bool,
    },
    /// Run a turn-based node (the reference apps) on UDP, or read a node's state from its heap.
    #[command(subcommand)]
    Node(NodeCmd),
    /// A UDP fault relay between node processes on loopback: loses, duplicates, reorders and
    /// delays their datagrams, all from one seed (no root, no tc netem).
    #[command(
        long_about = "A UDP fault relay between node processes on loopback: it loses, duplicates, reorders \
and delays the datagrams the nodes send each other, all drawn from one seed (no root, no tc netem).\n\n\
It binds one socket per node, the node's *face* (--face, or any free port of 127.0.0.1). Configure every \
node with its peer i at face i (not at node i's real address). A datagram arriving on face i from node j's \
real address (--node, in node order) is sent to node i from face j: node i sees it come from the address \
it knows for j, and its replies to face j come back through the relay to node j. So unkeyed nodes (which \
accept a peer's datagrams only from its configured address) and keyed ones both work unchanged.\n\n\
Per datagram, from --seed: lost (--loss); else sent twice (--duplicate); each copy held for a delay \
uniform in --delay-ms, or, with --reorder, held past the whole delay range so later datagrams overtake \
it. Held datagrams wait in a queue of at most --queue-max datagrams and --queue-bytes-max bytes; beyond \
that they are dropped and counted. Datagrams from an address that is no node's are counted and dropped. \
Only 127.0.0.0/8 addresses are accepted.\n\n\
On start the relay prints one line on stdout, {\"relay\":\"ready\",\"faces\":[...]}. It stops on \
SIGTERM/SIGINT or after --timeout-s; its counters (received, forwarded, dropped, duplicated, reorder_held, \
reordered, delayed, queue_full_dropped, unknown_source_dropped, ...) go to --stats-json (rewritten every \
second and at exit) and, with --json, to stdout at exit. Logs (tracing) go to stderr; FAMS_LOG=debug \
for more.",
        after_help = "Example (two nodes through the relay; faces 127.0.0.1:8001 and :8002):\n  \
famsd relay --node 127.0.0.1:7001 --node 127.0.0.1:7002 --face 127.0.0.1:8001 --face 127.0.0.1:8002 \\\n    \
--loss 0.2 --duplicate 0.1 --reorder 0.1 --delay-ms 0..20 --seed 7 --json\n  \
famsd node bank --heap n1.heap --id 1 --listen 127.0.0.1:7001 --peer 2=127.0.0.1:8002\n  \
famsd node bank --heap n2.heap --id 2 --listen 127.0.0.1:7002 --peer 1=127.0.0.1:8001\n\
Or let the cluster harness run it: famsd node cluster --relay 0.2,0.1,0.1,0..20,7"
    )]
    Relay {
        /// A node's real (listening) address; repeat for each node, node 1 first.
        #[arg(long = "node", required = true)]
        nodes: Vec<std::net::SocketAddr>,
        /// The face of each node, in the order of --node (default: a free port of 127.0.0.1 each).
        #[arg(long = "face")]
        faces: Vec<std::net::SocketAddr>,
        /// Probability that a datagram is lost, in [0, 1).
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Probability that a datagram is sent twice, in [0, 1).
        #[arg(long, default_value_t = 0.0)]
        duplicate: f64,
        /// Probability that a copy is held past the delay range (so later ones overtake it), in [0, 1).
        #[arg(long, default_value_t = 0.0)]
        reorder: f64,
        /// Delay of each copy, uniform in MIN..MAX milliseconds (or one value), e.g. 0..20.
        #[arg(long, default_value = "0..0", value_parser = famsd::relay::parse_delay_range)]
        delay_ms: (u64, u64),
        /// Seed of every fault decision.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Held datagrams at most.
        #[arg(long, default_value_t = 4096)]
        queue_max: usize,
        /// Bytes of held datagrams at most, e.g. 8M.
        #[arg(long, value_parser = parse_size, default_value = "8M")]
        queue_bytes_max: u64,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
        /// Rewrite the counters (JSON) in this file every second and at exit.
        #[arg(long)]
        stats_json: Option<PathBuf>,
        /// Stop when the process that started the relay is gone (for harnesses).
        #[arg(long)]
        exit_with_parent: bool,
        /// Print the counters as JSON on stdout at exit.
        #[arg(long)]
        json: bool,
    },
    /// Mount a store (a heap made by `famsd format`) as a file system whose fsync, fdatasync and
    /// msync(MS_SYNC) are failure-atomic per file. DEFAULT: a file's changes that were never
    /// synced are DISCARDED when its last opener closes it (see --commit-on-close).
    #[command(
        long_about = "Mount a store (a heap made by `famsd format`) as a FUSE file system whose fsync, fdatasync \
and msync(MS_SYNC) are failure-atomic per file, for unmodified programs.\n\n\
What is durable when:\n\
- create, mkdir, unlink, rmdir, rename, chmod, chown, utimes: durable when they return;\n\
- file data and size changes (write, mapped pages, ftruncate) are staged in the daemon's memory and \
become durable together at the file's next fsync/fdatasync/msync(MS_SYNC): one commit per sync with \
all of that file's staged changes and nothing of other files. After a crash (process kill, kernel \
panic, power cut) every file holds exactly its state at one of its syncs, never a mix.\n\n\
DEFAULT ON CLOSE: when the last opener of a file closes (and unmaps) it without syncing, its unsynced \
changes are DISCARDED and no process sees them again. Tools that never fsync (cp, echo >, tar) \
therefore leave nothing behind unless the mount has --commit-on-close.\n\n\
If the daemon dies, the mount point answers ENOTCONN: run `famsd umount MOUNTPOINT`, then mount again; \
everything synced is there.",
        after_help = "Examples:\n  famsd format --heap files.heap --size 64M --max-size 64G\n  \
famsd mount files.heap /mnt/fams            # in the background; log in files.heap.mount.log\n  \
famsd mount files.heap /mnt/fams --foreground --commit-on-close\n  \
famsd umount /mnt/fams"
    )]
    Mount {
        /// The store: a heap made by `famsd format` (use --max-size so it can grow).
        store: PathBuf,
        /// An existing, empty directory.
        mountpoint: PathBuf,
        /// Stay in the foreground (logs on stderr; FAMS_LOG=debug for more).
        #[arg(long)]
        foreground: bool,
        /// Commit a file's unsynced changes when it is closed (every close and the last release),
        /// instead of DISCARDING them at the last close (the default). For tools that never fsync.
        #[arg(long)]
        commit_on_close: bool,
        /// Unsynced data of all files together, at most (e.g. 512M). A write that needs more is
        /// refused with ENOSPC (nothing spills to disk).
        #[arg(long, value_parser = parse_size, default_value = "512M")]
        staging_max: u64,
        /// The store's redo log, if not the one recorded in the heap.
        #[arg(long)]
        log: Option<PathBuf>,
        /// In the background: append the daemon's log to this file (default: STORE.mount.log).
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// Unmount a `famsd mount`; a mount whose daemon died (ENOTCONN) is detached so it can be
    /// mounted again.
    Umount {
        mountpoint: PathBuf,
        /// Detach even if files are open in it (it goes once they are closed).
        #[arg(long)]
        lazy: bool,
    },
    #[command(hide = true)]
    TortureChild {
        #[arg(long)]
        heap: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        run_seed: u64,
        #[arg(long)]
        tracker: Option<TrackerKind>,
        #[arg(long)]
        io_path: Option<IoPath>,
        #[arg(long)]
        flush_mode: Option<FlushMode>,
        #[arg(long)]
        log: Option<PathBuf>,
        /// Say `filled` once this many log bytes are written since the last checkpoint.
        #[arg(long)]
        fill_log_bytes: Option<u64>,
    },
}

/// Where and as whom a node runs.
#[derive(clap::Args, Clone)]
struct NodeFlags {
    /// The node's heap (made on first use, --size bytes, with its log beside it).
    #[arg(long)]
    heap: PathBuf,
    /// This node's id (1 or more); a heap belongs to one id for life.
    #[arg(long)]
    id: u64,
    /// UDP address to listen on, e.g. 127.0.0.1:7001.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// A peer, as ID=ADDRESS (repeat for each peer), e.g. --peer 2=127.0.0.1:7002.
    #[arg(long = "peer", value_parser = famsd::node::parse_peer)]
    peers: Vec<(fams::transport::NodeId, std::net::SocketAddr)>,
    /// Shared key (64 hex digits): every datagram carries a keyed MAC; others are rejected.
    #[arg(long, value_parser = famsd::node::parse_key)]
    key: Option<[u8; 32]>,
    /// Heap size when the heap is made (it grows on demand, up to 64 GiB or this size if larger).
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    size: u64,
    #[arg(long)]
    tracker: Option<TrackerKind>,
    /// Turns committed but not yet durable, at most (pipelining depth).
    #[arg(long, default_value_t = 64)]
    in_flight: u64,
    /// Feed stdin lines to the app as inputs (at most once).
    #[arg(long)]
    stdin: bool,
    /// Write the node's counters here as JSON when it stops.
    #[arg(long)]
    stats_json: Option<PathBuf>,
    /// Inject faults into this node's outgoing datagrams: LOSS,DUPLICATE,REORDER,SEED
    /// (probabilities), e.g. 0.3,0.1,0.1,7. For fault runs.
    #[arg(long, value_parser = fams::turns::FaultConfig::parse)]
    faults: Option<fams::turns::FaultConfig>,
}

impl NodeFlags {
    fn args(&self) -> famsd::node::NodeArgs {
        famsd::node::NodeArgs {
            heap: self.heap.clone(),
            id: self.id,
            listen: self.listen,
            peers: self.peers.clone(),
            key: self.key,
            size_bytes: self.size,
            tracker: self.tracker,
            turns_in_flight_max: self.in_flight,
            stdin: self.stdin,
            stats_json: self.stats_json.clone(),
            faults: self.faults,
        }
    }
}

#[derive(Subcommand)]
enum NodeCmd {
    /// A bank: accounts on every node, transfers between nodes by message; the total never
    /// changes and every transfer is applied exactly once, whatever crashes.
    #[command(after_help = "Example (three terminals):\n  \
famsd node bank --heap n1.heap --id 1 --listen 127.0.0.1:7001 --peer 2=127.0.0.1:7002 --peer 3=127.0.0.1:7003 --stdin\n  \
famsd node bank --heap n2.heap --id 2 --listen 127.0.0.1:7002 --peer 1=127.0.0.1:7001 --peer 3=127.0.0.1:7003\n  \
famsd node bank --heap n3.heap --id 3 --listen 127.0.0.1:7003 --peer 1=127.0.0.1:7001 --peer 2=127.0.0.1:7002\n\
Type `balances` into the first. Kill any node with kill -9 and start it again: nothing is lost or applied twice.\n\
Stop with Ctrl-C / SIGTERM; then `famsd node report --heap n1.heap`.")]
    Bank {
        #[command(flatten)]
        node: NodeFlags,
        /// Transfers this node makes in all.
        #[arg(long, default_value_t = 1000)]
        transfers: u64,
        /// Pause between transfers, in milliseconds.
        #[arg(long, default_value_t = 1)]
        interval_ms: u64,
        /// Print a line per applied transfer.
        #[arg(long)]
        verbose: bool,
    },
    /// Two nodes bouncing a counter: the initiator sends --window pings, the responder answers each.
    Pingpong {
        #[command(flatten)]
        node: NodeFlags,
        /// Be the initiator, pinging this peer id (the responder omits it).
        #[arg(long)]
        initiator_of: Option<u64>,
        #[arg(long, default_value_t = 1000)]
        round_trips: u64,
        /// Pings in flight at once.
        #[arg(long, default_value_t = 1)]
        window: u64,
        #[arg(long, default_value_t = 64)]
        message_bytes: usize,
        /// Heap pages each turn writes.
        #[arg(long, default_value_t = 1)]
        pages: usize,
    },
    /// A bank cluster of real node processes on loopback, SIGKILLed and restarted at random
    /// while it runs; checks that the total is conserved and every transfer applied exactly once.
    #[command(after_help = "Examples:\n  famsd node cluster --nodes 3 --transfers 400 --kills-per-node 5\n  \
famsd node cluster --faults 0.3,0.1,0.1,7 --json   # 30 % loss, 10 % duplicates, 10 % reordered\n  \
famsd node cluster --relay 0.2,0.1,0.1,0..20,7     # the same through a relay process, delays 0-20 ms")]
    Cluster {
        /// Node processes (each with its own heap in --dir).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Transfers each node makes.
        #[arg(long, default_value_t = 400)]
        transfers: u64,
        /// Pause between a node's transfers, in milliseconds (0: back to back, turns pipeline).
        #[arg(long, default_value_t = 5)]
        interval_ms: u64,
        /// SIGKILL every node at least this many times (while transfers are still going).
        #[arg(long, default_value_t = 5)]
        kills_per_node: u64,
        /// Pause between kills, in milliseconds: LO,HI (uniform). Shorter for short runs.
        #[arg(long, default_value = "100,400", value_parser = parse_range_ms)]
        kill_gap_ms: (u64, u64),
        /// Every node drops, duplicates and reorders its outgoing datagrams: LOSS,DUP,REORDER,SEED.
        #[arg(long)]
        faults: Option<String>,
        /// Route all datagrams through a `famsd relay` process (it stays up while nodes are killed)
        /// that loses, duplicates, reorders and delays them: LOSS,DUP,REORDER,DELAY_MIN..DELAY_MAX,SEED
        /// (delays in milliseconds), e.g. 0.2,0.1,0.1,0..20,7. Its counters are in the report.
        #[arg(long, value_parser = famsd::relay::RelayFaults::parse)]
        relay: Option<famsd::relay::RelayFaults>,
        /// Shared key (64 hex digits) for every node.
        #[arg(long)]
        key: Option<String>,
        /// Dirty tracker of every node: uffd, regions or mprotect (default: uffd where available).
        #[arg(long)]
        tracker: Option<String>,
        /// Seed of the kill schedule (and of the fault layers).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Give up after this many seconds (a liveness failure).
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
        /// Run every node with this deliberate bug (a negative control; needs a build with
        /// `--features mutations`). `--mutation list` lists them.
        #[arg(long)]
        mutation: Option<String>,
        /// Working directory (default: a new one under /var/tmp, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Retire a peer that is gone for good, in a stopped node's heap: its unacknowledged messages
    /// are dropped and its messages refused from now on.
    Retire {
        #[arg(long)]
        heap: PathBuf,
        #[arg(long)]
        peer: u64,
    },
    /// Give a peer a new address (it moved), in a stopped node's heap.
    SetPeer {
        #[arg(long)]
        heap: PathBuf,
        /// ID=ADDRESS, e.g. 2=10.0.0.7:7002.
        #[arg(long, value_parser = famsd::node::parse_peer)]
        peer: (fams::transport::NodeId, std::net::SocketAddr),
    },
    /// The bank held by a stopped node's heap (balances, what was sent and applied per peer).
    Report {
        #[arg(long)]
        heap: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

/// "64M", "1G", "1GiB", "4096", "2k" → bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a size (try 64M, 1G, 4096)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` in `{s}` (use K, M, G or T)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

/// "100,400" → (100, 400).
fn parse_range_ms(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("`{s}` is not a range of milliseconds like 100,400");
    let (lo, hi) = s.split_once(',').ok_or_else(bad)?;
    let (lo, hi): (u64, u64) = (lo.trim().parse().map_err(|_| bad())?, hi.trim().parse().map_err(|_| bad())?);
    if lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

fn parse_addr(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("`{s}` is not an address (e.g. 0x300000000000)"))
}

/// The working directory of a run: the one the user named, or a fresh one under /var/tmp (not
/// /tmp: O_DIRECT does not work on tmpfs) that is removed when the run ends, whatever the outcome.
struct WorkDir {
    path: PathBuf,
    temporary: bool,
}

impl WorkDir {
    fn new(named: Option<PathBuf>, purpose: &str) -> WorkDir {
        match named {
            Some(path) => WorkDir { path, temporary: false },
            None => WorkDir {
                path: PathBuf::from(format!("/var/tmp/famsd-{purpose}-{}", std::process::id())),
                temporary: true,
            },
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("famsd: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Write `v` as pretty JSON to `path` (for `--save-json`).
fn write_json(path: &std::path::Path, v: &serde_json::Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).expect("json");
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// `famsd torture --list-mutations`: every deliberate bug, its layer and what it breaks.
fn list_mutations(json: bool) {
    let all = fams::mutations::ALL;
    if json {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|(m, name, what)| serde_json::json!({"name": name, "layer": m.layer().name(), "breaks": what}))
            .collect();
        print_json(&serde_json::Value::Array(v));
    } else {
        for (m, name, what) in all {
            println!("{name:<30} {:<6} {what}", m.layer().name());
        }
        if !cfg!(feature = "mutations") {
            println!("(this build has no mutations: build with --features mutations to run them)");
        }
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Cmd::Format { heap, size, max_size, log, log_size, base, force, io_path, flush_mode, json } => {
            let mut opts = FormatOptions::new(&heap, size);
            opts.max_size_bytes = max_size;
            opts.log_path = log;
            opts.log_size_bytes = log_size;
            opts.base_addr = base;
            opts.force = force;
            opts.io_path = io_path;
            opts.flush_mode = flush_mode;
            let (h, io) = Heap::format_reporting(&opts).map_err(|e| e.to_string())?;
            let log_path = h.resolve_log_path(&heap);
            let measured: Vec<_> = io
                .measured
                .iter()
                .map(|m| serde_json::json!({ "io_path": m.io_path.name(), "flush_mode": m.flush_mode.name(), "p50_us": m.p50_us }))
                .collect();
            if json {
                print_json(&serde_json::json!({
                    "heap": heap, "heap_id": h.heap_id.to_string(), "size_bytes": h.heap_size,
                    "max_size_bytes": h.max_size,
                    "base_addr": format!("{:#x}", h.base_addr), "log": log_path, "log_size_bytes": h.log_size,
                    "log_io": { "io_path": io.io_path.name(), "flush_mode": io.flush_mode.name(), "measured": measured },
                }));
            } else {
                println!(
                    "formatted {} ({} bytes, growable to {}, at {:#x}, id {})",
                    heap.display(),
                    h.heap_size,
                    h.max_size,
                    h.base_addr,
                    h.heap_id
                );
                println!("log {} ({} bytes)", log_path.display(), h.log_size);
                if io.measured.is_empty() {
                    println!("log I/O: {} with {} (as asked)", io.io_path.name(), io.flush_mode.name());
                } else {
                    let each: Vec<String> = io
                        .measured
                        .iter()
                        .map(|m| format!("{}+{} {:.0} µs", m.io_path.name(), m.flush_mode.name(), m.p50_us))
                        .collect();
                    println!(
                        "log I/O: {} with {}, measured fastest here (median durable 4 KiB write: {}); every open uses it",
                        io.io_path.name(),
                        io.flush_mode.name(),
                        each.join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect { heap, log, json } => {
            let i = fams::inspect::inspect(&heap, log).map_err(|e| e.to_string())?;
            let sb = &i.superblock;
            let pending = match &i.pending {
                Ok(r) => serde_json::json!({
                    "records": r.records_replayed, "heap_bytes": r.bytes_replayed,
                    "next_lsn": r.next_lsn, "torn_tail": r.torn_tail, "would_salvage": r.salvaged,
                }),
                Err(e) => serde_json::json!({ "error": e }),
            };
            let v = serde_json::json!({
                "heap": i.heap_path, "heap_id": i.header.heap_id.to_string(), "header_version": i.header_version,
                "size_bytes": i.heap_size_bytes, "formatted_size_bytes": i.header.heap_size,
                "max_size_bytes": i.header.max_size, "disk_used_bytes": i.disk_used_bytes,
                "base_addr": format!("{:#x}", i.header.base_addr),
                "created_unix": i.header.created_unix, "locked": i.locked,
                "log": { "path": i.log_path, "kind": i.log_kind, "size_bytes": i.header.log_size,
                         "superblock_sequence": sb.sequence, "epoch": sb.epoch,
                         "tail_offset": sb.tail_offset, "tail_lsn": sb.tail_lsn,
                         "area_bytes": sb.capacity_bytes(), "checkpoints": sb.checkpoints,
                         "written_limit_bytes": sb.written_limit_bytes,
                         "replayed_until_lsn": sb.has_replayed_stretch().then_some(sb.replayed_until_lsn),
                         "io_path_preferred": sb.io_path_preferred.map(|p| p.name()),
                         "flush_mode_preferred": sb.flush_mode_preferred.map(|m| m.name()) },
                "pending": pending,
            });
            let node = node_section(&heap, i.locked);
            if json {
                let mut v = v;
                v["node"] = node;
                print_json(&v);
            } else {
                println!(
                    "heap      {} (id {}, header version {})",
                    i.heap_path.display(),
                    i.header.heap_id,
                    i.header_version
                );
                println!(
                    "size      {} bytes (max {}, {} on disk) at {:#x}{}",
                    i.heap_size_bytes,
                    i.header.max_size,
                    i.disk_used_bytes,
                    i.header.base_addr,
                    if i.locked { ", open in another process" } else { "" }
                );
                println!("log       {} ({}, {} bytes)", i.log_path.display(), i.log_kind, i.header.log_size);
                println!(
                    "superblock seq {} epoch {}, tail LSN {} at offset {}, {} checkpoints, records within {} bytes of the tail{}",
                    sb.sequence, sb.epoch, sb.tail_lsn, sb.tail_offset, sb.checkpoints,
                    sb.scan_limit_bytes(),
                    if sb.written_limit_bytes == 0 { " (limit not recorded: an older log)" } else { "" }
                );
                if sb.has_replayed_stretch() {
                    println!(
                        "           LSNs {}..{} were replayed by the last open and stay in the log until the next checkpoint syncs the heap file",
                        sb.tail_lsn,
                        sb.replayed_until_lsn - 1
                    );
                }
                match (sb.io_path_preferred, sb.flush_mode_preferred) {
                    (Some(p), Some(m)) => {
                        println!("log I/O   {} with {} (chosen when the log was formatted)", p.name(), m.name())
                    }
                    _ => println!("log I/O   not recorded (a log formatted before the choice was measured: defaults)"),
                }
                match &i.pending {
                    Ok(r) => {
                        println!(
                            "pending   {} records ({} heap bytes) would be replayed; next LSN {}",
                            r.records_replayed, r.bytes_replayed, r.next_lsn
                        );
                        if let Some(t) = &r.torn_tail {
                            println!("tail      {t}");
                        }
                        if let Some(s) = &r.salvaged {
                            println!("DAMAGE    {s}");
                        }
                    }
                    Err(e) => println!("pending   cannot replay: {e}"),
                }
                print_node_section(&node);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Grow { heap, size, log, json } => {
            let opts = HeapOptions { log_path: log, ..HeapOptions::default() };
            let mut h = Heap::open(&heap, &opts).map_err(|e| e.to_string())?;
            let before = h.len();
            h.grow(size).map_err(|e| e.to_string())?;
            let (after, max) = (h.len(), h.max_len());
            drop(h);
            if json {
                print_json(
                    &serde_json::json!({ "heap": heap, "size_bytes_before": before, "size_bytes": after, "max_size_bytes": max }),
                );
            } else if after == before {
                println!("{} is already {after} bytes (max {max}): nothing to do", heap.display());
            } else {
                println!("grew {} from {before} to {after} bytes (max {max})", heap.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Upgrade { heap, max_size, json } => {
            let mut opts = fams::UpgradeOptions::default();
            opts.max_size_bytes = max_size;
            let r = Heap::upgrade(&heap, &opts).map_err(|e| e.to_string())?;
            if json {
                print_json(&serde_json::json!({
                    "heap": r.heap_path, "changed": r.changed, "finished_interrupted": r.finished_interrupted,
                    "version_before": r.version_before, "version_after": r.version_after,
                    "max_size_bytes_before": r.max_size_before, "max_size_bytes": r.max_size_after,
                    "size_bytes": r.size_bytes,
                }));
            } else {
                if r.finished_interrupted {
                    println!("{}: finished an interrupted upgrade first", heap.display());
                }
                if r.changed {
                    println!(
                        "upgraded {}: header version {} -> {}, max size {} -> {} bytes (size {})",
                        heap.display(),
                        r.version_before,
                        r.version_after,
                        r.max_size_before,
                        r.max_size_after,
                        r.size_bytes
                    );
                } else {
                    println!(
                        "{} is already header version {} with max size {} bytes: nothing to do",
                        heap.display(),
                        r.version_after,
                        r.max_size_after
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Recover { heap, log, salvage, json } => {
            let opts = HeapOptions { log_path: log, salvage, ..HeapOptions::default() };
            let h = Heap::open(&heap, &opts).map_err(|e| e.to_string())?;
            let r = h.stats().recovery;
            drop(h);
            if json {
                print_json(&serde_json::json!({
                    "records_replayed": r.records_replayed, "heap_bytes": r.bytes_replayed,
                    "log_bytes_read": r.log_bytes_read, "ms": r.duration.as_secs_f64() * 1e3,
                    "next_lsn": r.next_lsn, "torn_tail": r.torn_tail, "salvaged": r.salvaged,
                }));
            } else {
                println!(
                    "replayed {} records ({} heap bytes, {} log bytes read) in {:.2} ms; next LSN {}",
                    r.records_replayed,
                    r.bytes_replayed,
                    r.log_bytes_read,
                    r.duration.as_secs_f64() * 1e3,
                    r.next_lsn
                );
                if let Some(t) = &r.torn_tail {
                    println!("stopped at: {t}");
                }
                if let Some(s) = &r.salvaged {
                    println!("SALVAGED: {s}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench { mount: true, dir, quick, iterations, json, save_json, .. } => {
            let dir = WorkDir::new(dir, "bench");
            let cfg = famsd::mount_bench::MountBenchConfig {
                famsd: std::env::current_exe().map_err(|e| format!("finding famsd itself: {e}"))?,
                dir: dir.path.clone(),
                quick,
                iterations: iterations.map(|n| n as usize),
                progress: !json,
            };
            let report = famsd::mount_bench::run(&cfg)?;
            if json {
                print_json(&report.to_json(&cfg));
            } else {
                report.print_table();
            }
            if let Some(path) = save_json {
                write_json(&path, &report.to_json(&cfg))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench { turns: true, dir, quick, json, save_json, .. } => {
            let dir = WorkDir::new(dir, "bench");
            let cfg = famsd::turn_bench::TurnBenchConfig {
                famsd: std::env::current_exe().map_err(|e| format!("finding famsd itself: {e}"))?,
                dir: dir.path.clone(),
                quick,
                progress: true,
            };
            let report = famsd::turn_bench::run(&cfg)?;
            if json {
                print_json(&report.to_json(&cfg));
            } else {
                report.print_table();
            }
            if let Some(path) = save_json {
                write_json(&path, &report.to_json(&cfg))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench { dir, log, quick, json, svg, save_json, force, .. } => {
            let dir = WorkDir::new(dir, "bench");
            let cfg =
                famsd::bench::BenchConfig { dir: dir.path.clone(), log_device: log, quick, force, progress: true };
            let report = famsd::bench::run(&cfg)?;
            if json {
                print_json(&report.to_json(&cfg));
            } else {
                report.print_table();
            }
            if let Some(path) = save_json {
                write_json(&path, &report.to_json(&cfg))?;
            }
            if let Some(svg) = svg {
                std::fs::write(&svg, report.svg()?).map_err(|e| format!("{}: {e}", svg.display()))?;
                eprintln!("wrote {}", svg.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo { dir } => demo::run(&dir).map(|_| ExitCode::SUCCESS),
        Cmd::Torture { list_mutations: true, json, .. } => {
            list_mutations(json);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Torture { mutation: Some(m), json, .. } if m == "list" => {
            list_mutations(json);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Torture { turns: true, seeds, nodes, app, mutation, dir, seed, json, .. } => {
            if let Some(m) = &mutation {
                fams::mutations::set(m)?;
            }
            let dir = WorkDir::new(dir, "turn-sim");
            let cfg = famsd::turn_sim::TurnSimConfig {
                first_seed: seed,
                seeds,
                nodes,
                app,
                dir: dir.path.clone(),
                progress: !json,
            };
            let report = famsd::turn_sim::run(&cfg)?;
            let t = &report.totals;
            if json {
                print_json(&report.to_json());
            } else {
                println!("{} seeds ({} nodes) in {:.1} s ({:.0} seeds/s, {:.0} turns/s): {} turns ({} pipelined), {} messages, {} datagrams ({} lost, {} duplicated, {} reordered), {} partitions, {} kills, {} power cuts ({} during recovery), {} recoveries checked; {} violations",
                    t.seeds, report.nodes, report.elapsed.as_secs_f64(), t.seeds as f64 / report.elapsed.as_secs_f64(),
                    t.turns as f64 / report.elapsed.as_secs_f64(), t.turns, t.turns_pipelined, t.messages, t.datagrams,
                    t.datagrams_lost, t.datagrams_duplicated, t.datagrams_reordered, t.partitions, t.kills, t.power_cuts,
                    t.cuts_during_recovery, t.recoveries_checked, t.violations);
                if !t.failing_seeds.is_empty() {
                    println!("failing seeds: {:?}", t.failing_seeds);
                }
                for v in &t.details {
                    println!("VIOLATION: {v}");
                }
            }
            Ok(if t.violations == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        Cmd::Torture { power_loss: false, mount: true, .. } => {
            Err("--mount runs the mount's power-loss explorer: use it with --power-loss".into())
        }
        Cmd::Torture {
            power_loss: true,
            mount: true,
            states,
            dir,
            seed,
            json,
            mutation,
            flush_mode,
            sync_only,
            ..
        } => {
            if let Some(m) = &mutation {
                fams::mutations::set(m)?;
            }
            let dir = WorkDir::new(dir, "torture-mount");
            let cfg = famsd::mount::power_loss::MountPowerLossConfig {
                states,
                seed,
                dir: dir.path.clone(),
                flush_mode,
                sync_only,
                progress: !json,
            };
            let report = famsd::mount::power_loss::run(&cfg)?;
            if json {
                print_json(&report.to_json());
            } else {
                println!("{}", report.summary());
                for v in &report.violation_details {
                    println!("VIOLATION: {v}");
                }
            }
            Ok(if report.violations == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        Cmd::Torture {
            power_loss: true, states, sync_only, tracker, dir, seed, json, mutation, flush_mode, ..
        } => {
            if let Some(m) = &mutation {
                fams::mutations::set(m)?;
            }
            let dir = WorkDir::new(dir, "torture");
            let cfg = famsd::power_loss::PowerLossConfig {
                states,
                seed,
                dir: dir.path.clone(),
                tracker,
                heap_size_bytes: 256 << 10,
                // Room for a replay of a few hundred records (the explorer checkpoints early
                // except when it builds such a long log).
                log_size_bytes: 4 << 20,
                sync_only,
                flush_mode,
                progress: !json,
            };
            let report = famsd::power_loss::run(&cfg)?;
            if json {
                print_json(&report.to_json());
            } else {
                println!("{} power-loss states ({} exhaustive; dsync/fdatasync log {}/{}; {} cuts during recovery: replay/heap sync/superblock {}/{}/{}; {} long replays, the longest {} records), {} violations, seed {}; {} commits acknowledged; {} short log writes ({} of them in recovery); unflushed writes kept/dropped/torn {}/{}/{}, {} garbage sectors",
                    report.states, report.exhaustive_states, report.states_per_flush_mode[0], report.states_per_flush_mode[1],
                    report.cuts_during_recovery, report.recovery_cuts_per_phase[0], report.recovery_cuts_per_phase[1],
                    report.recovery_cuts_per_phase[2], report.long_replay_states, report.longest_replay_records,
                    report.violations, report.seed, report.commits_acknowledged, report.short_writes, report.recovery_short_writes,
                    report.writes_kept, report.writes_dropped, report.writes_torn, report.garbage_sectors);
                for v in &report.violation_details {
                    println!("VIOLATION: {v}");
                }
            }
            Ok(if report.violations == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        Cmd::Torture {
            cycles,
            tracker,
            log,
            dir,
            heap_size,
            log_size,
            seed,
            kill_after_ms_max,
            io_path,
            flush_mode,
            force,
            json,
            mutation,
            stop_at_first_violation,
            ..
        } => {
            // The children inherit it (`torture::spawn_child` passes it on as FAMS_MUTATION).
            if let Some(m) = &mutation {
                fams::mutations::set(m)?;
            }
            let dir = WorkDir::new(dir, "torture");
            let log_size = if log.as_ref().is_some_and(|l| is_block_device(l)) { None } else { Some(log_size) };
            let cfg = torture::TortureConfig {
                cycles,
                dir: dir.path.clone(),
                force,
                heap_size_bytes: heap_size,
                choice: torture::HeapChoice { tracker, io_path, flush_mode, log },
                log_size_bytes: log_size,
                seed,
                kill_after_ms_max,
                progress: !json,
                stop_at_first_violation,
            };
            let report = torture::run(&cfg)?;
            if json {
                print_json(&report.to_json());
            } else {
                println!("{} cycles, {} violations (tracker {}, log {} via {} + {}); {} commits acknowledged, final commit {}",
                    report.cycles, report.violations, report.tracker, report.log_kind, report.io_path, report.flush_mode,
                    report.commits_acknowledged, report.final_commit);
                for v in &report.violation_details {
                    println!("VIOLATION: {v}");
                }
            }
            Ok(if report.violations == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        Cmd::Node(cmd) => run_node(cmd),
        Cmd::Mount { store, mountpoint, foreground, commit_on_close, staging_max, log, log_file } => {
            let args = famsd::mount::MountArgs {
                store: store.clone(),
                mountpoint,
                log,
                commit_on_close,
                staging_max_bytes: staging_max,
                log_file: log_file.clone(),
            };
            if foreground {
                init_logging();
                famsd::mount::run_foreground(&args)?;
            } else {
                let log_file = log_file.unwrap_or_else(|| {
                    let mut p = store.into_os_string();
                    p.push(".mount.log");
                    PathBuf::from(p)
                });
                famsd::mount::run_background(&args, &log_file)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Umount { mountpoint, lazy } => {
            println!("{}", famsd::mount::umount(&mountpoint, lazy)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Relay {
            nodes,
            faces,
            loss,
            duplicate,
            reorder,
            delay_ms,
            seed,
            queue_max,
            queue_bytes_max,
            timeout_s,
            stats_json,
            exit_with_parent,
            json,
        } => {
            init_logging();
            let faults = famsd::relay::RelayFaults { loss, duplicate, reorder, delay_ms, seed };
            let mut cfg = famsd::relay::RelayConfig::new(nodes, faults);
            cfg.faces = faces;
            cfg.queue_datagrams_max = queue_max;
            cfg.queue_bytes_max = usize::try_from(queue_bytes_max).map_err(|_| "--queue-bytes-max is too large")?;
            cfg.timeout = std::time::Duration::from_secs(timeout_s);
            cfg.stats_json = stats_json;
            cfg.exit_with_parent = exit_with_parent;
            famsd::relay::main(&cfg, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::TortureChild { heap, seed, run_seed, tracker, io_path, flush_mode, log, fill_log_bytes } => {
            let choice = torture::HeapChoice { tracker, io_path, flush_mode, log };
            torture::child(&heap, seed, run_seed, &choice, fill_log_bytes)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The turn-node part of `famsd inspect`: the running node's status file, or the stopped node's
/// heap. `null` when the heap is not a node's.
fn node_section(heap: &std::path::Path, locked: bool) -> serde_json::Value {
    let status = famsd::node::status_path(heap);
    if locked {
        return match std::fs::read_to_string(&status)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        {
            Some(mut v) => {
                v["source"] = serde_json::json!(format!("running node's status file {}", status.display()));
                v
            }
            None => serde_json::json!({ "source": "the heap is open in another process and has no status file" }),
        };
    }
    match famsd::node::turn_state(heap) {
        Ok(Some(s)) => {
            let mut v = famsd::node::snapshot_json(&s);
            v["source"] = serde_json::json!("the heap (node stopped)");
            v
        }
        Ok(None) => serde_json::Value::Null,
        Err(e) => serde_json::json!({ "source": "the heap", "error": e }),
    }
}

fn print_node_section(node: &serde_json::Value) {
    if node.is_null() {
        return;
    }
    println!("node      from {}", node["source"].as_str().unwrap_or("?"));
    if let Some(e) = node.get("error") {
        println!("          cannot read the turn state: {e}");
        return;
    }
    if node.get("stats").is_some() {
        let s = &node["stats"];
        let t = &s["transport"];
        println!(
            "          node {} (pid {}), {} turns ({} failed, {} pipelined), {:.1} turns per device write",
            node["node"],
            node["pid"],
            s["turns"],
            s["turns_failed"],
            s["turns_pipelined"],
            s["turns_per_device_write"].as_f64().unwrap_or(0.0)
        );
        println!(
            "          datagrams sent {} received {}; fragments retransmitted {}; duplicates dropped {}; rejected: malformed {} checksum {} MAC {} wrong receiver {} address mismatch {}",
            t["datagrams_sent"], t["datagrams_received"], t["fragments_retransmitted"], t["duplicates_dropped"],
            t["rejected_malformed"], t["rejected_checksum"], t["rejected_mac"], t["wrong_receiver"], t["address_mismatch"]
        );
        for p in node["peers"].as_array().into_iter().flatten() {
            println!(
                "          peer {} at {}: next expected {}, acked by peer {}, queued up to {}, {} unacknowledged ({} bytes), srtt {} µs",
                p["peer"], p["addr"].as_str().unwrap_or("-"), p["next_expected"], p["acked_by_peer"], p["highest_queued_seq"],
                p["unacked_messages"], p["unacked_bytes"], p["srtt_us"]
            );
        }
        return;
    }
    println!(
        "          node {}, incarnation {}, {} turns ({} failed), {} messages sent, {} consumed",
        node["node"],
        node["incarnation"],
        node["turns"],
        node["turns_failed"],
        node["messages_sent"],
        node["messages_consumed"]
    );
    if let Some(f) = node["last_failure"].as_str().filter(|f| !f.is_empty()) {
        println!("          last failed turn: {f}");
    }
    for p in node["peers"].as_array().into_iter().flatten() {
        println!(
            "          peer {} at {}{}: next seq to send {}, acked by peer {}, consumed from it {}, {} unacknowledged ({} bytes)",
            p["peer"], p["addr"].as_str().unwrap_or("-"), if p["retired"] == true { " (retired)" } else { "" }, p["next_send_seq"],
            p["acked_by_peer"], p["consumed"], p["unacked_messages"], p["unacked_bytes"]
        );
    }
}

fn init_logging() {
    let level = match std::env::var("FAMS_LOG").unwrap_or_default().to_ascii_lowercase().as_str() {
        "error" => tracing::Level::ERROR,
        "warn" => tracing::Level::WARN,
        "debug" => tracing::Level::DEBUG,
        "trace" => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn run_node(cmd: NodeCmd) -> Result<ExitCode, String> {
    match cmd {
        NodeCmd::Bank { node, transfers, interval_ms, verbose } => {
            init_logging();
            famsd::node::run_bank(&node.args(), transfers, std::time::Duration::from_millis(interval_ms), verbose)?;
            Ok(ExitCode::SUCCESS)
        }
        NodeCmd::Pingpong { node, initiator_of, round_trips, window, message_bytes, pages } => {
            init_logging();
            let app = fams::apps::pingpong::PingPongApp {
                initiator_of: initiator_of.map(fams::transport::NodeId),
                round_trips,
                window,
                message_bytes,
                touch_pages: pages,
                stop_when_done: true,
                print_result: true,
            };
            famsd::node::run_pingpong(&node.args(), app)?;
            Ok(ExitCode::SUCCESS)
        }
        NodeCmd::Cluster {
            nodes,
            transfers,
            interval_ms,
            kills_per_node,
            kill_gap_ms,
            faults,
            relay,
            key,
            tracker,
            seed,
            timeout_s,
            dir,
            json,
            mutation,
        } => {
            if mutation.as_deref() == Some("list") {
                list_mutations(json);
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(m) = &mutation {
                fams::mutations::set(m)?;
            }
            let faults = match faults {
                Some(f) => {
                    let c = fams::turns::FaultConfig::parse(&f)?;
                    Some(famsd::cluster::Faults { loss: c.loss, duplicate: c.duplicate, reorder: c.reorder })
                }
                None => None,
            };
            let work = WorkDir::new(dir, "cluster");
            let cfg = famsd::cluster::ClusterConfig {
                famsd: std::env::current_exe().map_err(|e| format!("finding famsd itself: {e}"))?,
                dir: work.path.clone(),
                nodes,
                transfers_per_node: transfers,
                interval_ms,
                kills_per_node,
                kill_gap_ms,
                down_ms: (0, 200),
                seed,
                faults,
                relay,
                key,
                timeout: std::time::Duration::from_secs(timeout_s),
                tracker,
                progress: !json,
                mutation,
            };
            let report = famsd::cluster::run_bank_cluster(&cfg)?;
            if json {
                print_json(&report.to_json());
            } else {
                famsd::cluster::print_summary(&report);
            }
            Ok(if report.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        NodeCmd::Retire { heap, peer } => {
            match famsd::node::retire_peer(&heap, fams::transport::NodeId(peer))? {
                Some(n) => println!("retired peer {peer}: {n} unacknowledged messages dropped"),
                None => return Err(format!("{}: this node does not know peer {peer}", heap.display())),
            }
            Ok(ExitCode::SUCCESS)
        }
        NodeCmd::SetPeer { heap, peer: (peer, addr) } => {
            famsd::node::set_peer_addr(&heap, peer, addr)?;
            println!("peer {peer} is now at {addr}");
            Ok(ExitCode::SUCCESS)
        }
        NodeCmd::Report { heap, json } => {
            let Some(r) = famsd::node::bank_report(&heap)? else {
                return Err(format!(
                    "{}: this heap holds no bank (its node never completed a Start turn)",
                    heap.display()
                ));
            };
            if json {
                println!("{}", r.to_json());
            } else {
                println!("node {}: accounts {:?}, total {}", r.node, r.accounts, r.total());
                println!(
                    "transfers: {} of {} sent, {} applied; {} out of order; {} malformed; {} restarts",
                    r.transfers_sent,
                    r.transfers_planned,
                    r.transfers_applied,
                    r.fifo_violations,
                    r.bad_messages,
                    r.restarts
                );
                for (peer, (count, amount)) in &r.sent {
                    println!("  sent to {peer}: {count} transfers, {amount} in all");
                }
                for (peer, (count, amount, last)) in &r.applied {
                    println!("  applied from {peer}: {count} transfers, {amount} in all (last #{last})");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn is_block_device(p: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).map(|m| m.file_type().is_block_device()).unwrap_or(false)
}
