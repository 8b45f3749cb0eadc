//! `fanout`: R rooms × M members, P publishers at a fixed total rate.
//!
//! Every member connection is a receiver; the first P connections (spread
//! round-robin over rooms) also publish. Each publisher follows its own
//! schedule `t0 + k / rate` and stamps `k`'s intended time into the
//! payload; receivers record `receive time - intended time`. Messages whose
//! intended time falls in the warm-up are delivered and checked for loss,
//! but not put in the latency histograms.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use clap::Args;
use fastwebsockets::{Frame, OpCode, Payload};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;
use tokio::{sync::Semaphore, time::Instant};

use crate::{
    client::{self, now_ns, Ws},
    stats::{self, Percentiles},
    sys,
    wire::{Incoming, Wire},
    CommonOpts,
};

/// Options of the fanout scenario.
#[derive(Debug, Clone, Args, Serialize)]
pub struct FanoutOpts {
    /// Shared options.
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonOpts,

    /// Number of rooms.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,

    /// Member connections per room (each one receives every message of its room).
    #[arg(long, default_value_t = 10)]
    pub members: usize,

    /// Publishing connections, spread round-robin over rooms (they are
    /// members too). At most rooms × members.
    #[arg(long, default_value_t = 10)]
    pub publishers: usize,

    /// Total publish rate over all publishers, messages per second.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// Payload padding per message in bytes (the body also carries ~40 bytes of stamps).
    #[arg(long, default_value_t = 100)]
    pub payload: usize,

    /// Measured duration in seconds (after warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Warm-up in seconds: published and checked, not measured.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,

    /// Gate: fail if p99 delivery latency exceeds this many milliseconds.
    #[arg(long)]
    pub max_p99_ms: Option<f64>,

    /// Gate: fail if more than this many deliveries are lost.
    #[arg(long, default_value_t = 0)]
    pub max_loss: u64,

    /// Connections opened concurrently during set-up.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,

    /// Put the rooms in this namespace (e.g. one the broker runs with
    /// `persist=off`, to measure delivery without storage).
    #[arg(long)]
    pub namespace: Option<String>,

    /// The pacer busy-waits this many microseconds before each send time
    /// instead of sleeping through them (a sleep overshoots by ~60 µs,
    /// which would count as latency). Costs up to this much CPU per send
    /// on the pacer thread; 0: sleep only.
    #[arg(long, default_value_t = 100)]
    pub spin_us: u64,

    /// Share of publishes sent instead as edits of the publisher's last
    /// acked message (a chat-features mix; Shoal protocol, a stored
    /// namespace). An edit is a room-log entry delivered to every member
    /// with the publish's stamps, so its latency is measured like a
    /// message's.
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub edit_share: f64,

    /// Share of publishes sent instead as reactions on the publisher's
    /// last acked message, added then removed in turn. Delivered to every
    /// member and counted; their body is the reaction, so they carry no
    /// latency stamp.
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub react_share: f64,
}

/// What schedule slot `k` of a publisher sends: spread evenly and
/// reproducibly (the reader recomputes it for the ack of slot `k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Msg,
    Edit,
    React,
}

fn slot(k: u64, edit_share: f64, react_share: f64) -> Slot {
    // A multiplicative hash of k, in [0, 1).
    let x = (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    if x < edit_share {
        Slot::Edit
    } else if x < edit_share + react_share {
        Slot::React
    } else {
        Slot::Msg
    }
}

/// One second of a run.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct TimePoint {
    /// Seconds since the publishers started.
    pub t: f64,
    /// Publishes sent in that second.
    pub sent_per_sec: u64,
    /// Deliveries received in that second.
    pub deliveries_per_sec: u64,
    /// Median delivery latency of messages received in that second (ms).
    pub p50_ms: f64,
    /// p99 of the same (ms).
    pub p99_ms: f64,
}

