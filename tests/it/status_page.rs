//! The status page in a real headless Chromium: it loads from the real server, shows a failed
//! initialiser's error, and a screenshot of it is kept under the target directory.
//!
//! Without Chromium the harness reports the test as ignored; `BOOTSYNC_REQUIRE_BROWSER=1` (set
//! by CI) runs it anyway, so a missing browser fails.

use crate::support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::Proc;

const SPEC: &str = "cadence: { gate_backoff: 1s, retry: 1s, steady: 300s, max_backoff: 2s }
initialisers:
  - class: exec
    name: seed-users
    flag: v1
    params: { command: [sh, -c, 'true'] }
  - class: exec
    name: migrate-db
    flag: v3
    params: { command: [sh, -c, 'echo \"schema <v3> migration exploded\" >&2; exit 4'] }
";

/// Runs headless Chromium on `url` with `what` (`--dump-dom` or `--screenshot=...`), bounded
/// in time; returns its stdout.
fn headless(browser: &Path, profile: &Path, what: &str, url: &str) -> String {
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            // The machine has no network beyond loopback: keep Chromium from trying.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(what)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    out
}

async fn wait_until_failed(url: &str, token: &str) {
    let http = bootsync::tls::plain_client();
    support::wait_for(
        Duration::from_secs(60),
        "migrate-db to have failed and seed-users to be stored",
        || async {
            let status: serde_json::Value =
                support::json_of(http.get(format!("{url}/v1/status")).bearer_auth(token)).await?;
            let list = status["initialisers"].as_array()?;
            let failed = list
                .iter()
                .any(|i| i["name"] == "migrate-db" && i["last_run"]["last_error"].is_string());
            let stored = list
                .iter()
                .any(|i| i["name"] == "seed-users" && i["stored_flag"] == "v1");
            (failed && stored).then_some(())
        },
    )
    .await;
}

#[it::test(needs = browser)]
async fn the_page_shows_a_failed_initialiser_in_a_real_browser() {
    let browser = crate::harness::chromium().expect("the harness checked for Chromium");
    let dir = support::dir_with(&[("spec.yaml", SPEC), ("admin.token", "page-t0ken\n")]);
    let db = format!("sqlite:{}/x.db", dir.path().display());
    let server = Proc::start(
        dir.path(),
        &format!("run --spec spec.yaml --store {db} --admin-token-file admin.token"),
    );
    wait_until_failed(&server.url, "page-t0ken").await;

    // The admin token guards the page; a browser gets a Basic challenge.
    let anonymous = support::get(format!("{}/", server.url)).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(
        anonymous.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic"),
    );
    let denied = headless(
        &browser,
        &dir.path().join("p0"),
        "--dump-dom",
        &format!("{}/", server.url),
    );
    assert!(!denied.contains("migration exploded"), "{denied}");

    // With the token as the password, the page renders what the reconciler recorded.
    let authed = server
        .url
        .replacen("http://", "http://operator:page-t0ken@", 1)
        + "/";
    let dom = headless(&browser, &dir.path().join("p1"), "--dump-dom", &authed);
    assert!(dom.contains("<title>bootsync: converging</title>"), "{dom}");
    let row = dom
        .split("<tr id=\"init-migrate-db\">")
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_else(|| panic!("no row for migrate-db: {dom}"));
    assert!(
        row.contains("schema &lt;v3&gt; migration exploded"),
        "the row shows the error, escaped: {row}"
    );
    assert!(row.contains(">failed<"), "{row}");
    assert!(row.contains("<td>v3</td>"), "wanted flag: {row}");
    let ok_row = dom
        .split("<tr id=\"init-seed-users\">")
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap();
    assert!(ok_row.contains(">succeeded<"), "{ok_row}");
    assert!(dom.contains("<b id=\"backend\">sqlite</b>"), "{dom}");

    // The screenshot: a real PNG of the rendered page, kept for a person to look at.
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("status-page.png");
    let _ = std::fs::remove_file(&png);
    headless(
        &browser,
        &dir.path().join("p2"),
        &format!("--screenshot={}", png.display()),
        &authed,
    );
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG file");
    assert!(
        bytes.len() > 10_000,
        "a rendered page, not a blank image: {} bytes",
        bytes.len()
    );
    eprintln!("screenshot: {}", png.display());
}
