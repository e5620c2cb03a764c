//! Disk-level behaviour of a real `storage` process:
//!
//! - a full disk (ENOSPC on a small tmpfs) is fail-stop: no append after the failure is
//!   acknowledged, the process exits non-zero and its log explains the disk error;
//! - a bit flip in the middle of the WAL makes the node refuse to start, naming file and
//!   offset, unless `--discard-corrupt-tail` is given, which starts on the shortened log;
//! - a second process on the same data directory refuses to start;
//! - `storage wal verify` and `storage wal dump` work on a real data directory;
//! - a snapshot transfer finishes although a newer snapshot removes its file midway.

mod storage_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use storage_common::*;
use walkv_shared::rpc::{FetchReply, StorageClient};
use walkv_shared::transport::context_with_timeout;
use walkv_shared::types::KeyValue;
use walkv_shared::{KvError, Seq};
use walkv_tests::process::{wait_until_async, TestDir};

/// How long a node may take to exit after a fatal error or SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// Unmounts the tmpfs on drop, also when the test panics.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Property: a full disk is never ignored. Once an append fails with a disk error, no
/// later append is acknowledged; the process exits non-zero and logs why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_is_fail_stop() {
    if !is_root() {
        println!("skipping full_disk_is_fail_stop: mounting a tmpfs needs root");
        return;
    }
    let dir = TestDir::new("storage-enospc");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
        .arg(&mnt)
        .status();
    if !status.as_ref().is_ok_and(|s| s.success()) {
        println!("skipping full_disk_is_fail_stop: cannot mount a tmpfs here ({status:?})");
        return;
    }
    let _mount = Mount(mnt.clone());
    let mut node = spawn_node(dir.path(), "s1", &mnt.join("data"), "", &[]);
    let client = connect_ready(&mut node).await;
    let mut acked = 0u64;
    let mut failure = None;
    for seq in 1..=1000u64 {
        match append(&client, vec![record(seq, 16 * 1024)]).await {
            Ok(_) => acked = seq,
            Err(e) => {
                failure = Some((seq, e));
                break;
            }
        }
    }
    let (failed_seq, error) = failure.expect("a 512 KiB disk must fill up within 16 MB of appends");
    println!("first failure at seq {failed_seq}: {error}");
    assert!(
        acked > 0,
        "appends are acknowledged until the disk is full: {error}\n{}",
        node.process.log_tail(20)
    );
    assert!(
        matches!(error, KvError::Io(_) | KvError::Unavailable(_)),
        "unexpected error {error:?}"
    );
    for seq in failed_seq..failed_seq + 5 {
        let r = append(&client, vec![record(seq, 10)]).await;
        assert!(
            r.is_err(),
            "append of seq {seq} acknowledged after the disk failed: {r:?}"
        );
    }
    let status = node
        .process
        .wait_exit(EXIT_TIMEOUT)
        .expect("node must exit after a disk error");
    assert_eq!(status.code(), Some(3), "fail-stop exit code");
    let log = node.process.log();
    assert!(
        log.contains("disk error") && log.contains("No space left"),
        "log must explain the disk error:\n{}",
        node.process.log_tail(20)
    );
    // Every acknowledged record is in the WAL that is left behind.
    let (code, out, err) = run_tool(&[
        "wal",
        "dump",
        "--data-dir",
        &mnt.join("data").display().to_string(),
    ]);
    assert_eq!(code, 0, "dump: {err}");
    assert!(
        out.lines().count() as u64 >= acked,
        "dump has {} records, {acked} were acknowledged",
        out.lines().count()
    );
}

/// Appends `n` records to a fresh node in `data` and stops it gracefully.
async fn fill(dir: &Path, data: &Path, n: u64, config_extra: &str) {
    let mut node = spawn_node(dir, "fill", data, config_extra, &[]);
    let client = connect_ready(&mut node).await;
    for seq in 1..=n {
        append(&client, vec![record(seq, 20)])
            .await
            .expect("append");
    }
    node.process.terminate();
    let status = node
        .process
        .wait_exit(EXIT_TIMEOUT)
        .expect("exit after SIGTERM");
    assert!(status.success(), "graceful exit: {status:?}");
}

/// Byte offset of the start of line `index` (0-based) in `bytes`.
fn line_offset(bytes: &[u8], index: usize) -> usize {
    bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(index - 1)
        .map(|(i, _)| i + 1)
        .expect("enough lines")
}