/// Result of a fanout run.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Scenario name.
    pub scenario: &'static str,
    /// Options used.
    pub opts: FanoutOpts,
    /// Offered publish rate (msgs/s).
    pub target_rate: f64,
    /// Publishes actually sent per second within the measured window.
    pub achieved_rate: f64,
    /// True if the achieved rate was at least 99% of the target.
    pub rate_ok: bool,
    /// Publishes sent in total (warm-up included).
    pub sent: u64,
    /// Publishes acknowledged.
    pub acked: u64,
    /// Error frames received, by code (e.g. 429 = rate limited by the broker).
    pub errors: BTreeMap<u16, u64>,
    /// Deliveries expected (acked messages × room members).
    pub expected_deliveries: u64,
    /// Deliveries received.
    pub deliveries: u64,
    /// Deliveries per second in the measured window.
    pub deliveries_per_sec: f64,
    /// Deliveries never received.
    pub lost: u64,
    /// Deliveries received twice.
    pub duplicated: u64,
    /// Deliveries received after a later seq.
    pub reordered: u64,
    /// Per-delivery latency (intended send to receive).
    pub latency: Percentiles,
    /// Fan-out completion latency (intended send to the last member's receive).
    pub fanout_latency: Percentiles,
    /// Publish-to-ack latency (intended send to the `ack`, which the broker
    /// sends once the message is stored).
    pub ack_latency: Percentiles,
    /// Sender lag: actual minus intended send time. Part of every latency
    /// above; large values mean the load generator itself fell behind
    /// (tokio's timer has 1 ms resolution, so up to ~1 ms is expected).
    pub send_lag: Percentiles,
    /// Load generator CPU use, percent of one core.
    pub loadgen_cpu_percent: f64,
    /// Each broker's CPU use, percent of one core (from its /metrics).
    pub broker_cpu_percent: Vec<f64>,
    /// All brokers' CPU time per delivery, in microseconds: the figure to
    /// compare builds and servers by (it does not depend on how many
    /// cores the box has, only on what each delivery costs). Pin broker
    /// and loadgen to separate cores for it to mean that.
    pub broker_cpu_us_per_delivery: f64,
    /// Each broker's resident memory at the end, bytes.
    pub broker_rss_bytes: Vec<f64>,
    /// Gate failures; empty when the run passed.
    pub failures: Vec<String>,
    /// Points of the latency percentile curve (percentile, ms), for plots.
    pub latency_curve: Vec<(f64, f64)>,
    /// The delivery latency histogram, (µs, count) per bucket.
    pub latency_raw: Vec<(u64, u64)>,
    /// The publish-to-ack histogram, (µs, count) per bucket.
    pub ack_raw: Vec<(u64, u64)>,
    /// One point per second of the run: rates and latency of that second.
    pub timeline: Vec<TimePoint>,
    /// Points of the fan-out latency curve.
    pub fanout_curve: Vec<(f64, f64)>,
}

impl FanoutReport {
    /// True if no gate failed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// Human-readable summary.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "offered {:.0} msg/s, achieved {:.0} msg/s{}; deliveries {:.0}/s\n",
            self.target_rate,
            self.achieved_rate,
            if self.rate_ok {
                ""
            } else {
                "  ** UNDER 99% OF TARGET **"
            },
            self.deliveries_per_sec
        );
        s += &format!(
            "sent {} acked {} errors {:?}; deliveries {}/{} lost {} duplicated {} reordered {}\n",
            self.sent,
            self.acked,
            self.errors,
            self.deliveries,
            self.expected_deliveries,
            self.lost,
            self.duplicated,
            self.reordered
        );
        s += &Percentiles::header();
        s += "\n";
        s += &self.latency.row("delivery");
        s += "\n";
        s += &self.fanout_latency.row("fan-out completion");
        s += "\n";
        s += &self.ack_latency.row("publish to ack");
        s += "\n";
        s += &self.send_lag.row("sender lag");
        s += "\n";
        s += &format!(
            "cpu: loadgen {:.0}%, broker {:?}%, broker {:.2} us per delivery\n",
            self.loadgen_cpu_percent,
            self.broker_cpu_percent
                .iter()
                .map(|c| c.round())
                .collect::<Vec<_>>(),
            self.broker_cpu_us_per_delivery
        );
        if !self.failures.is_empty() {
            s += &format!("FAILED: {}\n", self.failures.join("; "));
        }
        s
    }
}

/// Per-room completion tracking: seq -> (receivers still missing it, worst latency, measured).
type FanoutMap = Mutex<HashMap<u64, (u32, u64, bool)>>;

struct Shared {
    wire: Arc<Wire>,
    /// Connections that receive each message (members, or members - 1
    /// where the publisher is not sent its own messages).
    receivers: u32,
    /// Accepted publishes per publisher (protocols without room seqs
    /// count loss per publisher).
    pub_acked: Vec<AtomicU64>,
    window: (u64, u64),
    acked: Vec<AtomicU64>,
    max_acked_seq: Vec<AtomicU64>,
    fanout: Vec<FanoutMap>,
    fanout_hist: Mutex<Histogram<u64>>,
    live: Mutex<Histogram<u64>>,
    deliveries: AtomicU64,
    sent: AtomicU64,
    sent_in_window: AtomicU64,
    errors: Mutex<BTreeMap<u16, u64>>,
    gaps: AtomicU64,
    acked_total: AtomicU64,
    stop: tokio_util_stop::Stop,
    /// Per publisher: the seq of its last acked plain message (the target
    /// of its edits and reactions).
    last_own: Vec<AtomicU64>,
    /// Per publisher: 1 + the last slot sent as a plain message because
    /// it had no message of its own to edit or react to yet.
    fallback_upto: Vec<AtomicU64>,
    /// The mix: shares of edits and reactions.
    mix: (f64, f64),
}

