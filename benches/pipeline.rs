//! Throughput benches (events per second): parsing, arrival batching and
//! event-time windowing, batch analysis at four
//! batch sizes, small batches analysed one job each or together, the
//! in-process analysis core (parse, batch, analyze, encode),
//! packet building, the shares of a merged group (encoding, decoding and
//! merging, with the bytes per event printed), and the whole pipeline over
//! librdkafka's mock cluster.
//! Data comes from the generator; setup stays out of the timed part.

use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use login_metrics::commands::generator::{Generator, GeneratorConfig};
use login_metrics::core::analysis::{analyze, analyze_many};
use login_metrics::core::event::{parse, parse_with_serde, Field, Requirements};
use login_metrics::core::grouping::arrival::{Batcher, Limits};
use login_metrics::core::grouping::window::{LatePolicy, WindowConfig, Windower};
use login_metrics::core::packet;
use login_metrics::core::privacy::Pseudonymizer;
use login_metrics::settings::Settings;
use login_metrics::work::{Batch, CloseReason, Columns, Coord};
use login_metrics::Pipeline;

fn payloads(n: usize, seed: u64) -> Vec<Vec<u8>> {
    Generator::new(GeneratorConfig::new(seed))
        .take(n)
        .map(|m| m.payload)
        .collect()
}

fn defaults() -> Settings {
    Settings::load_with_env(None, Vec::<(String, String)>::new()).unwrap()
}

fn requirements() -> Requirements {
    Requirements {
        fields: vec![Field::UserId],
        timestamp: true,
        not_after_ms: None,
    }
}

/// The valid events of `payloads` as one closed batch.
fn batch_of(payloads: &[Vec<u8>]) -> Batch {
    let req = requirements();
    let mut b = Batcher::new(Limits {
        max_events: usize::MAX,
        max_span: Duration::from_secs(u64::MAX / 4),
        max_wait: Duration::from_secs(3600),
    });
    let now = Instant::now();
    let mut closed = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let at = Coord {
            topic: "user-login",
            partition: 0,
            offset: i as i64,
        };
        match parse(p, &req) {
            Ok(ev) => b.push_event(at, &ev, now, &mut closed),
            Err(e) => b.push_invalid(at, None, p, e, now, &mut closed),
        }
    }
    b.close(CloseReason::Shutdown).unwrap()
}

fn identity(privacy: &Pseudonymizer) -> packet::Identity {
    let s = defaults();
    packet::Identity::new("bench", "user-login", &s.analysis.slices, 100, privacy)
}

/// Parses `payloads` into ten-second tumbling windows over three partitions
/// (round robin); returns the valid events in the windows closed by watermark.
fn windows_of(payloads: &[Vec<u8>]) -> usize {
    let req = requirements();
    let mut w = Windower::new(
        WindowConfig {
            size: Duration::from_secs(10),
            hop: Duration::from_secs(10),
            grace: Duration::from_secs(5),
            idle: Duration::from_secs(30),
            max_wait: Duration::from_secs(3600),
            max_events: usize::MAX,
            max_buffered: usize::MAX,
            max_dead_letters: usize::MAX,
            late: LatePolicy::DeadLetter,
        },
        "user-login",
    );
    let now = Instant::now();
    let mut valid = 0;
    for (i, p) in payloads.iter().enumerate() {
        let (partition, offset) = ((i % 3) as i32, (i / 3) as i64);
        match parse(p, &req) {
            Ok(ev) => w.push_event(partition, offset, None, p, &ev, now),
            Err(e) => w.push_invalid(partition, offset, None, p, e, now),
        }
        if let Some(work) = w.take_work(now, false) {
            valid += work.batches.iter().map(Batch::valid).sum::<usize>();
        }
    }
    valid
}

fn bench_parse(c: &mut Criterion) {
    let data = payloads(100_000, 1);
    let req = requirements();
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(data.len() as u64));
    g.bench_function("100k events", |b| {
        b.iter(|| {
            for p in &data {
                let _ = black_box(parse(black_box(p), &req));
            }
        })
    });
    // The reference the fast path is measured against.
    g.bench_function("100k events, serde_json only", |b| {
        b.iter(|| {
            for p in &data {
                let _ = black_box(parse_with_serde(black_box(p), &req));
            }
        })
    });
    g.finish();
}

fn bench_batch(c: &mut Criterion) {
    let data = payloads(100_000, 1);
    let mut g = c.benchmark_group("batch");
    g.sample_size(20);
    g.throughput(Throughput::Elements(data.len() as u64));
    g.bench_function("parse+push 100k", |b| {
        b.iter(|| black_box(batch_of(&data).valid()))
    });
    g.bench_function("parse+window 100k", |b| {
        b.iter(|| black_box(windows_of(&data)))
    });
    g.finish();
}

