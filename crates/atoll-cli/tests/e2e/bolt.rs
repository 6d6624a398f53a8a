//! SOFA Bolt through sidecars, against the real Java library
//! (`com.alipay.sofa:bolt` from Maven Central, interop/bolt-java): a Java
//! client's calls through its sidecar land in the cell that owns the user
//! named in its header map, Java servers behind their sidecars answer, and
//! a provider's sidecar refuses a user it does not own with an exception
//! the Java client raises.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Control, examples};
use crate::sidecar::{APPS, Sidecar, eventually};

/// Builds the Java peer (once per version, cached under the home
/// directory) and returns its classpath.
pub(crate) fn java_classpath() -> String {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../interop/bolt-java/build.sh");
    let output = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run interop/bolt-java/build.sh");
    assert!(
        output.status.success(),
        "building the Java Bolt peer failed"
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let deps = std::fs::read_to_string(dir.join("classpath.txt")).expect("classpath");
    format!("{}:{}", dir.join("classes").display(), deps.trim())
}

/// A Java Bolt server, killed on drop.
pub(crate) struct JavaServer(Child);

impl JavaServer {
    pub(crate) fn start(
        classpath: &str,
        port: u16,
        name: &str,
        log: &std::path::Path,
    ) -> JavaServer {
        let child = Command::new("java")
            .args(["-cp", classpath, "dev.atoll.interop.BoltPeer", "server"])
            .arg(port.to_string())
            .arg(name)
            .stdout(Stdio::from(std::fs::File::create(log).expect("log")))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn java");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the Java server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        JavaServer(child)
    }
}

impl Drop for JavaServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the Java client: one line per call.
pub(crate) fn java_calls(
    classpath: &str,
    address: &str,
    count: u32,
    headers: &[&str],
) -> Vec<String> {
    let output = Command::new("java")
        .args([
            "-cp",
            classpath,
            "dev.atoll.interop.BoltPeer",
            "client",
            address,
        ])
        .arg(count.to_string())
        .args(headers)
        .stderr(Stdio::null())
        .output()
        .expect("run the Java client");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("error "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_java_bolt_client_reaches_the_owning_cell_through_sidecars_and_sees_refusals() {
    let classpath = java_classpath();
    let control = Control::start();
    control
        .atoll(&["apply", "-f", examples().to_str().expect("utf-8 path")])
        .success();
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(APPS))
        .success();
    let dir = tempfile::tempdir().expect("temp dir");
    let (port1, port2) = (atoll_testing::free_port(), atoll_testing::free_port());
    let _java1 = JavaServer::start(
        &classpath,
        port1,
        "bank-rz01",
        &dir.path().join("java1.log"),
    );
    let _java2 = JavaServer::start(
        &classpath,
        port2,
        "bank-rz02",
        &dir.path().join("java2.log"),
    );
    let bolt = ["--app-protocol=bolt".to_owned()];
    let provider1 = Sidecar::start_with(
        &control,
        dir.path(),
        "bank-rz01-0",
        ("bank", "rz01", "hz-a"),
        format!("127.0.0.1:{port1}").parse().expect("address"),
        &bolt,
    );
    let _provider2 = Sidecar::start_with(
        &control,
        dir.path(),
        "bank-rz02-0",
        ("bank", "rz02", "hz-b"),
        format!("127.0.0.1:{port2}").parse().expect("address"),
        &bolt,
    );
    let outbound_bolt = format!("127.0.0.1:{}", atoll_testing::free_port());
    let app = atoll_testing::backend::Backend::start("web-rz01-0", "rz01", "127.0.0.1").await;
    let caller = Sidecar::start_with(
        &control,
        dir.path(),
        "web-rz01-0",
        ("web", "rz01", "hz-a"),
        app.address(),
        &[format!("--outbound-bolt={outbound_bolt}")],
    );
    eventually(
        Duration::from_secs(15),
        "both Bolt providers register",
        || {
            let listed = control.json(&["registry", "list", "bank"]);
            listed["instances"]
                .as_array()
                .is_some_and(|l| l.len() == 2 && l.iter().all(|i| i["protocol"] == "bolt"))
        },
    );

    // The user in the header map picks the cell: 7 is rz01's, 30 rz02's.
    let calls = java_calls(
        &classpath,
        &outbound_bolt,
        3,
        &["service=bank", "x-user-id=30"],
    );
    assert_eq!(calls.len(), 3, "{calls:?}\n{}", caller.log());
    for line in &calls {
        assert!(
            line.starts_with("ok bank-rz02|call-"),
            "{calls:?}\n{}",
            caller.log()
        );
    }
    let calls = java_calls(
        &classpath,
        &outbound_bolt,
        2,
        &["service=bank", "x-user-id=7"],
    );
    assert!(
        calls.iter().all(|l| l.starts_with("ok bank-rz01|")),
        "{calls:?}"
    );
    // A key propagated from the inbound request (SOFARPC's header form).
    let calls = java_calls(
        &classpath,
        &outbound_bolt,
        1,
        &["service=bank", "atoll.key=30"],
    );
    assert!(calls[0].starts_with("ok bank-rz02|"), "{calls:?}");

    // Sent to rz01's sidecar directly, user 30 is refused: the Java
    // client raises it.
    let calls = java_calls(
        &classpath,
        &provider1.inbound,
        1,
        &["service=bank", "x-user-id=30"],
    );
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0].starts_with("error InvokeServerException"),
        "{calls:?}"
    );
    assert!(
        provider1.metrics().contains(
            r#"atoll_sidecar_refused_total{direction="inbound",service="bank",reason="notOwner"} 1"#
        ),
        "{}",
        provider1.metrics()
    );
    // An unknown service is refused by the caller's sidecar.
    let calls = java_calls(
        &classpath,
        &outbound_bolt,
        1,
        &["service=nosuch", "x-user-id=7"],
    );
    assert!(
        calls[0].starts_with("error InvokeServerException"),
        "{calls:?}"
    );
}