/// Minimal stop signal (a watch channel) so the crate needs no tokio-util.
mod tokio_util_stop {
    /// Broadcast "stop" to every task.
    pub struct Stop {
        tx: tokio::sync::watch::Sender<bool>,
    }
    impl Stop {
        pub fn new() -> Self {
            Stop {
                tx: tokio::sync::watch::channel(false).0,
            }
        }
        pub fn fire(&self) {
            let _ = self.tx.send(true);
        }
        pub async fn wait(&self) {
            let mut rx = self.tx.subscribe();
            let _ = rx.wait_for(|v| *v).await;
        }
    }
}

#[derive(Default)]
struct Tracker {
    next: u64,
    gaps: Vec<(u64, u64)>,
    received: u64,
    duplicated: u64,
    reordered: u64,
}

impl Tracker {
    fn see(&mut self, seq: u64) {
        if seq == self.next {
            self.next += 1;
            self.received += 1;
        } else if seq > self.next {
            self.gaps.push((self.next, seq));
            self.next = seq + 1;
            self.received += 1;
        } else if let Some(i) = self.gaps.iter().position(|&(a, b)| seq >= a && seq < b) {
            // A seq we had skipped: late, not lost.
            let (a, b) = self.gaps.remove(i);
            if a < seq {
                self.gaps.push((a, seq));
            }
            if seq + 1 < b {
                self.gaps.push((seq + 1, b));
            }
            self.reordered += 1;
            self.received += 1;
        } else {
            self.duplicated += 1;
        }
    }

    fn missing(&self, max_acked: u64) -> u64 {
        let gaps: u64 = self.gaps.iter().map(|(a, b)| b - a).sum();
        gaps + (max_acked + 1).saturating_sub(self.next)
    }
}

struct ConnResult {
    room: usize,
    /// This connection's index (publishers are 0..P).
    me: usize,
    /// Per-publisher trackers, for protocols without room seqs.
    per_pub: HashMap<u64, Tracker>,
    hist: Histogram<u64>,
    /// Publish-to-ack latencies of this connection's own publishes.
    acks: Histogram<u64>,
    tracker: Tracker,
}

