//! The status page at `/`, loaded by headless Chromium: it renders every node with its
//! role from `/v1/status`, shows a node as down after it is killed, and its live feed
//! (WebSocket) connects.

use walkv_shared::types::NodeRole;
use walkv_tests::cluster::{ClusterOptions, TestCluster};
use walkv_tests::tools::{curl, require, run};

/// Chromium's DOM after the page ran for a few seconds of virtual time.
fn dump_dom(url: &str, profile: &std::path::Path) -> String {
    let profile = format!("--user-data-dir={}", profile.display());
    let out = run(
        90,
        "chromium",
        &[
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            &profile,
            "--virtual-time-budget=3000",
            "--dump-dom",
            url,
        ],
        None,
    );
    assert_eq!(out.code, 0, "chromium failed: {}", out.stderr);
    out.stdout
}

/// The role the page shows for `id`, read from its row's `data-role` attribute.
fn role_on_page(dom: &str, id: &str) -> Option<String> {
    let row = dom.find(&format!("id=\"node-{id}\""))?;
    let rest = &dom[row..];
    let start = rest.find("data-role=\"")? + "data-role=\"".len();
    let end = rest[start..].find('"')?;
    Some(rest[start..start + end].to_string())
}

/// The page shows three in-sync nodes; after `s2` is killed, a fresh load shows it down
/// while the others stay in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium_shows_a_killed_node_down() {
    if !require(
        "status_page_in_chromium_shows_a_killed_node_down",
        &["chromium", "curl"],
    ) {
        return;
    }
    let mut cluster = TestCluster::start(ClusterOptions::default()).await;
    let url = format!("http://{}/", cluster.http_addr);
    let (code, html) = curl(&[], &url);
    assert_eq!(code, 200);
    assert!(html.contains("<title>walkv status</title>"));

    let profile = cluster.dir.path().join("chromium-profile");
    let dom = dump_dom(&url, &profile);
    for id in ["s1", "s2", "s3"] {
        assert_eq!(
            role_on_page(&dom, id).as_deref(),
            Some("in_sync"),
            "{id} before the kill:\n{dom}"
        );
    }
    assert!(dom.contains("data-available=\"true\""), "{dom}");
    assert!(
        dom.contains("(live)"),
        "the WebSocket feed connected:\n{dom}"
    );

    cluster.nodes[1].process.kill();
    cluster
        .wait_status("s2 down", |s| {
            s.nodes
                .iter()
                .any(|n| n.id.0 == "s2" && n.role == NodeRole::Down)
        })
        .await;
    let dom = dump_dom(&url, &profile);
    assert_eq!(
        role_on_page(&dom, "s2").as_deref(),
        Some("down"),
        "after the kill:\n{dom}"
    );
    assert_eq!(role_on_page(&dom, "s1").as_deref(), Some("in_sync"));
}