/// Property: a corrupt record before the end of the WAL is never skipped silently: the
/// node refuses to start (exit 1) naming the file and offset; `--discard-corrupt-tail`
/// starts it on the log cut at that record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mid_wal_corruption_refuses_start_unless_discarded() {
    let dir = TestDir::new("storage-corrupt");
    let data = dir.path().join("data");
    fill(dir.path(), &data, 20, "").await;
    let seg = segments(&data).pop().expect("a segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let offset = line_offset(&bytes, 9); // record seq 10
    bytes[offset + 25] ^= 0x08;
    std::fs::write(&seg, &bytes).unwrap();

    let mut node = spawn_node(dir.path(), "s1", &data, "", &[]);
    let status = node
        .process
        .wait_exit(EXIT_TIMEOUT)
        .expect("a node with a corrupt WAL must not keep running");
    assert_eq!(status.code(), Some(1));
    let log = node.process.log();
    let name = seg.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        log.contains(&name) && log.contains(&format!("offset {offset}")) && log.contains("seq 10"),
        "log must name file, offset and seq:\n{log}"
    );
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        bytes,
        "the corrupt file is kept untouched"
    );

    let (code, _, err) = run_tool(&["wal", "verify", "--data-dir", &data.display().to_string()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&name) && err.contains(&format!("offset {offset}")),
        "verify: {err}"
    );

    let mut node = spawn_node(dir.path(), "s1b", &data, "", &["--discard-corrupt-tail"]);
    let client = connect_ready(&mut node).await;
    assert_eq!(
        position(&client).await.seq.0,
        9,
        "log cut before the corrupt record"
    );
    assert!(node.process.log().contains("corrupt WAL tail discarded"));
    // The shortened log continues normally.
    append(&client, vec![record(10, 20)])
        .await
        .expect("append after discard");
    let kept = std::fs::read_dir(&data)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".corrupt-")
        })
        .count();
    assert_eq!(kept, 1, "a copy of the corrupt segment is kept");
}

/// Property: a torn last record (crash mid-write) is truncated with a warning, not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_is_truncated_at_start() {
    let dir = TestDir::new("storage-torn");
    let data = dir.path().join("data");
    fill(dir.path(), &data, 5, "").await;
    let seg = segments(&data).pop().expect("a segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    // Over the preallocated zeros right after the last record, where the writer would
    // have put record 6.
    let end = bytes.iter().rposition(|&b| b != 0).expect("records") + 1;
    assert!(
        bytes.len() > end,
        "the segment is preallocated past its records"
    );
    let torn = b"{\"crc\":12,\"seq\":6,\"epo";
    bytes[end..end + torn.len()].copy_from_slice(torn);
    std::fs::write(&seg, &bytes).unwrap();
    let mut node = spawn_node(dir.path(), "s1", &data, "", &[]);
    let client = connect_ready(&mut node).await;
    assert_eq!(position(&client).await.seq.0, 5);
    assert!(
        node.process.log().contains("torn WAL tail truncated"),
        "{}",
        node.process.log_tail(10)
    );
}

/// Property: a second process on the same data directory refuses to start (exit 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_process_on_same_dir_refuses() {
    let dir = TestDir::new("storage-lock");
    let data = dir.path().join("data");
    let mut first = spawn_node(dir.path(), "s1", &data, "", &[]);
    connect_ready(&mut first).await;
    let mut second = spawn_node(dir.path(), "s1-dup", &data, "", &[]);
    let status = second
        .process
        .wait_exit(EXIT_TIMEOUT)
        .expect("the second process must exit");
    assert_eq!(status.code(), Some(1));
    assert!(
        second.process.log().contains("in use by another process"),
        "{}",
        second.process.log_tail(10)
    );
    first.process.assert_alive();
}

/// Property: `wal verify` accepts a healthy directory with a snapshot, and `wal dump`
/// prints the snapshot header and every record after it as JSON lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_dump_a_real_data_dir() {
    let dir = TestDir::new("storage-tools");
    let data = dir.path().join("data");
    fill(dir.path(), &data, 25, "snapshot_every = 10").await;
    let d = data.display().to_string();
    let (code, out, err) = run_tool(&["wal", "verify", "--data-dir", &d]);
    assert_eq!(code, 0, "verify: {out}{err}");
    assert!(
        out.contains("snapshot") && out.contains("ok: log ends at seq 25"),
        "{out}"
    );
    let (code, out, err) = run_tool(&["wal", "dump", "--data-dir", &d]);
    assert_eq!(code, 0, "dump: {err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("dump line is JSON"))
        .collect();
    assert_eq!(lines[0]["type"], "snapshot");
    let snap_seq = lines[0]["seq"].as_u64().unwrap();
    assert!(snap_seq >= 10, "a snapshot was taken: {}", lines[0]);
    let seqs: Vec<u64> = lines[1..]
        .iter()
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (snap_seq + 1..=25).collect::<Vec<_>>());
    assert_eq!(lines.last().unwrap()["key"], "k25");
}