/// Run the scenario.
pub async fn run(opts: &FanoutOpts) -> anyhow::Result<FanoutReport> {
    anyhow::ensure!(
        opts.rooms >= 1 && opts.members >= 1,
        "--rooms and --members must be at least 1"
    );
    anyhow::ensure!(
        opts.publishers >= 1 && opts.publishers <= opts.rooms * opts.members,
        "--publishers must be 1..=rooms*members"
    );
    anyhow::ensure!(
        opts.rate > 0.0 && opts.duration > 0.0,
        "--rate and --duration must be positive"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&opts.edit_share)
            && (0.0..=1.0).contains(&opts.react_share)
            && opts.edit_share + opts.react_share <= 1.0,
        "--edit-share and --react-share are shares in [0, 1] summing to at most 1"
    );
    let c = &opts.common;
    let wire = Arc::new(c.wire()?);
    anyhow::ensure!(
        (opts.edit_share == 0.0 && opts.react_share == 0.0) || wire.has_events(),
        "--edit-share and --react-share need the Shoal protocol"
    );
    let prefix = c.prefix();
    let n = opts.rooms * opts.members;
    let source_ips = c.source_ips_for(n);

    // Set-up: connect and join, bounded concurrency.
    let sem = Arc::new(Semaphore::new(opts.connect_concurrency.max(1)));
    let mut joins = Vec::with_capacity(n);
    for i in 0..n {
        let url = c.urls[i % c.urls.len()].clone();
        let user = format!("{prefix}-u{i}");
        let wire = wire.clone();
        let room = match &opts.namespace {
            Some(ns) => format!("{ns}:{prefix}-r{}", i % opts.rooms),
            None => format!("{prefix}-r{}", i % opts.rooms),
        };
        let src = client::source_ip(i, source_ips);
        let sem = sem.clone();
        joins.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await;
            let (mut ws, session) = wire
                .connect(&url, &user, src)
                .await
                .map_err(|e| anyhow::anyhow!("connect {url}: {}", e.label()))?;
            let seq = wire.join(&mut ws, &session, &room).await?;
            Ok::<_, anyhow::Error>((ws, room, seq))
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for j in joins {
        conns.push(j.await??);
    }
    if !c.quiet {
        tracing::info!("{n} connections joined {} rooms", opts.rooms);
    }

    let http = reqwest::Client::new();
    let pace_start = std::time::Instant::now() + Duration::from_millis(300);
    let t0 = now_ns() + 300_000_000;
    let warm_ns = (opts.warmup * 1e9) as u64;
    let dur_ns = (opts.duration * 1e9) as u64;
    let window = (t0 + warm_ns, t0 + warm_ns + dur_ns);
    let receivers = if wire.echoes_sender() {
        opts.members
    } else {
        opts.members - 1
    } as u32;
    let shared = Arc::new(Shared {
        wire: wire.clone(),
        receivers,
        pub_acked: (0..opts.publishers).map(|_| AtomicU64::new(0)).collect(),
        last_own: (0..opts.publishers).map(|_| AtomicU64::new(0)).collect(),
        fallback_upto: (0..opts.publishers).map(|_| AtomicU64::new(0)).collect(),
        mix: (opts.edit_share, opts.react_share),
        window,
        acked: (0..opts.rooms).map(|_| AtomicU64::new(0)).collect(),
        max_acked_seq: conns
            .iter()
            .take(opts.rooms)
            .map(|(_, _, s)| AtomicU64::new(*s))
            .collect(),
        fanout: (0..opts.rooms)
            .map(|_| Mutex::new(HashMap::new()))
            .collect(),
        fanout_hist: Mutex::new(stats::histogram()),
        live: Mutex::new(stats::histogram()),
        deliveries: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        sent_in_window: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        gaps: AtomicU64::new(0),
        acked_total: AtomicU64::new(0),
        stop: tokio_util_stop::Stop::new(),
    });
    // The room's seq at join time is the same for all its members only if
    // nobody published before; use the highest seen per room as the base.
    for (i, (_, _, seq)) in conns.iter().enumerate() {
        shared.max_acked_seq[i % opts.rooms].fetch_max(*seq, Ordering::Relaxed);
    }

    let per_pub_rate = opts.rate / opts.publishers as f64;
    let pad = "x".repeat(opts.payload);
    let mut tasks = Vec::with_capacity(n);
    let mut writers = Vec::with_capacity(opts.publishers);
    let mut paces = Vec::with_capacity(opts.publishers);
    for (i, (ws, room, seq)) in conns.into_iter().enumerate() {
        let room_idx = i % opts.rooms;
        let (rd, wr) = ws.split(tokio::io::split);
        let (pong_tx, pong_rx) = tokio::sync::mpsc::channel::<Frame<'static>>(16);
        let sh = shared.clone();
        let publisher = i < opts.publishers;
        let interval_ns = (1e9 / per_pub_rate) as u64;
        let offset_ns = ((1e9 / per_pub_rate) * i as f64 / opts.publishers as f64) as u64;
        let ack_clock = publisher.then_some((t0 + offset_ns, interval_ns));
        tasks.push(tokio::spawn(reader(
            rd,
            pong_tx,
            sh.clone(),
            room_idx,
            i,
            seq,
            ack_clock,
        )));
        let sched = publisher.then(|| {
            let (tx, ticks) = tokio::sync::mpsc::unbounded_channel();
            paces.push(Pace {
                offset_ns,
                interval_ns,
                tx,
            });
            Schedule {
                pub_id: i as u64,
                room,
                room_idx,
                interval_ns,
                // Stagger publishers evenly inside one interval.
                offset_ns,
                t0,
                pad: pad.clone(),
                ticks,
            }
        });
        let w = tokio::spawn(writer(wr, pong_rx, sh, sched));
        if publisher {
            writers.push(w);
        } else {
            drop(w);
        }
    }

    let total_ns = window.1 - t0;
    std::thread::Builder::new()
        .name("loadgen-pacer".into())
        .spawn({
            let spin = Duration::from_micros(opts.spin_us);
            move || pacer(paces, pace_start, total_ns, spin)
        })
        .map_err(|e| anyhow::anyhow!("starting the pacer thread: {e}"))?;
    let before = sys::scrape(&http, &c.urls, &c.pids).await;
    let cpu0 = sys::own_cpu_seconds();
    let wall0 = Instant::now();
    let timeline = Arc::new(Mutex::new(Vec::new()));
    let live = match c.metrics_listen {
        Some(addr) => {
            let l = crate::live::Live::new();
            l.offered_rate.set(opts.rate);
            l.connections.set(n as i64);
            let server = l.clone().serve(addr).await?;
            Some((l, server))
        }
        None => None,
    };
    let progress = tokio::spawn(progress(
        shared.clone(),
        timeline.clone(),
        !c.quiet,
        live.as_ref().map(|l| l.0.clone()),
    ));
    let mut lag = stats::histogram();
    for w in writers {
        if let Ok(h) = w.await {
            let _ = lag.add(&h);
        }
    }
    let wall = wall0.elapsed().as_secs_f64();
    let cpu1 = sys::own_cpu_seconds();
    let after = sys::scrape(&http, &c.urls, &c.pids).await;

    // Drain: wait until every acked message reached every member, or 5 s.
    let expected = |sh: &Shared| -> u64 {
        sh.acked
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum::<u64>()
            * sh.receivers as u64
    };
    let drain_deadline = Instant::now() + Duration::from_secs(5);
    while shared.deliveries.load(Ordering::Relaxed) < expected(&shared)
        && Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    shared.stop.fire();
    progress.abort();
    if let Some((l, server)) = live {
        l.connections.set(0);
        server.abort();
    }

    let mut hist = stats::histogram();
    let mut ack_hist = stats::histogram();
    let (mut lost, mut dup, mut reo, mut received) = (0, 0, 0, 0);
    for t in tasks {
        let r = t.await?;
        let _ = hist.add(&r.hist);
        let _ = ack_hist.add(&r.acks);
        if wire.has_room_seq() {
            let max_acked = shared.max_acked_seq[r.room].load(Ordering::Relaxed);
            lost += r.tracker.missing(max_acked);
        } else {
            // Every publisher of this room (but itself, where the protocol
            // does not echo) should have reached this receiver.
            for j in (r.room..opts.publishers).step_by(opts.rooms) {
                if j == r.me && !wire.echoes_sender() {
                    continue;
                }
                let count = shared.pub_acked[j].load(Ordering::Relaxed);
                if count > 0 {
                    lost += r
                        .per_pub
                        .get(&(j as u64))
                        .map_or(count, |t| t.missing(count - 1));
                }
            }
        }
        for t in std::iter::once(&r.tracker).chain(r.per_pub.values()) {
            dup += t.duplicated;
            reo += t.reordered;
            received += t.received;
        }
    }
    let fan = shared.fanout_hist.lock().clone();
    let points = timeline.lock().clone();
    let ack_latency = Percentiles::of(&ack_hist);
    let achieved = shared.sent_in_window.load(Ordering::Relaxed) as f64 / opts.duration;
    let rate_ok = achieved >= 0.99 * opts.rate;
    let latency = Percentiles::of(&hist);
    let mut failures = Vec::new();
    if !rate_ok {
        failures.push(format!(
            "achieved rate {achieved:.0}/s is under 99% of {:.0}/s",
            opts.rate
        ));
    }
    if lost > opts.max_loss {
        failures.push(format!("{lost} deliveries lost (max {})", opts.max_loss));
    }
    if dup > 0 || reo > 0 {
        failures.push(format!("{dup} duplicated, {reo} reordered deliveries"));
    }
    if let Some(max) = opts.max_p99_ms {
        if latency.p99 > max {
            failures.push(format!("p99 {:.3} ms over {max} ms", latency.p99));
        }
    }
    let errors = shared.errors.lock().clone();
    if let Some((code, n)) = errors.iter().next() {
        failures.push(format!("{n} publishes refused with error {code}"));
    }
    Ok(FanoutReport {
        scenario: "fanout",
        opts: opts.clone(),
        target_rate: opts.rate,
        achieved_rate: achieved,
        rate_ok,
        sent: shared.sent.load(Ordering::Relaxed),
        acked: shared.acked.iter().map(|a| a.load(Ordering::Relaxed)).sum(),
        errors,
        expected_deliveries: expected(&shared),
        deliveries: received,
        deliveries_per_sec: latency.count as f64 / opts.duration,
        lost,
        duplicated: dup,
        reordered: reo,
        latency,
        fanout_latency: Percentiles::of(&fan),
        ack_latency,
        send_lag: Percentiles::of(&lag),
        loadgen_cpu_percent: 100.0 * (cpu1 - cpu0) / wall,
        broker_cpu_percent: before
            .iter()
            .zip(&after)
            .map(|(b, a)| 100.0 * (a.cpu_seconds - b.cpu_seconds) / wall)
            .collect(),
        broker_cpu_us_per_delivery: {
            let cpu: f64 = before
                .iter()
                .zip(&after)
                .map(|(b, a)| a.cpu_seconds - b.cpu_seconds)
                .sum();
            // The CPU window spans the warm-up too: divide by every
            // delivery, not only the measured ones.
            if received > 0 {
                cpu * 1e6 / received as f64
            } else {
                0.0
            }
        },
        broker_rss_bytes: after.iter().map(|a| a.rss_bytes).collect(),
        failures,
        latency_curve: stats::curve(&hist),
        latency_raw: stats::raw(&hist),
        ack_raw: stats::raw(&ack_hist),
        timeline: points,
        fanout_curve: stats::curve(&fan),
    })
}