fn bench_analysis(c: &mut Criterion) {
    let slices = defaults().analysis.slices;
    let mut g = c.benchmark_group("analysis");
    g.sample_size(10);
    for n in [1_000usize, 10_000, 100_000, 1_000_000] {
        let columns: Columns = batch_of(&payloads(n, 2)).columns;
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &columns, |b, cols| {
            b.iter(|| analyze(black_box(cols), &slices, 100).unwrap())
        });
    }
    g.finish();
}

fn bench_analysis_jobs(c: &mut Criterion) {
    // The same 100,000 events as one batch, and as twenty batches of 5,000 (a
    // backlog of one-second windows) analysed one job each or in one job.
    let slices = defaults().analysis.slices;
    let data = payloads(100_000, 2);
    let whole = batch_of(&data).columns;
    let small: Vec<Columns> = data.chunks(5_000).map(|c| batch_of(c).columns).collect();
    let small_refs: Vec<&Columns> = small.iter().collect();
    let mut g = c.benchmark_group("analysis jobs");
    g.sample_size(10);
    g.throughput(Throughput::Elements(data.len() as u64));
    g.bench_function("1 x 100k", |b| {
        b.iter(|| analyze(black_box(&whole), &slices, 100).unwrap())
    });
    g.bench_function("20 x 5k, a job each", |b| {
        b.iter(|| {
            small
                .iter()
                .map(|cols| analyze(black_box(cols), &slices, 100).unwrap().len())
                .sum::<usize>()
        })
    });
    g.bench_function("20 x 5k, one job", |b| {
        b.iter(|| analyze_many(black_box(&small_refs), &slices, 100).unwrap())
    });
    g.finish();
}

fn bench_core(c: &mut Criterion) {
    // The in-process analysis core at 100k-event batches: parse into the
    // batcher, analyze with Polars, build and encode the packet.
    let data = payloads(500_000, 3);
    let slices = defaults().analysis.slices;
    let privacy = Pseudonymizer::disabled();
    let analyze_and_encode = |batch: &Batch| {
        let reports = analyze(&batch.columns, &slices, 100).unwrap();
        packet::build(batch, &reports, &privacy, &identity(&privacy), Utc::now())
            .to_json()
            .len()
    };
    let mut g = c.benchmark_group("core");
    g.sample_size(10);
    g.throughput(Throughput::Elements(100_000));
    g.bench_function("sequential 100k", |b| {
        b.iter(|| analyze_and_encode(&batch_of(&data[..100_000])))
    });
    // As the service runs it: one thread parses and batches while another
    // analyzes the previous batch (a channel of one batch between them).
    g.throughput(Throughput::Elements(data.len() as u64));
    g.bench_function("pipelined 5 x 100k", |b| {
        b.iter(|| {
            std::thread::scope(|scope| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(1);
                scope.spawn(|| {
                    for chunk in data.chunks(100_000) {
                        tx.send(batch_of(chunk)).unwrap();
                    }
                    drop(tx);
                });
                rx.iter()
                    .map(|batch| analyze_and_encode(&batch))
                    .sum::<usize>()
            })
        })
    });
    g.finish();
}

fn bench_packet(c: &mut Criterion) {
    let batch = batch_of(&payloads(10_000, 4));
    let slices = defaults().analysis.slices;
    let reports = analyze(&batch.columns, &slices, 100).unwrap();
    let plain = Pseudonymizer::disabled();
    let keyed = Pseudonymizer::new(b"bench-key", &[Field::Ip, Field::DeviceId]);
    let mut g = c.benchmark_group("packet");
    g.throughput(Throughput::Elements(1));
    g.bench_function("build+encode", |b| {
        b.iter(|| packet::build(&batch, &reports, &plain, &identity(&plain), Utc::now()).to_json())
    });
    g.bench_function("build+encode pseudonymized", |b| {
        b.iter(|| packet::build(&batch, &reports, &keyed, &identity(&keyed), Utc::now()).to_json())
    });
    g.finish();
}

