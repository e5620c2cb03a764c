//! Negative control for the linearizability checker: a frontend with the unsafe setting
//! `unsafe_read_any_node = true` serves reads from a node that is still catching up.
//!
//! Drill: kill s3 while workers write, restart it behind a slow proxy (300 ms per chunk,
//! catch-up pages of 5 records, joining only below a lag of 20), so it stays stale for seconds;
//! reads it serves return old values. The test passes only if the checker reports a
//! linearizability violation: a checker that cannot fail proves nothing.

use std::time::Duration;
use walkv_tests::chaos::nemesis::{Fault, Step};
use walkv_tests::chaos::proxy::Mode;
use walkv_tests::chaos::runner::{run, RunConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reads_from_unsafe_setting_are_caught() {
    let mut cfg = RunConfig::new(4242, Duration::from_millis(5500));
    cfg.keep_on_failure = false;
    cfg.frontend_extra =
        "unsafe_read_any_node = true\ncatchup_page_max = 5\ncatchup_join_lag = 20\n".into();
    cfg.schedule = Some(vec![
        Step {
            at_ms: 300,
            fault: Fault::KillStorage(vec![2]),
            hold_ms: 1500,
        },
        // Right after s3 restarts (at heal), before it has registered: slow its link.
        Step {
            at_ms: 1800,
            fault: Fault::Proxy(2, Mode::Delay(300)),
            hold_ms: 3500,
        },
    ]);
    let r = run(cfg).await;
    assert!(
        r.count("linearizability") > 0,
        "the checker missed stale reads from unsafe_read_any_node: {:?}",
        r.violations
    );
    let v = r
        .violations
        .iter()
        .find(|v| v.kind == "linearizability")
        .expect("counted above");
    assert!(
        v.detail.contains("none of these can be linearized next"),
        "counterexample names the operations: {}",
        v.detail
    );
}
