//! Transparent mode in a network namespace: the app calls a service
//! address (no proxy settings, no sidecar port in its code); iptables,
//! installed by its sidecar in the app's namespace, redirects the
//! connection to the sidecar, which routes it to the cell that owns the
//! user. The sidecar's own connections to instances are not captured.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use atoll_testing::backend::Backend;

use crate::harness::{ATOLL, Control, examples, http_get};
use crate::sidecar::{APPS, Sidecar, eventually};

/// A network namespace joined to the host by a veth pair; removed on drop.
struct Namespace {
    name: String,
    host: String,
    inside: String,
}

impl Namespace {
    fn create() -> Namespace {
        let id = std::process::id() % 200 + 20;
        let name = format!("atoll-tp-{id}");
        let (host_if, ns_if) = (format!("atp{id}h"), format!("atp{id}n"));
        let (host, inside) = (format!("10.202.{id}.1"), format!("10.202.{id}.2"));
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let _ = Command::new("ip").args(["link", "del", &host_if]).status();
        let run = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("run ip");
            assert!(status.success(), "ip {}", args.join(" "));
        };
        run(&["netns", "add", &name]);
        run(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        run(&["link", "set", &ns_if, "netns", &name]);
        run(&["addr", "add", &format!("{host}/30"), "dev", &host_if]);
        run(&["link", "set", &host_if, "up"]);
        run(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{inside}/30"),
            "dev",
            &ns_if,
        ]);
        run(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"]);
        run(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        // A route for the service addresses (the nat OUTPUT redirect comes
        // after routing).
        run(&[
            "netns", "exec", &name, "ip", "route", "add", "default", "via", &host,
        ]);
        Namespace { name, host, inside }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A child process killed (and reaped) on drop, so that a failed
/// assertion leaves nothing running.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn can_run() -> bool {
    nix::unistd::geteuid().is_root()
        && Command::new("iptables")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread")]
async fn in_transparent_mode_iptables_sends_the_apps_calls_through_its_sidecar() {
    assert!(
        can_run(),
        "this test needs root and iptables (the test command installs Debian's iptables)"
    );
    let ns = Namespace::create();
    let control = Control::start_with(vec![format!("--listen={}:0", ns.host)]);
    control
        .atoll(&["apply", "-f", examples().to_str().expect("utf-8 path")])
        .success();
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(APPS))
        .success();
    let dir = tempfile::tempdir().expect("temp dir");
    // Providers on the host, reachable from the namespace at the host's
    // end of the veth.
    let bank1 = Backend::start("bank-rz01-0", "rz01", "127.0.0.1").await;
    let bank2 = Backend::start("bank-rz02-0", "rz02", "127.0.0.1").await;
    let on_host = |port: u16| {
        vec![
            format!("--inbound={}:{port}", ns.host),
            format!("--advertise={}", ns.host),
        ]
    };
    let _p1 = Sidecar::start_with(
        &control,
        dir.path(),
        "bank-rz01-0",
        ("bank", "rz01", "hz-a"),
        bank1.address(),
        &on_host(atoll_testing::free_port()),
    );
    let _p2 = Sidecar::start_with(
        &control,
        dir.path(),
        "bank-rz02-0",
        ("bank", "rz02", "hz-b"),
        bank2.address(),
        &on_host(atoll_testing::free_port()),
    );

    // The caller's sidecar in the app's namespace, capturing 10.96.0.0/16.
    let admin = format!("{}:{}", ns.inside, atoll_testing::free_port());
    let log = dir.path().join("caller.log");
    let mut caller = Reaped(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, ATOLL, "sidecar"])
            .args([
                "--instance",
                "web-rz01-0",
                "--cell",
                "rz01",
                "--zone",
                "hz-a",
                "--service",
                "web",
            ])
            .args([
                "--app=127.0.0.1:9",
                "--inbound=127.0.0.1:15006",
                "--outbound=127.0.0.1:15001",
            ])
            .arg(format!("--admin={admin}"))
            .arg("--transparent=10.96.0.0/16")
            .arg(format!("--control={}", control.url))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
            .spawn()
            .expect("spawn the sidecar in the namespace"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http_get(&admin, "/healthz"), Some((200, _))) {
        assert!(
            Instant::now() < deadline && caller.0.try_wait().ok().flatten().is_none(),
            "the sidecar in the namespace did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eventually(Duration::from_secs(15), "the providers register", || {
        let listed = control.json(&["registry", "list", "bank"]);
        listed["instances"].as_array().map_or(0, Vec::len) == 2
    });

    // The app: plain HTTP to a service address, nothing about a sidecar.
    let app_call = |user: &str| {
        let script = format!(
            "import http.client\nc = http.client.HTTPConnection('10.96.0.10', 80, timeout=10)\nc.request('GET', '/api/balance', headers={{'Host': 'bank', 'x-user-id': '{user}'}})\nr = c.getresponse()\nprint(r.status)\nprint(r.read().decode())"
        );
        let output = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-c", &script])
            .output()
            .expect("run the app");
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    };
    let answer = app_call("30");
    assert!(
        answer.starts_with("200"),
        "{answer}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(answer.contains("\"cell\":\"rz02\""), "{answer}");
    let answer = app_call("7");
    assert!(answer.contains("\"cell\":\"rz01\""), "{answer}");
    assert_eq!(bank2.requests(), 1);
    assert_eq!(bank1.requests(), 1);
    let rules = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "iptables",
            "-t",
            "nat",
            "-S",
            "ATOLL_OUTBOUND",
        ])
        .output()
        .expect("iptables");
    assert!(
        String::from_utf8_lossy(&rules.stdout).contains("--to-ports 15001"),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );

    // Stopped, the sidecar takes its rules with it.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(caller.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = caller.0.wait();
    let rules = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables", "-t", "nat", "-S"])
        .output()
        .expect("iptables");
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains("ATOLL_OUTBOUND"),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );
}