/// A window of 100k events as six partitions' shares, as stage 1 of a
/// merged group sends them: what it costs to encode, decode and merge them,
/// per event.
fn bench_merge(c: &mut Criterion) {
    use login_metrics::core::merge::{MergeState, Merger, Progress, Record, Share};
    use login_metrics::work::{SourceRange, WindowId};
    use std::sync::Arc;

    let slices = defaults().analysis.slices;
    let mut fields: Vec<Field> = slices.iter().flatten().copied().collect();
    fields.sort_unstable_by_key(|f| f.index());
    fields.dedup();
    let all = payloads(100_000, 9);
    let shares: Vec<Share> = all
        .chunks(all.len().div_ceil(6))
        .enumerate()
        .map(|(p, chunk)| {
            let b = batch_of(chunk);
            Share {
                window: WindowId {
                    start_ms: 0,
                    end_ms: 10_000,
                    pane: 0,
                },
                part: 0,
                parts: 1,
                source: SourceRange {
                    topic: Arc::from("user-login"),
                    partition: p as i32,
                    first_offset: 0,
                    last_offset: chunk.len() as i64 - 1,
                },
                ts_min_ms: b.ts_min_ms,
                ts_max_ms: b.ts_max_ms,
                invalid_by_kind: b.invalid_by_kind,
                late: 0,
                closed_by: CloseReason::Watermark,
                columns: b.columns,
            }
        })
        .collect();
    let events: usize = shares.iter().map(|s| s.columns.len()).sum();
    let encoded: Vec<Vec<u8>> = shares
        .iter()
        .map(|s| Record::Share(Box::new(s.clone())).encode(&fields))
        .collect();
    let bytes: usize = encoded.iter().map(Vec::len).sum();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for e in &encoded {
        std::io::Write::write_all(&mut gz, e).unwrap();
    }
    let compressed = gz.finish().unwrap().len();
    let json: usize = all.iter().map(Vec::len).sum();
    eprintln!(
        "merge: {events} valid events of {} messages; shares {:.1} bytes/event ({:.1} gzip fast), input JSON {:.1} bytes/message",
        all.len(),
        bytes as f64 / events as f64,
        compressed as f64 / events as f64,
        json as f64 / all.len() as f64
    );
    let mut g = c.benchmark_group("merge");
    g.throughput(Throughput::Elements(events as u64));
    g.bench_function("encode 6 shares of 100k", |b| {
        b.iter(|| {
            shares
                .iter()
                .map(|s| Record::Share(Box::new(s.clone())).encode(&fields).len())
                .sum::<usize>()
        })
    });
    g.bench_function("decode 6 shares of 100k", |b| {
        b.iter(|| {
            encoded
                .iter()
                .map(|e| match Record::decode(e).unwrap() {
                    Record::Share(s) => s.columns.len(),
                    Record::Progress(_) => 0,
                })
                .sum::<usize>()
        })
    });
    g.bench_function("merge 6 shares of 100k", |b| {
        b.iter(|| {
            let mut m = Merger::new(6, &MergeState::default());
            for (i, s) in shares.iter().enumerate() {
                m.add(s.clone(), i as u64);
                m.progress(Progress {
                    partition: i as i32,
                    closed_ms: 10_000,
                });
            }
            black_box(m.complete(Instant::now()))
        })
    });
    g.finish();
}

fn bench_pipeline(c: &mut Criterion) {
    use rdkafka::mocking::MockCluster;
    use std::sync::atomic::Ordering;
    use tokio_util::sync::CancellationToken;

    const EVENTS: u64 = 200_000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut g = c.benchmark_group("pipeline");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(30));
    g.throughput(Throughput::Elements(EVENTS));
    g.bench_function(
        "mock cluster 200k events, preloaded topic to last commit",
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let cluster = MockCluster::new(1).unwrap();
                    cluster.create_topic("user-login", 3, 1).unwrap();
                    cluster.create_topic("login-metrics", 1, 1).unwrap();
                    cluster.create_topic("user-login-dlq", 1, 1).unwrap();
                    let mut s = defaults();
                    s.kafka.bootstrap_servers = cluster.bootstrap_servers();
                    s.metrics_log.path = None;
                    s.telemetry.listen = None;
                    // The service's own producer settings (gzip): the mock cluster,
                    // unlike a broker, never returns a record batch larger than the
                    // consumer's max.partition.fetch.bytes, so uncompressed 2 MB
                    // batches would stall it.
                    let producer_cfg = login_metrics::kafka::producer(&s.kafka);
                    let mut generator = Generator::new(GeneratorConfig::new(5));
                    login_metrics::commands::generate::produce_generated(
                        &producer_cfg,
                        "user-login",
                        &mut generator,
                        Some(EVENTS),
                        0,
                        &CancellationToken::new(),
                    )
                    .unwrap();

                    let started = Instant::now();
                    rt.block_on(async {
                        let pipeline = Pipeline::new(s);
                        let progress = pipeline.progress();
                        let shutdown = CancellationToken::new();
                        let run = tokio::spawn(pipeline.run(shutdown.clone()));
                        while progress.messages.load(Ordering::Relaxed) < EVENTS {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        shutdown.cancel();
                        run.await.unwrap().unwrap();
                    });
                    total += started.elapsed();
                }
                total
            })
        },
    );
    g.finish();
}

criterion_group!(
    benches,
    bench_parse,
    bench_batch,
    bench_analysis,
    bench_analysis_jobs,
    bench_core,
    bench_packet,
    bench_merge,
    bench_pipeline
);
criterion_main!(benches);
