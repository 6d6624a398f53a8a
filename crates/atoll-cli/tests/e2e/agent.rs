//! `atoll agent` against a real control plane: instances started, scaled,
//! replaced, restarted with backoff, reported as Endpoints, and run from
//! the disk cache while the control plane is down.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{ATOLL, Control, bank_program, examples};

/// A running `atoll agent`, stopped on drop.
struct AgentProcess {
    child: Option<Child>,
    admin: String,
    log: std::path::PathBuf,
}

impl AgentProcess {
    fn start(control: &str, zone: &str, state: &Path) -> AgentProcess {
        // The zones of these tests name no runAs; their instances run as
        // the agent (the run-as test starts its agent without the opt-in).
        Self::start_with(control, zone, state, &["--allow-root-instances"])
    }

    fn start_with(control: &str, zone: &str, state: &Path, extra: &[&str]) -> AgentProcess {
        std::fs::create_dir_all(state).expect("state dir");
        let admin = format!("127.0.0.1:{}", atoll_testing::free_port());
        let log = state.join("agent.log");
        // The bank signs the calls between its instances with a shared
        // secret; its instances inherit the agent's environment.
        let secret = state.join("bank-secret");
        std::fs::write(&secret, "test-secret-0123456789abcdef\n").expect("secret");
        let child = Command::new(ATOLL)
            .args([
                "--control",
                control,
                "agent",
                "--zone",
                zone,
                "--stop-grace",
                "2s",
                "--admin",
                &admin,
            ])
            .args(extra)
            .arg("--state-dir")
            .arg(state)
            .env_remove("ATOLL_CONTROL")
            .env("BANK_SECRET_FILE", &secret)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
            .spawn()
            .expect("spawn atoll agent");
        AgentProcess {
            child: Some(child),
            admin,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn instances(&self) -> Vec<Value> {
        match crate::harness::http_get(&self.admin, "/instances") {
            Some((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Waits until `check` holds for the instance list.
    fn wait(&self, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let instances = self.instances();
            if check(&instances) {
                return instances;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {instances:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn pid_of(instance: &Value) -> i32 {
    instance["process"]
        .as_str()
        .and_then(|p| p.strip_prefix("pid "))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid: {instance}"))
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
}

fn app(replicas: u32, bank: &Path) -> String {
    format!(
        "apiVersion: atoll/v1\nkind: App\nmetadata: {{name: bank}}\nspec:\n  service: bank\n  cells: [rz01, rz03]\n  replicas: {replicas}\n  command: [{}]\n  healthCheck: {{path: /healthz, interval: 1s}}\n  version: v1\n",
        serde_json::to_string(&bank.display().to_string()).expect("path")
    )
}

fn reported(control: &Control) -> Option<Value> {
    let run = control.atoll(&["get", "endpoints", "bank-hz-a", "-o", "json"]);
    (run.code() == 0).then(|| serde_json::from_str(&run.stdout()).expect("json"))
}

fn ready_count(endpoints: &Value) -> usize {
    endpoints["spec"]["endpoints"]
        .as_array()
        .map_or(0, |list| list.iter().filter(|e| e["ready"] == true).count())
}

fn wait_reported(
    control: &Control,
    what: &str,
    check: impl Fn(Option<&Value>) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let endpoints = reported(control);
        if check(endpoints.as_ref()) {
            return endpoints;
        }
        assert!(Instant::now() < deadline, "{what}: {endpoints:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the registry lists `count` instances of the bank.
fn wait_registered(control: &Control, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = control.json(&["registry", "list", "bank"]);
        let instances = listed["instances"].as_array().cloned().unwrap_or_default();
        if instances.len() == count {
            return instances;
        }
        assert!(Instant::now() < deadline, "{count} registered: {listed}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_agent_runs_scales_and_stops_its_zones_instances_and_reports_them() {
    let bank = bank_program();
    let mut control = Control::start();
    control
        .atoll(&["apply", "-f", examples().to_str().unwrap()])
        .success();
    let state = control.state.path().join("agent-hz-a");
    std::fs::write(control.state.path().join("app.yaml"), app(1, &bank)).expect("write");
    control
        .atoll(&[
            "apply",
            "-f",
            control.state.path().join("app.yaml").to_str().unwrap(),
        ])
        .success();
    let mut agent = AgentProcess::start(&control.url, "hz-a", &state);

    // One instance of rz01 (the zone's cell in the App); rz03 is sh-a's.
    let instances = agent.wait("one ready instance", |list| {
        list.len() == 1 && list[0]["ready"] == true
    });
    assert_eq!(instances[0]["name"], "bank-rz01-0");
    let first = pid_of(&instances[0]);
    let endpoints = wait_reported(&control, "reported ready", |e| {
        e.is_some_and(|e| ready_count(e) == 1)
    })
    .expect("endpoints");
    assert_eq!(endpoints["spec"]["zone"], "hz-a");
    assert_eq!(endpoints["spec"]["endpoints"][0]["cell"], "rz01");
    assert_eq!(endpoints["spec"]["endpoints"][0]["labels"]["version"], "v1");
    assert_eq!(
        endpoints["spec"]["endpoints"][0]["address"],
        instances[0]["address"]
    );
    let audit = control.atoll(&["audit"]).success().stdout();
    assert!(
        audit.contains("agent/hz-a"),
        "reports are audited with the agent as author: {audit}"
    );
    // The instance got its identity in the environment.
    let environ = std::fs::read(format!("/proc/{first}/environ")).expect("environ");
    let environ = String::from_utf8_lossy(&environ);
    for needle in [
        "ATOLL_CELL=rz01",
        "ATOLL_ZONE=hz-a",
        "ATOLL_REGION=hz",
        "ATOLL_INSTANCE=bank-rz01-0",
        "ATOLL_SERVICE=bank",
        "ATOLL_REPLICA=0",
    ] {
        assert!(environ.contains(needle), "{needle} in the environment");
    }
    let cells = control.json(&["get", "cells", "rz01"]);
    assert_eq!(cells["status"]["health"], "Healthy", "{cells}");

    // Scale up: a second instance; the first is untouched.
    std::fs::write(control.state.path().join("app.yaml"), app(2, &bank)).expect("write");
    control
        .atoll(&[
            "apply",
            "-f",
            control.state.path().join("app.yaml").to_str().unwrap(),
        ])
        .success();
    let instances = agent.wait("two ready instances", |list| {
        list.len() == 2 && list.iter().all(|i| i["ready"] == true)
    });
    assert_eq!(
        pid_of(&instances[0]),
        first,
        "scaling does not restart the others"
    );
    let second = pid_of(&instances[1]);
    wait_reported(&control, "two reported ready", |e| {
        e.is_some_and(|e| ready_count(e) == 2)
    });
    // The agent keeps its ready instances in the service registry too.
    let registered = wait_registered(&control, 2);
    assert_eq!(registered[0]["cell"], "rz01", "{registered:?}");
    assert_eq!(registered[0]["region"], "hz", "{registered:?}");
    assert_eq!(registered[0]["version"], "v1", "{registered:?}");
    assert_eq!(
        registered[0]["address"], instances[0]["address"],
        "{registered:?}"
    );
    assert!(
        registered[0]["registeredBy"]
            .as_str()
            .is_some_and(|by| by.starts_with("agent/hz-a/")),
        "{registered:?}"
    );

    // Scale down: the second stops.
    std::fs::write(control.state.path().join("app.yaml"), app(1, &bank)).expect("write");
    control
        .atoll(&[
            "apply",
            "-f",
            control.state.path().join("app.yaml").to_str().unwrap(),
        ])
        .success();
    agent.wait("one instance again", |list| list.len() == 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(second) {
        assert!(Instant::now() < deadline, "the removed instance still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(alive(first));
    wait_registered(&control, 1);

    // Static stability: the control plane goes away and the agent restarts;
    // it runs its instances from its disk cache.
    control.stop();
    assert_eq!(
        agent.stop().code(),
        Some(0),
        "a clean stop:\n{}",
        agent.log()
    );
    assert!(!alive(first), "stopping the agent stops its instances");
    let agent = AgentProcess::start(&control.url, "hz-a", &state);
    agent.wait("running from the cache", |list| {
        list.len() == 1 && list[0]["running"] == true
    });
    drop(agent);
}

/// Issue 11: "applying an App whose command an agent then ran as root".
/// An agent running as root runs a zone's instances as the user its
/// `runAs` names; a zone that names none, or names root, gets no instance
/// (with the reason in its status) unless the agent was started with
/// --allow-root-instances.
#[test]
fn an_agent_runs_instances_as_the_zones_user_and_as_root_only_by_opt_in() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: an agent cannot switch users; skipped");
        return;
    }
    let control = Control::start();
    control
        .atoll(&["apply", "-f", examples().to_str().unwrap()])
        .success();
    let apply = |name: &str, yaml: &str| {
        let path = control.state.path().join(name);
        std::fs::write(&path, yaml).expect("write");
        control
            .atoll(&["apply", "-f", path.to_str().unwrap()])
            .success();
    };
    apply(
        "app.yaml",
        "apiVersion: atoll/v1\nkind: App\nmetadata: {name: who}\nspec:\n  service: web\n  cells: [rz01]\n  command: [sh, -c, 'echo uid=$(id -u) gid=$(id -g) groups=$(id -G); exec sleep 60']\n",
    );
    let state = control.state.path().join("agent-hz-a");
    let agent = AgentProcess::start_with(&control.url, "hz-a", &state, &[]);
    let refused = |why: &'static str| {
        move |list: &[Value]| {
            list.first().is_some_and(|i| {
                i["running"] == false && i["lastExit"].as_str().is_some_and(|e| e.contains(why))
            })
        }
    };
    agent.wait(
        "no runAs: refused",
        refused("Zone/hz-a names no spec.runAs and this agent runs as root"),
    );
    let log = state.join("logs/who-rz01-0.log");
    assert!(!log.exists(), "nothing was started");

    apply(
        "zone.yaml",
        "apiVersion: atoll/v1\nkind: Zone\nmetadata: {name: hz-a}\nspec: {region: hz, runAs: root}\n",
    );
    agent.wait(
        "runAs root: refused",
        refused("only when started with --allow-root-instances"),
    );
    assert!(!log.exists(), "nothing was started");

    apply(
        "zone.yaml",
        "apiVersion: atoll/v1\nkind: Zone\nmetadata: {name: hz-a}\nspec: {region: hz, runAs: nobody}\n",
    );
    let instances = agent.wait("runs as nobody", |list| {
        list.first().is_some_and(|i| i["running"] == true)
    });
    let pid = pid_of(&instances[0]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let ids = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert_eq!(ids("Uid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(ids("Gid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(
        ids("Groups:"),
        "65534",
        "no supplementary group of the agent's"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("uid=65534 gid=65534 groups=65534")
    {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            std::fs::read_to_string(&log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Root's instances by opt-in: the start is logged as a warning.
    drop(agent);
    apply(
        "zone.yaml",
        "apiVersion: atoll/v1\nkind: Zone\nmetadata: {name: hz-a}\nspec: {region: hz, runAs: root}\n",
    );
    let agent = AgentProcess::start(&control.url, "hz-a", &state);
    // The agent starts from its disk cache (the Zone as `nobody`) before
    // the stream brings `root`: wait for the instance of the new Zone.
    let as_root = |instance: &Value| {
        std::fs::read_to_string(format!("/proc/{}/status", pid_of(instance)))
            .is_ok_and(|status| status.lines().any(|l| l.starts_with("Uid:\t0\t")))
    };
    let instances = agent.wait("runs as root by opt-in", |list| {
        list.first()
            .is_some_and(|i| i["running"] == true && as_root(i))
    });
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", pid_of(&instances[0]))).expect("status");
    assert!(
        status.lines().any(|l| l.starts_with("Uid:\t0\t")),
        "{status}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log().contains("running the instance as root") {
        assert!(Instant::now() < deadline, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        agent
            .log()
            .contains("--allow-root-instances: instances of zones")
    );
}

#[test]
fn a_crashing_instance_is_restarted_with_backoff_and_its_cell_is_unhealthy() {
    let control = Control::start();
    control
        .atoll(&["apply", "-f", examples().to_str().unwrap()])
        .success();
    let app = "apiVersion: atoll/v1\nkind: App\nmetadata: {name: crasher}\nspec:\n  service: web\n  cells: [rz01]\n  command: [sh, -c, 'echo starting $ATOLL_INSTANCE; exit 3']\n";
    std::fs::write(control.state.path().join("app.yaml"), app).expect("write");
    control
        .atoll(&[
            "apply",
            "-f",
            control.state.path().join("app.yaml").to_str().unwrap(),
        ])
        .success();
    let state = control.state.path().join("agent-hz-a");
    let agent = AgentProcess::start(&control.url, "hz-a", &state);
    agent.wait("a first exit", |list| {
        list.first()
            .is_some_and(|i| i["restarts"].as_u64() >= Some(1))
    });
    let first_exit = Instant::now();
    std::thread::sleep(Duration::from_millis(5500));
    let instances = agent.instances();
    let restarts = instances[0]["restarts"].as_u64().expect("restarts");
    // Exits at about 0 s, 1 s, 3 s, 7 s after the first: three in 5.5 s,
    // not dozens.
    assert!(
        (2..=4).contains(&restarts),
        "{restarts} restarts in {:?}: {instances:?}",
        first_exit.elapsed()
    );
    assert_eq!(instances[0]["lastExit"], "exited with status 3");
    assert_eq!(instances[0]["ready"], false);
    let log = std::fs::read_to_string(state.join("logs/crasher-rz01-0.log")).expect("instance log");
    assert!(
        log.matches("starting crasher-rz01-0").count() >= 2,
        "output captured at every start: {log}"
    );
    let cell = control.json(&["get", "cells", "rz01"]);
    assert_eq!(cell["status"]["health"], "Unhealthy", "{cell}");
    assert!(
        cell["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no instance is ready")),
        "{cell}"
    );
}

/// Reports on the config stream's service: an agent writes the Endpoints of
/// its own zone, as `agent/<zone>`, and nothing else.
#[tokio::test(flavor = "multi_thread")]
async fn only_a_zones_agent_reports_the_zones_endpoints() {
    use atoll_api::config::config_stream_client::ConfigStreamClient;
    use atoll_api::config::{EndpointsReport, NodeIdentity, Resource};

    let control = Control::start();
    control
        .atoll(&["apply", "-f", examples().to_str().unwrap()])
        .success();
    // Endpoints of sh-a that a person applied by hand.
    control
        .atoll_with_stdin(
            &["apply", "-f", "-"],
            Some(
                "apiVersion: atoll/v1\nkind: Endpoints\nmetadata: {name: bank-sh-a}\nspec:\n  service: bank\n  zone: sh-a\n  endpoints: [{cell: rz03, address: '127.0.0.1:9', instance: by-hand, ready: true}]\n",
            ),
        )
        .success();
    let mut client = ConfigStreamClient::connect(control.url.clone())
        .await
        .expect("connect");
    let agent = |role: &str, zone: &str| NodeIdentity {
        name: format!("agent-{zone}"),
        role: role.into(),
        zone: zone.into(),
        cell: String::new(),
        workspace: String::new(),
    };
    let endpoints = |name: &str, zone: &str, cell: &str| {
        Resource {
        kind: "Endpoints".into(),
        name: name.into(),
        resource_version: 0,
        json: serde_json::to_vec(&serde_json::json!({
            "apiVersion": "atoll/v1",
            "kind": "Endpoints",
            "metadata": {"name": name},
            "spec": {"service": "bank", "zone": zone, "endpoints": [
                {"cell": cell, "address": "127.0.0.1:18080", "instance": format!("bank-{cell}-0"), "ready": true}
            ]},
        }))
        .expect("json")
        .into(),
    }
    };
    let report =
        |node: NodeIdentity, resources: Vec<Resource>, gone: Vec<String>| EndpointsReport {
            node: Some(node),
            endpoints: resources,
            gone,
            message: "1 of 1 instances ready".into(),
        };

    // Its own zone: committed, audited as the agent.
    let answer = client
        .report_endpoints(report(
            agent("agent", "hz-a"),
            vec![endpoints("bank-hz-a", "hz-a", "rz01")],
            Vec::new(),
        ))
        .await
        .expect("its own zone's endpoints")
        .into_inner();
    assert!(answer.version > 0, "{answer:?}");
    let stored = control.json(&["get", "endpoints", "bank-hz-a"]);
    assert_eq!(stored["spec"]["zone"], "hz-a", "{stored}");
    let audit = control.atoll(&["audit"]).success().stdout();
    assert!(audit.contains("agent/hz-a"), "{audit}");

    // Another zone's, in a new resource or over one of that zone.
    for (name, zone) in [("bank-sh-a-2", "sh-a"), ("bank-sh-a", "sh-a")] {
        let refused = client
            .report_endpoints(report(
                agent("agent", "hz-a"),
                vec![endpoints(name, zone, "rz03")],
                Vec::new(),
            ))
            .await
            .expect_err("another zone's endpoints");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(
            refused.message().contains("only Endpoints of zone hz-a"),
            "{refused:?}"
        );
    }
    // Deleting another zone's, or reporting as anything but an agent.
    let refused = client
        .report_endpoints(report(
            agent("agent", "hz-a"),
            Vec::new(),
            vec!["bank-sh-a".into()],
        ))
        .await
        .expect_err("deleting another zone's endpoints");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let refused = client
        .report_endpoints(report(
            agent("gateway", "hz-a"),
            vec![endpoints("bank-hz-a", "hz-a", "rz01")],
            Vec::new(),
        ))
        .await
        .expect_err("a gateway reporting endpoints");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("only a zone's agent"),
        "{refused:?}"
    );
    // Broken JSON says what is wrong; one already gone is fine.
    let mut broken = endpoints("bank-hz-a", "hz-a", "rz01");
    broken.json = b"{\"kind\": \"Endpoints\", ".to_vec().into();
    let refused = client
        .report_endpoints(report(agent("agent", "hz-a"), vec![broken], Vec::new()))
        .await
        .expect_err("broken json");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let answer = client
        .report_endpoints(report(
            agent("agent", "hz-a"),
            Vec::new(),
            vec!["bank-hz-b".into()],
        ))
        .await
        .expect("deleting what is gone")
        .into_inner();
    assert_eq!(answer.version, 0);
    let stored = control.json(&["get", "endpoints", "bank-sh-a"]);
    assert_eq!(
        stored["spec"]["endpoints"][0]["instance"], "by-hand",
        "{stored}"
    );
}

/// An App with `mesh: sidecar`: the agent runs `atoll sidecar` beside each
/// instance, which registers the instance at its own inbound address (and
/// the agent reports that address as the endpoint), re-checks calls, and
/// goes with the instance.
#[test]
fn an_app_with_a_sidecar_is_reached_through_it_and_registered_by_it() {
    let bank = bank_program();
    let control = Control::start();
    control
        .atoll(&["apply", "-f", examples().to_str().unwrap()])
        .success();
    let state = control.state.path().join("agent-hz-a");
    let manifest = format!(
        "apiVersion: atoll/v1\nkind: App\nmetadata: {{name: bank}}\nspec:\n  service: bank\n  cells: [rz01]\n  replicas: 1\n  command: [{}]\n  healthCheck: {{path: /healthz, interval: 1s}}\n  version: v1\n  mesh: sidecar\n",
        serde_json::to_string(&bank.display().to_string()).expect("path")
    );
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(&manifest))
        .success();
    let mut agent = AgentProcess::start(&control.url, "hz-a", &state);
    let registered = wait_registered(&control, 1);
    assert_eq!(registered[0]["mode"], "sidecar", "{registered:?}");
    assert_eq!(
        registered[0]["registeredBy"], "sidecar/hz-a/bank-rz01-0",
        "{registered:?}"
    );
    let inbound = registered[0]["address"]
        .as_str()
        .expect("address")
        .to_owned();
    let instances = agent.wait("the instance is ready", |list| {
        list.iter().any(|i| i["ready"] == true)
    });
    let app_address = instances[0]["address"]
        .as_str()
        .expect("address")
        .to_owned();
    assert_ne!(
        inbound, app_address,
        "callers reach the app through the sidecar"
    );
    let endpoints = wait_reported(&control, "the endpoint is reported", |e| {
        e.is_some_and(|e| ready_count(e) == 1)
    })
    .expect("reported");
    assert_eq!(
        endpoints["spec"]["endpoints"][0]["address"],
        inbound.as_str(),
        "{endpoints}"
    );
    // Through the sidecar: the app answers what it owns; the sidecar
    // refuses a user of another cell (shard 30 is rz02's).
    let (status, _) = crate::harness::http_get(&inbound, "/healthz").expect("answers");
    assert_eq!(status, 200);
    let refused = {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(&inbound).expect("connect");
        write!(
            stream,
            "GET /api/balance HTTP/1.0\r\nHost: bank\r\nx-user-id: 30\r\n\r\n"
        )
        .expect("write");
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        text
    };
    assert!(refused.starts_with("HTTP/1.0 421"), "{refused}");
    assert!(refused.contains("notOwner"), "{refused}");
    let log = std::fs::read_to_string(state.join("logs").join("bank-rz01-0.sidecar.log"))
        .unwrap_or_default();
    assert!(log.contains("sidecar started"), "{log}");

    // The App goes: so do the sidecar and the registration.
    control.atoll(&["delete", "app", "bank"]).success();
    wait_registered(&control, 0);
    agent.wait("the instance stopped", |list| list.is_empty());
    assert!(
        crate::harness::http_get(&inbound, "/healthz").is_none(),
        "the sidecar stopped with its instance"
    );
    agent.stop();
}