struct Schedule {
    pub_id: u64,
    room: String,
    room_idx: usize,
    interval_ns: u64,
    offset_ns: u64,
    t0: u64,
    pad: String,
    /// Send times, as schedule indexes, from the pacer thread.
    ticks: tokio::sync::mpsc::UnboundedReceiver<u64>,
}

/// One publisher's schedule, for the pacer.
struct Pace {
    offset_ns: u64,
    interval_ns: u64,
    tx: tokio::sync::mpsc::UnboundedSender<u64>,
}

/// The pacer: one OS thread that sleeps until `spin` before the next
/// intended send time of any publisher (nanosleep, ~60 µs slack), spins
/// the rest, and wakes that publisher.
/// tokio's timer rounds every sleep up to a whole millisecond, which would
/// put up to 1 ms of the load generator's own delay into every latency.
fn pacer(paces: Vec<Pace>, start: std::time::Instant, dur_ns: u64, spin: Duration) {
    use std::{cmp::Reverse, collections::BinaryHeap};
    let mut heap: BinaryHeap<Reverse<(u64, usize, u64)>> = paces
        .iter()
        .enumerate()
        .map(|(i, p)| Reverse((p.offset_ns, i, 0)))
        .collect();
    while let Some(Reverse((due, i, k))) = heap.pop() {
        if due >= dur_ns {
            continue;
        }
        let at = start + Duration::from_nanos(due);
        let now = std::time::Instant::now();
        if at > now + spin {
            std::thread::sleep(at - now - spin);
        }
        while std::time::Instant::now() < at {
            std::hint::spin_loop();
        }
        if paces[i].tx.send(k).is_err() {
            continue; // that publisher is gone
        }
        heap.push(Reverse((due + paces[i].interval_ns, i, k + 1)));
    }
}