/// How long a node may take to write a snapshot of a few dozen keys.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(20);

/// The seq of the node's newest snapshot (0 if none): `fetch` from seq 1 is sent to it.
async fn snapshot_seq(client: &StorageClient) -> u64 {
    match client
        .fetch(context_with_timeout(RPC_TIMEOUT), TOKEN.into(), Seq(1), 1)
        .await
        .expect("fetch rpc")
        .expect("fetch")
    {
        FetchReply::SnapshotNeeded { snapshot_seq, .. } => snapshot_seq.0,
        FetchReply::Records(_) => 0,
    }
}

/// Appends the test records of `seqs`, one per call.
async fn append_range(client: &StorageClient, seqs: std::ops::RangeInclusive<u64>) {
    for seq in seqs {
        append(client, vec![record(seq, 20)]).await.expect("append");
    }
}

/// One `snapshot_page` of up to three keys.
async fn page(
    client: &StorageClient,
    seq: u64,
    after: Option<String>,
) -> Result<walkv_shared::rpc::SnapshotPage, KvError> {
    client
        .snapshot_page(
            context_with_timeout(RPC_TIMEOUT),
            TOKEN.into(),
            Seq(seq),
            after,
            3,
            None,
        )
        .await
        .expect("snapshot_page rpc")
}

/// Property: a catch-up copying a snapshot page by page gets the whole snapshot it started,
/// even when the node writes a newer one meanwhile and removes the old file. Each page
/// opened the file by name, so the next page failed ("snapshot ... is gone") and the catch-up
/// started over; under steady writes a large store could then never finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_transfer_outlives_the_file_a_newer_snapshot_removes() {
    let dir = TestDir::new("storage-snapshot-transfer");
    let data = dir.path().join("data");
    let mut node = spawn_node(dir.path(), "s", &data, "snapshot_every = 10", &[]);
    let client = connect_ready(&mut node).await;
    append_range(&client, 1..=40).await;
    assert!(
        wait_until_async(SNAPSHOT_TIMEOUT, || async {
            snapshot_seq(&client).await > 0
        })
        .await,
        "no snapshot after 40 records:\n{}",
        node.process.log_tail(20)
    );
    // The snapshot `fetch` names may be replaced before the first page is asked for (the
    // node may still be writing snapshots of the 40 records): then start over, as a
    // catch-up does.
    let mut start = None;
    for _ in 0..10 {
        let seq = snapshot_seq(&client).await;
        match page(&client, seq, None).await {
            Ok(p) => {
                start = Some((seq, p));
                break;
            }
            Err(KvError::InvalidInput(why)) if why.contains("is gone") => continue,
            Err(e) => panic!("first page of seq {seq}: {e}"),
        }
    }
    let (first, opening) = start.expect("a first page within 10 tries");
    let mut got: Vec<KeyValue> = Vec::new();
    assert_eq!(opening.seq, Seq(first));
    assert!(
        !opening.done,
        "three keys of {first} are not the whole snapshot"
    );
    got.extend(opening.items);

    // Writes go on until a newer snapshot has replaced the one being copied on disk.
    let old_file = data.join(format!("snapshot-{first:020}.json"));
    for round in 1..=20u64 {
        append_range(&client, 21 + 20 * round..=40 + 20 * round).await;
        let replaced = wait_until_async(Duration::from_secs(1), || async {
            snapshot_seq(&client).await > first && !old_file.exists()
        })
        .await;
        if replaced {
            break;
        }
        assert!(round < 20, "no newer snapshot replaced seq {first}");
    }

    loop {
        let after = got.last().map(|kv| kv.key.clone());
        let p = page(&client, first, after).await.unwrap_or_else(|e| {
            panic!(
                "the transfer of seq {first} broke off after {} keys: {e}",
                got.len()
            )
        });
        assert_eq!(p.seq, Seq(first));
        got.extend(p.items);
        if p.done {
            break;
        }
    }
    let mut want: Vec<String> = (1..=first).map(|seq| format!("k{seq}")).collect();
    want.sort();
    assert_eq!(
        got.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        want
    );
    for kv in &got {
        let seq: u64 = kv.key[1..].parse().unwrap();
        assert_eq!(
            (kv.value.as_str(), kv.version),
            (value_for(seq, 20).as_str(), Seq(seq))
        );
    }
}
