//! `loadgen floor`: what the machine's kernel charges for the writes a
//! fan-out makes, with no broker at all, so a broker's CPU per delivery
//! can be stated as a multiple of it.
//!
//! A writer thread, pinned to one core (where the broker would run),
//! accepts `--sockets` loopback connections and writes pre-encoded
//! WebSocket frames of `--frame-size` bytes to them round-robin at
//! `--rate` frames per second, `--batch` frames per (vectored) write; a
//! reader thread on another core (where the load generator would run)
//! reads them all. The writer thread's own CPU time (user + system, from
//! `/proc/thread-self/stat`) divided by the frames written is the floor:
//! on loopback it includes the receive-side kernel work the sender's
//! system call performs, exactly as it does for a broker.

use std::{
    io::{IoSlice, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;

/// Options of `loadgen floor`.
#[derive(Debug, Clone, clap::Args)]
pub struct FloorOpts {
    /// Loopback connections written to (a fan-out's recipients).
    #[arg(long, default_value_t = 500)]
    pub sockets: usize,
    /// Frames written per second, all sockets together (a fan-out's
    /// deliveries per second).
    #[arg(long, default_value_t = 40_000.0)]
    pub rate: f64,
    /// Bytes of one frame, header included (a delivered `msg` frame).
    #[arg(long, default_value_t = 120)]
    pub frame_size: usize,
    /// Frames per write to one socket (1: one write per delivery).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Core the writer thread is pinned to.
    #[arg(long, default_value_t = 0)]
    pub writer_core: usize,
    /// Core the reader thread is pinned to.
    #[arg(long, default_value_t = 1)]
    pub reader_core: usize,
    /// Write the result as JSON here.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// What `loadgen floor` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FloorResult {
    /// The options it ran with.
    pub sockets: usize,
    /// Frames per second asked for.
    pub rate: f64,
    /// Bytes per frame.
    pub frame_size: usize,
    /// Frames per write.
    pub batch: usize,
    /// Frames written.
    pub frames: u64,
    /// Bytes the reader received.
    pub bytes_read: u64,
    /// Seconds the writer ran.
    pub seconds: f64,
    /// CPU seconds of the writer thread (user + system).
    pub writer_cpu_seconds: f64,
    /// Writer CPU per frame, in microseconds: the floor.
    pub cpu_us_per_frame: f64,
}

fn pin(core: usize) {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
        tracing::warn!(
            core,
            "could not pin the thread; figures may mix with other work"
        );
    }
}

/// Run the measurement.
pub fn run(opts: &FloorOpts) -> anyhow::Result<FloorResult> {
    anyhow::ensure!(
        opts.sockets > 0 && opts.rate > 0.0 && opts.batch > 0 && opts.duration > 0.0,
        "--sockets, --rate, --batch and --duration must be positive"
    );
    anyhow::ensure!(
        opts.frame_size >= 2,
        "--frame-size is at least 2 (a frame head)"
    );
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (n, reader_core) = (opts.sockets, opts.reader_core);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader_stop = stop.clone();
    let reader = std::thread::spawn(move || -> anyhow::Result<u64> {
        pin(reader_core);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let total = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut tasks = Vec::with_capacity(n);
            for _ in 0..n {
                let s = tokio::net::TcpStream::connect(addr).await?;
                let total = total.clone();
                tasks.push(tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut s = s;
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(k) = s.read(&mut buf).await {
                        if k == 0 {
                            break;
                        }
                        total.fetch_add(k as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                }));
            }
            while !reader_stop.load(std::sync::atomic::Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // The writer has closed its sockets: the readers see EOF.
            for t in tasks {
                let _ = t.await;
            }
            Ok(total.load(std::sync::atomic::Ordering::Relaxed))
        })
    });
    pin(opts.writer_core);
    let mut socks: Vec<TcpStream> = Vec::with_capacity(n);
    for _ in 0..n {
        let (s, _) = listener.accept().context("accepting a reader connection")?;
        s.set_nodelay(true)?;
        socks.push(s);
    }
    // A binary frame of frame_size bytes in all.
    let payload = opts
        .frame_size
        .saturating_sub(if opts.frame_size > 127 { 4 } else { 2 });
    let mut frame = vec![0x82u8];
    if payload < 126 {
        frame.push(payload as u8);
    } else {
        frame.push(126);
        frame.extend_from_slice(&(payload as u16).to_be_bytes());
    }
    frame.resize(frame.len() + payload, b'x');
    let slices: Vec<IoSlice<'_>> = (0..opts.batch).map(|_| IoSlice::new(&frame)).collect();

    let writes_per_sec = opts.rate / opts.batch as f64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(opts.duration);
    let cpu0 = crate::sys::cpu_seconds_of("thread-self");
    let (mut writes, mut next) = (0u64, 0usize);
    // Open loop in 1 ms ticks: write what is due, then sleep.
    while Instant::now() < end {
        let due = (start.elapsed().as_secs_f64() * writes_per_sec) as u64;
        while writes < due {
            let s = &mut socks[next];
            next = (next + 1) % n;
            let mut bufs = &mut slices.clone()[..];
            while !bufs.is_empty() {
                let k = s.write_vectored(bufs).context("writing to a reader")?;
                IoSlice::advance_slices(&mut bufs, k);
            }
            writes += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let cpu = crate::sys::cpu_seconds_of("thread-self") - cpu0;
    let seconds = start.elapsed().as_secs_f64();
    drop(socks);
    stop.store(true, std::sync::atomic::Ordering::Release);
    let bytes_read = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
    let frames = writes * opts.batch as u64;
    Ok(FloorResult {
        sockets: n,
        rate: opts.rate,
        frame_size: frame.len(),
        batch: opts.batch,
        frames,
        bytes_read,
        seconds,
        writer_cpu_seconds: cpu,
        cpu_us_per_frame: if frames > 0 {
            cpu * 1e6 / frames as f64
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_written_is_read_and_costs_some_cpu() {
        let r = run(&FloorOpts {
            sockets: 8,
            rate: 4000.0,
            frame_size: 120,
            batch: 2,
            duration: 0.5,
            writer_core: 0,
            reader_core: 1,
            out: None,
        })
        .expect("floor");
        assert!(r.frames >= 1000, "{r:?}");
        assert_eq!(r.bytes_read, r.frames * 120);
        assert!(r.writer_cpu_seconds >= 0.0);
    }
}