type Rd = fastwebsockets::WebSocketRead<
    tokio::io::ReadHalf<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
>;
type Wr = fastwebsockets::WebSocketWrite<
    tokio::io::WriteHalf<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
>;

async fn writer(
    mut wr: Wr,
    mut pongs: tokio::sync::mpsc::Receiver<Frame<'static>>,
    sh: Arc<Shared>,
    sched: Option<Schedule>,
) -> Histogram<u64> {
    let mut lag = stats::histogram();
    if let Some(s) = sched {
        let mut ticks = s.ticks;
        // A reaction is added, then removed from the same message.
        let mut reacted: Option<u64> = None;
        loop {
            // The pacer thread says when; pongs are answered while waiting.
            // A late sender sends at once and keeps the intended stamp.
            let k = loop {
                tokio::select! {
                    biased;
                    t = ticks.recv() => break t,
                    Some(p) = pongs.recv() => {
                        let _ = wr.write_frame(p).await;
                    }
                }
            };
            let Some(k) = k else { break };
            let intended = s.t0 + s.offset_ns + k * s.interval_ns;
            let body = json!({"s": intended, "p": s.pub_id, "n": k, "x": s.pad});
            let target = sh.last_own[s.pub_id as usize].load(Ordering::Relaxed);
            let frame = match slot(k, sh.mix.0, sh.mix.1) {
                // Nothing of its own acked yet: a plain message instead.
                Slot::Edit | Slot::React if target == 0 && reacted.is_none() => {
                    sh.fallback_upto[s.pub_id as usize].fetch_max(k + 1, Ordering::Relaxed);
                    sh.wire.publish(&s.room, k, body)
                }
                Slot::Msg => sh.wire.publish(&s.room, k, body),
                Slot::Edit => sh.wire.edit(&s.room, k, target, body),
                Slot::React => match reacted.take() {
                    Some(on) => sh.wire.react(&s.room, k, on, false),
                    None => {
                        reacted = Some(target);
                        sh.wire.react(&s.room, k, target, true)
                    }
                },
            };
            let Ok(frame) = frame else {
                break;
            };
            if wr.write_frame(frame).await.is_err() {
                break;
            }
            sh.sent.fetch_add(1, Ordering::Relaxed);
            if !sh.wire.has_acks() {
                // Nothing will confirm it: sent counts as accepted.
                sh.acked[s.room_idx].fetch_add(1, Ordering::Relaxed);
                sh.acked_total.fetch_add(1, Ordering::Relaxed);
                sh.pub_acked[s.pub_id as usize].fetch_add(1, Ordering::Relaxed);
            }
            let now = now_ns();
            if intended >= sh.window.0 {
                stats::record_ns(&mut lag, now.saturating_sub(intended));
            }
            if now >= sh.window.0 && now < sh.window.1 {
                sh.sent_in_window.fetch_add(1, Ordering::Relaxed);
            }
        }
        return lag;
    }
    loop {
        tokio::select! {
            _ = sh.stop.wait() => return lag,
            p = pongs.recv() => match p {
                Some(p) => { let _ = wr.write_frame(p).await; }
                None => return lag,
            },
        }
    }
}

