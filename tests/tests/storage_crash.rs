//! Property: every append a `storage` process acknowledged survives SIGKILL at a random
//! moment under concurrent load, and after restart the node reports nothing that was not
//! sent (its log is a prefix of what the test sent, with exactly the values sent).
//!
//! The test plays the frontend: several tasks keep appends outstanding on one connection
//! (consecutive seqs, epoch 1), the process is killed with SIGKILL after a random delay,
//! restarted, and checked with `identity` and `read` of every key. Snapshots are taken every
//! few hundred records so kills also land around snapshot writes and WAL trimming. The seed
//! is printed; `WALKV_SEED=<n>` replays a run.

mod storage_common;

use futures::future::join_all;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use storage_common::*;
use walkv_shared::transport::context_with_timeout;
use walkv_shared::types::Outcome;
use walkv_shared::{KvError, Seq};
use walkv_tests::process::TestDir;

/// Kill/restart rounds.
const ROUNDS: usize = 6;
/// Concurrent appenders.
const WRITERS: usize = 8;
/// Bytes per value.
const VALUE_SIZE: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_sigkill() {
    let seed: u64 = std::env::var("WALKV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("storage_crash seed: {seed} (replay with WALKV_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = TestDir::new("storage-crash");
    let data = dir.path().join("data");
    let mut node = spawn_node(dir.path(), "s1", &data, "snapshot_every = 300", &[]);
    let mut max_acked_total = 0u64;
    for round in 0..ROUNDS {
        let client = connect_ready(&mut node).await;
        let start = position(&client).await.seq.0;
        assert!(
            start >= max_acked_total,
            "round {round}: log ends at {start} but seq {max_acked_total} was acknowledged"
        );
        let next = Arc::new(tokio::sync::Mutex::new(start + 1));
        let max_acked = Arc::new(AtomicU64::new(start));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..WRITERS {
            let (client, next, max_acked, stop) = (
                client.clone(),
                next.clone(),
                max_acked.clone(),
                stop.clone(),
            );
            let batch = rng.gen_range(1..=3u64);
            tasks.push(tokio::spawn(async move {
                writer(client, next, max_acked, stop, batch).await
            }));
        }
        let delay = Duration::from_millis(rng.gen_range(100..700));
        // Fault injection, not synchronisation: the kill lands at a random moment.
        tokio::time::sleep(delay).await;
        node.process.kill();
        stop.store(true, Ordering::SeqCst);
        for t in tasks {
            t.await.expect("writer task");
        }
        let acked = max_acked.load(Ordering::SeqCst);
        let sent = *next.lock().await - 1;
        println!(
            "round {round}: killed after {delay:?}; acked up to seq {acked}, sent up to {sent}"
        );
        assert!(
            acked > start,
            "round {round}: nothing was acknowledged in {delay:?}; log:\n{}",
            node.process.log_tail(20)
        );
        max_acked_total = acked;

        node.process.restart();
        let client = connect_ready(&mut node).await;
        let pos = position(&client).await.seq.0;
        assert!(
            pos >= acked,
            "round {round}: acknowledged seq {acked} lost, log ends at {pos}"
        );
        assert!(
            pos <= sent,
            "round {round}: node reports seq {pos} but only {sent} were sent"
        );
        check_values(&client, 1..=pos).await;
    }
    node.process.terminate();
    let status = node
        .process
        .wait_exit(Duration::from_secs(10))
        .expect("graceful exit after SIGTERM");
    assert!(
        status.success(),
        "SIGTERM exit: {status:?}\n{}",
        node.process.log_tail(20)
    );
    assert!(
        node.process.log().contains("snapshot written"),
        "the run should have crossed snapshots"
    );
}

/// Appends consecutive batches until stopped or the connection breaks. A `Gap` means an
/// earlier batch has not reached the node yet: retry shortly.
async fn writer(
    client: walkv_shared::rpc::StorageClient,
    next: Arc<tokio::sync::Mutex<u64>>,
    max_acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    batch: u64,
) {
    while !stop.load(Ordering::SeqCst) {
        let first = {
            let mut n = next.lock().await;
            let first = *n;
            *n += batch;
            first
        };
        let records: Vec<_> = (first..first + batch)
            .map(|s| record(s, VALUE_SIZE))
            .collect();
        loop {
            match append(&client, records.clone()).await {
                Ok(outcomes) => {
                    assert_eq!(outcomes.len(), records.len());
                    for (o, r) in outcomes.iter().zip(&records) {
                        assert_eq!(
                            *o,
                            Outcome::Written { version: r.seq },
                            "fresh puts are written at their seq"
                        );
                    }
                    max_acked.fetch_max(first + batch - 1, Ordering::SeqCst);
                    break;
                }
                Err(KvError::Gap { .. }) if !stop.load(Ordering::SeqCst) => {
                    tokio::time::sleep(Duration::from_millis(1)).await
                }
                // The process was killed: this batch's outcome is unknown.
                Err(_) => return,
            }
        }
    }
}

/// Every key in `range` has exactly the value the test sent for it.
async fn check_values(
    client: &walkv_shared::rpc::StorageClient,
    range: std::ops::RangeInclusive<u64>,
) {
    let seqs: Vec<u64> = range.collect();
    for chunk in seqs.chunks(64) {
        let reads = chunk.iter().map(|&s| async move {
            let r = client
                .read(
                    context_with_timeout(RPC_TIMEOUT),
                    TOKEN.into(),
                    format!("k{s}"),
                    Seq(0),
                )
                .await;
            (s, r)
        });
        for (s, r) in join_all(reads).await {
            let v = r
                .expect("read rpc")
                .expect("read")
                .value
                .unwrap_or_else(|| panic!("key k{s} missing"));
            assert_eq!(v.value, value_for(s, VALUE_SIZE), "key k{s}");
            assert_eq!(v.version, Seq(s), "key k{s}");
        }
    }
}