async fn reader(
    mut rd: Rd,
    pongs: tokio::sync::mpsc::Sender<Frame<'static>>,
    sh: Arc<Shared>,
    room: usize,
    me: usize,
    joined_seq: u64,
    ack_clock: Option<(u64, u64)>,
) -> ConnResult {
    let mut hist = stats::histogram();
    let mut acks = stats::histogram();
    let mut tracker = Tracker {
        next: joined_seq + 1,
        ..Default::default()
    };
    let mut per_pub: HashMap<u64, Tracker> = HashMap::new();
    let mut batch: Vec<u64> = Vec::with_capacity(64);
    let mut send_fn = |f: Frame<'_>| {
        if f.opcode == OpCode::Pong {
            let _ = pongs.try_send(Frame::pong(Payload::Owned(f.payload.to_vec())));
        }
        std::future::ready(Ok::<(), std::convert::Infallible>(()))
    };
    loop {
        let frame = tokio::select! {
            _ = sh.stop.wait() => break,
            f = rd.read_frame(&mut send_fn) => match f {
                Ok(f) => f,
                Err(_) => break,
            },
        };
        if !matches!(frame.opcode, OpCode::Text | OpCode::Binary) {
            if frame.opcode == OpCode::Close {
                break;
            }
            continue;
        }
        let now = now_ns();
        match sh.wire.decode(&frame.payload) {
            Incoming::Msg { seq, body } => {
                // Completion is tracked per room seq, or per (publisher, n).
                let key = match seq {
                    Some(seq) => {
                        if seq > tracker.next {
                            sh.gaps.fetch_add(seq - tracker.next, Ordering::Relaxed);
                        }
                        tracker.see(seq);
                        seq
                    }
                    None => {
                        let p = body.p.unwrap_or(u64::MAX);
                        let k = body.n.unwrap_or(0);
                        let t = per_pub.entry(p).or_default();
                        if k > t.next {
                            sh.gaps.fetch_add(k - t.next, Ordering::Relaxed);
                        }
                        t.see(k);
                        (p << 32) | (k & 0xffff_ffff)
                    }
                };
                sh.deliveries.fetch_add(1, Ordering::Relaxed);
                // A reaction's body is the reaction: delivered and
                // counted, but it has no stamp to measure.
                let stamp = body.s.unwrap_or(0);
                let lat = now.saturating_sub(stamp);
                let measured = stamp >= sh.window.0 && stamp < sh.window.1;
                if measured {
                    stats::record_ns(&mut hist, lat);
                    batch.push(lat);
                    if batch.len() == 64 {
                        let mut live = sh.live.lock();
                        for l in batch.drain(..) {
                            stats::record_ns(&mut live, l);
                        }
                    }
                }
                let done = {
                    let mut m = sh.fanout[room].lock();
                    let e = m.entry(key).or_insert((sh.receivers, 0, measured));
                    e.0 -= 1;
                    e.1 = e.1.max(lat);
                    if e.0 == 0 {
                        m.remove(&key)
                    } else {
                        None
                    }
                };
                if let Some((_, worst, true)) = done {
                    stats::record_ns(&mut sh.fanout_hist.lock(), worst);
                }
            }
            Incoming::Ack { id, seq } => {
                if let Some((base, step)) = ack_clock {
                    let intended = base + id * step;
                    if intended >= sh.window.0 && intended < sh.window.1 {
                        stats::record_ns(&mut acks, now.saturating_sub(intended));
                    }
                }
                sh.acked[room].fetch_add(1, Ordering::Relaxed);
                sh.acked_total.fetch_add(1, Ordering::Relaxed);
                if let Some(seq) = seq {
                    sh.max_acked_seq[room].fetch_max(seq, Ordering::Relaxed);
                    let plain = slot(id, sh.mix.0, sh.mix.1) == Slot::Msg
                        || sh
                            .fallback_upto
                            .get(me)
                            .is_some_and(|f| id < f.load(Ordering::Relaxed));
                    if plain {
                        if let Some(l) = sh.last_own.get(me) {
                            l.fetch_max(seq, Ordering::Relaxed);
                        }
                    }
                }
                if let Some(c) = sh.pub_acked.get(me) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            Incoming::Error(code) => {
                *sh.errors.lock().entry(code).or_insert(0) += 1;
            }
            Incoming::Reply(bytes) => {
                let _ = pongs.try_send(Frame::text(Payload::Owned(bytes)));
            }
            Incoming::Other => {}
            Incoming::Undecodable => {
                *sh.errors.lock().entry(0).or_insert(0) += 1;
            }
        }
    }
    ConnResult {
        room,
        me,
        per_pub,
        hist,
        acks,
        tracker,
    }
}

async fn progress(
    sh: Arc<Shared>,
    timeline: Arc<Mutex<Vec<TimePoint>>>,
    print: bool,
    live: Option<Arc<crate::live::Live>>,
) {
    let mut last_sent = 0;
    let mut last_del = 0;
    let (mut last_acked, mut last_gaps, mut last_errs) = (0, 0, 0);
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let sent = sh.sent.load(Ordering::Relaxed);
        let del = sh.deliveries.load(Ordering::Relaxed);
        let h = std::mem::replace(&mut *sh.live.lock(), stats::histogram());
        let p = Percentiles::of(&h);
        let errs: u64 = sh.errors.lock().values().sum();
        if let Some(l) = &live {
            let acked = sh.acked_total.load(Ordering::Relaxed);
            let gaps = sh.gaps.load(Ordering::Relaxed);
            l.sent.inc_by(sent - last_sent);
            l.achieved_rate.set((sent - last_sent) as f64);
            l.deliveries.inc_by(del - last_del);
            l.acked.inc_by(acked - last_acked);
            l.gaps.inc_by(gaps - last_gaps);
            l.errors.inc_by(errs - last_errs);
            for (q, v) in [("0.5", p.p50), ("0.99", p.p99), ("0.999", p.p999)] {
                l.latency.get_or_create(&[("quantile", q)]).set(v / 1000.0);
            }
            (last_acked, last_gaps, last_errs) = (acked, gaps, errs);
        }
        timeline.lock().push(TimePoint {
            t: start.elapsed().as_secs_f64(),
            sent_per_sec: sent - last_sent,
            deliveries_per_sec: del - last_del,
            p50_ms: p.p50,
            p99_ms: p.p99,
        });
        last_sent = sent;
        last_del = del;
        if !print {
            continue;
        }
        tracing::info!(
            "[{:>4.0}s] sent {:>7}/s  deliveries {:>8}/s  p50 {:>7.3} ms  p99 {:>7.3} ms  errors {}",
            start.elapsed().as_secs_f64(),
            sent - last_sent,
            del - last_del,
            p.p50,
            p.p99,
            errs
        );
    }
}

/// Keep the type alias used by other scenarios.
pub type Conn = Ws;

#[cfg(test)]
mod tests {
    use super::{slot, Slot, Tracker};

    #[test]
    fn the_mix_is_spread_as_asked_and_reproducible() {
        let n = 100_000u64;
        let share =
            |want: Slot| (0..n).filter(|k| slot(*k, 0.2, 0.1) == want).count() as f64 / n as f64;
        assert!((share(Slot::Edit) - 0.2).abs() < 0.01);
        assert!((share(Slot::React) - 0.1).abs() < 0.01);
        assert!((share(Slot::Msg) - 0.7).abs() < 0.01);
        assert!((0..1000).all(|k| slot(k, 0.0, 0.0) == Slot::Msg));
    }

    #[test]
    fn tracker_counts_loss_dup_reorder() {
        let mut t = Tracker {
            next: 1,
            ..Default::default()
        };
        for s in [1, 2, 4, 3, 3, 6] {
            t.see(s);
        }
        assert_eq!((t.received, t.duplicated, t.reordered), (5, 1, 1));
        assert_eq!(t.missing(6), 1); // 5
        assert_eq!(t.missing(8), 3); // 5, 7, 8
    }
}
