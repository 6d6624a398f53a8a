//! `atoll up`, the local sandbox, as a newcomer runs it: every component
//! ready, users served by the cells that own them, cross-cell transfers
//! exactly once, a killed instance healed, money conserved under load,
//! replication positions reported, and nothing left behind after Ctrl-C.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{ATOLL, bank_program as bank};

/// Which cell owns a user in the sandbox (last two digits of the id).
fn owner(user: u64) -> &'static str {
    match user % 100 {
        0..=33 => "rz01",
        34..=66 => "rz02",
        _ => "rz03",
    }
}

/// A running `atoll up`, stopped with SIGINT (Ctrl-C) on drop.
pub(crate) struct Sandbox {
    child: Option<Child>,
    pub(crate) state: tempfile::TempDir,
    pub(crate) up: Value,
    http: reqwest::Client,
}

impl Sandbox {
    pub(crate) fn start() -> Sandbox {
        Sandbox::start_with(&[])
    }

    /// `atoll up` with more flags.
    pub(crate) fn start_with(extra: &[&str]) -> Sandbox {
        Sandbox::start_in(extra, None)
    }

    /// `atoll up` with `home` as the user's state directory (where it
    /// registers itself), apart from the sandbox's own.
    pub(crate) fn start_with_home(home: &std::path::Path) -> Sandbox {
        Sandbox::start_in(&[], Some(home))
    }

    fn start_in(extra: &[&str], home: Option<&std::path::Path>) -> Sandbox {
        let bank = bank();
        let state = tempfile::tempdir().expect("temp dir");
        let log = std::fs::File::create(state.path().join("up.log")).expect("log");
        let child = Command::new(ATOLL)
            .args(["up", "--port-base", "0", "--state-dir"])
            .arg(state.path())
            .arg("--bank")
            .arg(&bank)
            .args(extra)
            .env("ATOLL_STATE_DIR", home.unwrap_or(state.path()))
            .env_remove("ATOLL_CONTROL")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn atoll up");
        let mut sandbox = Sandbox {
            child: Some(child),
            state,
            up: Value::Null,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
        };
        let path = sandbox.state.path().join("up.json");
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(up) = serde_json::from_str::<Value>(&text)
            {
                sandbox.up = up;
                break;
            }
            if let Some(Ok(Some(status))) = sandbox.child.as_mut().map(Child::try_wait) {
                panic!("atoll up exited with {status}:\n{}", sandbox.log());
            }
            assert!(
                Instant::now() < deadline,
                "atoll up not ready in 90 s:\n{}",
                sandbox.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        sandbox
    }

    /// The last lines of every bank instance's log (replication and outbox
    /// warnings), for failure messages.
    pub(crate) fn bank_logs(&self) -> String {
        let mut out = String::new();
        let Ok(zones) = std::fs::read_dir(self.state.path().join("agents")) else {
            return out;
        };
        for zone in zones.flatten() {
            let Ok(logs) = std::fs::read_dir(zone.path().join("logs")) else {
                continue;
            };
            for log in logs.flatten() {
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!("--- {}\n", log.path().display()));
                for line in &lines[lines.len().saturating_sub(15)..] {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("up.log")).unwrap_or_default()
    }

    fn gateway(&self, i: usize) -> String {
        let zone = ["hz-a", "hz-b", "sh-a"][i % 3];
        self.up["gateways"][zone]
            .as_str()
            .expect("gateway")
            .to_owned()
    }

    pub(crate) fn control(&self) -> String {
        self.up["control"].as_str().expect("control").to_owned()
    }

    /// The sandbox's CA bundle and admin token (none: `--insecure`).
    pub(crate) fn credentials(&self) -> Option<(String, String)> {
        let ca = self.up["ca"].as_str()?.to_owned();
        let token = std::fs::read_to_string(self.up["adminTokenFile"].as_str()?)
            .expect("the sandbox's admin token");
        Some((ca, token.trim().to_owned()))
    }

    /// `atoll --control <the sandbox> ...` with the sandbox's CA and admin
    /// token, as a user given them would run it.
    pub(crate) fn cli(&self) -> Command {
        let mut command = Command::new(ATOLL);
        command.args(["--control", &self.control()]);
        command.env_remove("ATOLL_CA").env_remove("ATOLL_TOKEN");
        if let Some((ca, token)) = self.credentials() {
            command.env("ATOLL_CA", ca).env("ATOLL_TOKEN", token);
        }
        command
    }

    /// [`Sandbox::cli`] for tokio.
    pub(crate) fn cli_async(&self) -> tokio::process::Command {
        tokio::process::Command::from(self.cli())
    }

    /// A REST client of the sandbox's control plane as its admin.
    pub(crate) fn control_client(&self) -> atoll_transport::RestClient {
        let urls = atoll_transport::ControlUrls::parse(&self.control()).expect("control URLs");
        match self.credentials() {
            Some((ca, token)) => {
                let tls = atoll_transport::TlsFiles {
                    ca: Some(ca.into()),
                    ..atoll_transport::TlsFiles::default()
                }
                .client()
                .expect("the sandbox's CA")
                .expect("TLS");
                atoll_transport::Transport::with_tls(tls)
                    .rest(urls, Some(Duration::from_secs(10)))
                    .with_token(&token)
                    .expect("token")
            }
            None => atoll_transport::Transport::plain().rest(urls, Some(Duration::from_secs(10))),
        }
    }

    async fn get(&self, url: &str) -> (u16, Value) {
        if let Some(path) = url.strip_prefix(&self.control()) {
            let answer = self
                .control_client()
                .send(reqwest::Method::GET, path, None)
                .await
                .unwrap_or_else(|e| panic!("GET {url}: {e}"));
            return (
                answer.status.as_u16(),
                serde_json::from_slice(&answer.body).unwrap_or(Value::Null),
            );
        }
        let response = self
            .http
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A write through a gateway: status, cell that answered, replayed?, body.
    async fn post(
        &self,
        gateway: usize,
        path: &str,
        key: &str,
        body: Value,
    ) -> (u16, String, bool, Value) {
        let url = format!("{}{path}", self.gateway(gateway));
        let response = self
            .http
            .post(&url)
            .header("idempotency-key", key)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        answer_of(response).await
    }

    /// The sandbox's secret for calls between bank instances.
    fn secret(&self) -> Vec<u8> {
        std::fs::read(self.state.path().join("bank-secret")).expect("the sandbox's bank-secret")
    }

    /// An internal call straight to a bank instance, signed with `secret`
    /// as instances sign them (docs/bank.md): status, cell, replayed?, body.
    async fn internal(
        &self,
        address: &str,
        path: &str,
        body: &Value,
        secret: &[u8],
    ) -> (u16, String, bool, Value) {
        let body = serde_json::to_vec(body).expect("json");
        let response = self
            .http
            .post(format!("http://{address}{path}"))
            .header("x-bank-signature", signature(secret, path, &body))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        answer_of(response).await
    }

    async fn balance(&self, user: u64) -> i64 {
        let (status, body) = self
            .get(&format!("{}/accounts/{user}", self.gateway(2)))
            .await;
        assert_eq!(status, 200, "balance of {user}: {body}");
        body["balance"].as_i64().expect("balance")
    }

    /// The instances an agent reports.
    pub(crate) async fn instances(&self, zone: &str) -> Vec<Value> {
        let url = format!(
            "{}/instances",
            self.up["agents"][zone].as_str().expect("agent")
        );
        match self.get(&url).await {
            (200, Value::Array(list)) => list,
            other => panic!("{url}: {other:?}"),
        }
    }

    async fn instance_address(&self, zone: &str) -> String {
        self.instances(zone).await[0]["address"]
            .as_str()
            .expect("address")
            .to_owned()
    }

    /// Every pid of the sandbox: children and bank instances.
    async fn pids(&self) -> Vec<(String, i32)> {
        let mut pids: Vec<(String, i32)> = self.up["processes"]
            .as_object()
            .expect("processes")
            .iter()
            .map(|(name, pid)| (name.clone(), pid.as_i64().expect("pid") as i32))
            .collect();
        for zone in ["hz-a", "hz-b", "sh-a"] {
            for instance in self.instances(zone).await {
                if let Some(pid) = instance["process"]
                    .as_str()
                    .and_then(|p| p.strip_prefix("pid "))
                {
                    pids.push((
                        instance["name"].as_str().unwrap_or("").to_owned(),
                        pid.parse().expect("pid"),
                    ));
                }
            }
        }
        pids
    }

    /// Ctrl-C, and the exit status.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "atoll up did not stop within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A bank answer: status, the cell that answered, replayed?, body.
async fn answer_of(response: reqwest::Response) -> (u16, String, bool, Value) {
    let status = response.status().as_u16();
    let cell = response
        .headers()
        .get("x-bank-cell")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let replayed = response.headers().contains_key("idempotent-replayed");
    (
        status,
        cell,
        replayed,
        response.json().await.unwrap_or(Value::Null),
    )
}

/// `x-bank-signature` for a POST of `body` to `path`, made now.
fn signature(secret: &[u8], path: &str, body: &[u8]) -> String {
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.trim_ascii());
    let mut message = format!("{time}\nPOST\n{path}\n").into_bytes();
    message.extend_from_slice(body);
    let tag = ring::hmac::sign(&key, &message);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={time},v1={hex}")
}

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie still "exists" until reaped, so
    // also look at its state.
    let exists = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    exists && !zombie
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_serves_users_in_their_cells_heals_and_stops_cleanly() {
    let mut sandbox = Sandbox::start();
    let ready = sandbox.up["readySeconds"].as_f64().expect("readySeconds");
    assert!(
        ready < 30.0,
        "ready {ready:.1} s after the build; the promise is 30 s"
    );

    // Every component is ready.
    let (status, _) = sandbox.get(&format!("{}/readyz", sandbox.control())).await;
    assert_eq!(status, 200, "control plane ready");
    for zone in ["hz-a", "hz-b", "sh-a"] {
        let admin = sandbox.up["gatewayAdmins"][zone]
            .as_str()
            .expect("admin")
            .to_owned();
        assert_eq!(
            sandbox.get(&format!("{admin}/readyz")).await.0,
            200,
            "gateway {zone} ready"
        );
        let agent = sandbox.up["agents"][zone]
            .as_str()
            .expect("agent")
            .to_owned();
        assert_eq!(
            sandbox.get(&format!("{agent}/healthz")).await.0,
            200,
            "agent {zone} ready"
        );
        let instances = sandbox.instances(zone).await;
        assert_eq!(
            instances.len(),
            2,
            "two bank instances in {zone}: {instances:?}"
        );
        assert!(
            instances.iter().all(|i| i["ready"] == json!(true)),
            "{instances:?}"
        );
    }
    let (_, cells) = sandbox
        .get(&format!("{}/v1/resources/cells", sandbox.control()))
        .await;
    for cell in cells["items"].as_array().expect("cells") {
        assert_eq!(cell["status"]["health"], json!("Healthy"), "{cell}");
    }
    assert_every_cell_healthy(&sandbox);

    // 1,000 users, each served by the cell that owns it, whichever gateway
    // the request enters.
    let users: Vec<u64> = (1000..2000).collect();
    for chunk in users.chunks(50) {
        let mut calls = Vec::new();
        for user in chunk {
            let sandbox = &sandbox;
            calls.push(async move {
                let (status, cell, _, body) = sandbox
                    .post(
                        *user as usize,
                        &format!("/accounts/{user}/deposit"),
                        &format!("open-{user}"),
                        json!({"amount": 10}),
                    )
                    .await;
                (*user, status, cell, body)
            });
        }
        for (user, status, cell, body) in futures::future::join_all(calls).await {
            assert_eq!(status, 200, "deposit for {user}: {body}");
            assert_eq!(
                cell,
                owner(user),
                "user {user} served by {cell}, owned by {}",
                owner(user)
            );
        }
    }

    // A cross-cell transfer, retried by the client through another gateway,
    // debits once and credits once.
    let (payer, payee) = (1001, 1070);
    assert_eq!((owner(payer), owner(payee)), ("rz01", "rz03"));
    let transfer = json!({"to": payee.to_string(), "amount": 7});
    let first = sandbox
        .post(
            0,
            &format!("/accounts/{payer}/transfer"),
            "transfer-1",
            transfer.clone(),
        )
        .await;
    assert_eq!(first.0, 200, "{:?}", first.3);
    assert!(!first.2, "the first try is not a replay");
    assert_eq!(
        first.3["delivered"],
        json!(false),
        "cross-cell: the credit is delivered later"
    );
    let retry = sandbox
        .post(
            2,
            &format!("/accounts/{payer}/transfer"),
            "transfer-1",
            transfer.clone(),
        )
        .await;
    assert_eq!(
        (retry.0, retry.2),
        (200, true),
        "the retry replays: {:?}",
        retry.3
    );
    assert_eq!(retry.3, first.3, "the retry gets the first answer");
    let deadline = Instant::now() + Duration::from_secs(15);
    while sandbox.balance(payee).await != 17 {
        assert!(
            Instant::now() < deadline,
            "the credit did not arrive in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A duplicate delivery of the credit (the outbox is at-least-once),
    // signed as an instance of the payer's cell signs it, applies nothing.
    let credit = json!({"payee": payee.to_string(), "amount": 7, "transfer": "1001/transfer-1", "from": "rz01"});
    let duplicate = sandbox
        .internal(
            &sandbox.instance_address("sh-a").await,
            "/internal/credits",
            &credit,
            &sandbox.secret(),
        )
        .await;
    assert_eq!((duplicate.0, duplicate.2), (200, true), "{:?}", duplicate.3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sandbox.balance(payer).await, 3, "debited once");
    assert_eq!(sandbox.balance(payee).await, 17, "credited once");
    // Another user's client picking the same key is another transfer: keys
    // are per user, and so are the credits they cause.
    let other = sandbox
        .post(
            1,
            "/accounts/1040/transfer",
            "transfer-1",
            json!({"to": "1075", "amount": 5}),
        )
        .await;
    assert_eq!((other.0, other.2), (200, false), "{:?}", other.3);
    let deadline = Instant::now() + Duration::from_secs(15);
    while sandbox.balance(1075).await != 15 {
        assert!(
            Instant::now() < deadline,
            "the second credit did not arrive in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Credit keys are reserved for credits.
    let forged = sandbox
        .post(
            0,
            "/accounts/1001/deposit",
            "transfer/9/x",
            json!({"amount": 5}),
        )
        .await;
    assert_eq!(forged.0, 400, "{:?}", forged.3);
    // A write to a cell that does not own the user is refused, even sent
    // straight to an instance.
    let rz01 = sandbox.instance_address("hz-a").await;
    let misdirected = sandbox
        .http
        .post(format!("http://{rz01}/accounts/1070/deposit"))
        .header("idempotency-key", "misdirected")
        .json(&json!({"amount": 1}))
        .send()
        .await
        .expect("post");
    assert_eq!(misdirected.status().as_u16(), 421);
    let refusal: Value = misdirected.json().await.expect("json");
    assert_eq!(refusal["error"], json!("notOwner"), "{refusal}");

    // Replication: every standby catches up, and the positions say so.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut totals: BTreeMap<String, Value> = BTreeMap::new();
    for zone in ["hz-a", "hz-b", "sh-a"] {
        let address = sandbox.instance_address(zone).await;
        loop {
            let (status, positions) = sandbox
                .get(&format!("http://{address}/internal/replication/positions"))
                .await;
            assert_eq!(status, 200, "{positions}");
            let shards = positions["shards"].as_array().expect("shards");
            assert_eq!(
                shards.len(),
                33 + usize::from(zone == "hz-a"),
                "{positions}"
            );
            let written: i64 = shards
                .iter()
                .map(|s| s["written"].as_i64().expect("written"))
                .max()
                .unwrap_or(0);
            assert!(written > 0, "{zone} wrote: {positions}");
            if shards.iter().all(|s| s["caughtUp"] == json!(true)) {
                for shard in shards {
                    assert!(
                        shard["acknowledged"].as_i64() >= shard["written"].as_i64(),
                        "{shard}"
                    );
                }
                assert!(positions["position"].as_i64().expect("position") >= written);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{zone} did not catch up: {positions}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Once all have caught up (no writes since), each standby holds
    // exactly what its source holds.
    for zone in ["hz-a", "hz-b", "sh-a"] {
        let address = sandbox.instance_address(zone).await;
        let (_, body) = sandbox.get(&format!("http://{address}/totals")).await;
        totals.insert(body["cell"].as_str().expect("cell").to_owned(), body);
    }
    for (source, standby) in [("rz01", "rz02"), ("rz02", "rz03"), ("rz03", "rz01")] {
        assert_eq!(
            totals[standby]["replicas"][source], totals[source]["balances"],
            "the replica of {source} in {standby}: {totals:?}"
        );
        let applied = sandbox
            .get(&format!(
                "http://{}/internal/replication/positions",
                sandbox
                    .instance_address(match standby {
                        "rz01" => "hz-a",
                        "rz02" => "hz-b",
                        _ => "sh-a",
                    })
                    .await
            ))
            .await
            .1;
        assert_eq!(
            applied["applied"][source], totals[source]["position"],
            "{standby} applied all of {source}: {applied}"
        );
    }

    // A killed instance: the agent restarts it, and traffic for its cell
    // keeps flowing through the other instance meanwhile.
    let before = sandbox.instances("hz-b").await;
    let victim = before
        .iter()
        .find(|i| i["name"] == json!("bank-rz02-0"))
        .expect("bank-rz02-0")
        .clone();
    let pid: i32 = victim["process"]
        .as_str()
        .and_then(|p| p.strip_prefix("pid "))
        .expect("pid")
        .parse()
        .expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let started = Instant::now();
    let (mut served, mut failed) = (0, Vec::new());
    let mut restarted = None;
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(20) {
        n += 1;
        let user = 1034 + (n % 33);
        let (status, body) = sandbox
            .get(&format!("{}/accounts/{user}", sandbox.gateway(n as usize)))
            .await;
        if status == 200 {
            served += 1;
        } else {
            failed.push((status, body));
        }
        let write = sandbox
            .post(
                n as usize,
                &format!("/accounts/{user}/deposit"),
                &format!("during-kill-{n}"),
                json!({"amount": 1}),
            )
            .await;
        if write.0 == 200 {
            served += 1;
        } else {
            // A client retries a write with the same key.
            let again = sandbox
                .post(
                    n as usize + 1,
                    &format!("/accounts/{user}/deposit"),
                    &format!("during-kill-{n}"),
                    json!({"amount": 1}),
                )
                .await;
            assert_eq!(again.0, 200, "a retried write succeeds: {:?}", again.3);
        }
        if restarted.is_none() {
            let now = sandbox.instances("hz-b").await;
            let instance = now
                .iter()
                .find(|i| i["name"] == json!("bank-rz02-0"))
                .expect("still supervised");
            if instance["restarts"] == json!(1) && instance["ready"] == json!(true) {
                assert_ne!(instance["process"], victim["process"], "a new process");
                assert!(
                    instance["lastExit"]
                        .as_str()
                        .is_some_and(|e| e.contains("SIGKILL")),
                    "{instance}"
                );
                restarted = Some(started.elapsed());
            }
        } else if started.elapsed() > restarted.unwrap_or_default() + Duration::from_secs(1) {
            break;
        }
    }
    let restarted = restarted.expect("the agent restarted the killed instance within 20 s");
    assert!(
        restarted < Duration::from_secs(10),
        "restarted after {restarted:?}"
    );
    assert!(
        failed.is_empty(),
        "reads failed while an instance was down ({served} served): {failed:?}"
    );

    // An agent killed outright: its instances die with it (nothing outlives
    // its supervisor), and the control plane marks its cell unhealthy.
    let pids = sandbox.pids().await;
    assert_eq!(
        pids.len(),
        7 + 6,
        "control, 3 agents, 3 gateways, 6 bank instances: {pids:?}"
    );
    for (name, pid) in &pids {
        assert!(alive(*pid), "{name} ({pid}) runs before Ctrl-C");
    }
    let agent = pids
        .iter()
        .find(|(name, _)| name == "agent sh-a")
        .expect("agent sh-a")
        .1;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, cell) = sandbox
            .get(&format!("{}/v1/resources/cells/rz03", sandbox.control()))
            .await;
        if cell["status"]["health"] == json!("Unhealthy") {
            assert!(
                cell["status"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("agent of zone sh-a")),
                "{cell}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rz03 still healthy 20 s after its agent died: {cell}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids
        .iter()
        .any(|(name, pid)| name.starts_with("bank-rz03") && alive(*pid))
    {
        assert!(
            Instant::now() < deadline,
            "rz03's instances outlived their agent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, healthy) = sandbox
        .get(&format!("{}/v1/resources/cells/rz01", sandbox.control()))
        .await;
    assert_eq!(
        healthy["status"]["health"],
        json!("Healthy"),
        "the other cells are unaffected: {healthy}"
    );

    // Ctrl-C stops everything else, and nothing is left behind.
    let status = sandbox.interrupt();
    assert!(
        status.success(),
        "atoll up exits 0 after Ctrl-C: {status}\n{}",
        sandbox.log()
    );
    let left: Vec<_> = pids.iter().filter(|(_, pid)| alive(*pid)).collect();
    assert!(left.is_empty(), "processes left after Ctrl-C: {left:?}");
    let log = sandbox.log();
    assert!(log.contains("stopped."), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_is_conserved_over_a_sixty_second_mixed_workload() {
    let sandbox = Sandbox::start();
    let history = sandbox.state.path().join("history.jsonl");
    let output = sandbox
        .cli_async()
        .args([
            "load",
            "--duration",
            "60s",
            "--concurrency",
            "8",
            "--users",
            "600",
            "-o",
            "json",
            "--history",
        ])
        .arg(&history)
        .output()
        .await
        .expect("atoll load");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "summary is JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert!(
        output.status.success(),
        "atoll load failed: {summary}\n{stderr}\nbank logs:\n{}",
        sandbox.bank_logs()
    );
    assert_eq!(summary["money"]["conserved"], json!(true), "{summary}");
    assert_eq!(summary["failed"], json!(0), "{summary}");
    assert!(
        summary["seconds"].as_f64().expect("seconds") >= 60.0,
        "{summary}"
    );
    assert!(
        summary["requests"].as_u64().expect("requests") > 1000,
        "{summary}"
    );
    for cell in ["rz01", "rz02", "rz03"] {
        assert!(
            summary["byCell"][cell].as_u64().unwrap_or(0) > 100,
            "{cell} served: {summary}"
        );
    }
    assert!(
        summary["crossCellTransfers"].as_u64().unwrap_or(0) > 10,
        "{summary}"
    );
    assert!(
        summary["deposits"].as_i64().unwrap_or(0) > 0
            && summary["withdrawals"].as_i64().unwrap_or(0) > 0,
        "{summary}"
    );
    assert!(stderr.contains("req/s"), "live progress: {stderr}");
    // Every outbox drained, and the totals of all cells add up.
    let mut balances = 0;
    for zone in ["hz-a", "hz-b", "sh-a"] {
        let address = sandbox.instance_address(zone).await;
        let (_, totals) = sandbox.get(&format!("http://{address}/totals")).await;
        assert_eq!(totals["inFlight"], json!(0), "{totals}");
        balances += totals["balances"].as_i64().expect("balances");
    }
    assert_eq!(
        balances,
        summary["money"]["after"].as_i64().expect("after"),
        "{summary}"
    );

    // The zero-loss checker: every acknowledged write still there at
    // settle, none applied twice, every balance explained.
    let check = &summary["check"];
    assert_eq!(check["clean"], json!(true), "{check:#}");
    assert_eq!(check["money"]["conserved"], json!(true), "{check}");
    assert_eq!(check["counts"]["users"], json!(600), "{check}");
    let recorded = atoll_check::History::read_file(&history).expect("the history parses");
    let start = recorded.start.as_ref().expect("start event");
    assert_eq!(start.balances.len(), 600);
    let operations: u64 = summary["byKind"]
        .as_object()
        .expect("byKind")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(recorded.operations.len() as u64, operations, "{summary}");
    for kind in [
        atoll_check::Kind::Deposit,
        atoll_check::Kind::Withdraw,
        atoll_check::Kind::Transfer,
        atoll_check::Kind::Read,
    ] {
        assert!(
            recorded.operations.iter().any(|op| op.kind == kind),
            "no {kind:?} in the history"
        );
    }
    let writes = recorded
        .operations
        .iter()
        .filter(|op| op.is_write())
        .count();
    assert_eq!(recorded.settles.len(), writes, "every write settled");
    assert!(
        recorded.settles.iter().all(|s| s.answer().is_some()),
        "every settle got a definite answer"
    );
    assert_eq!(
        check["counts"]["settleReplayed"].as_u64().unwrap_or(0)
            + check["counts"]["settleFresh"].as_u64().unwrap_or(0),
        writes as u64,
        "{check}"
    );
    let state = recorded.final_state.as_ref().expect("final event");
    assert!(state.drained, "{:?}", state.in_flight);
    assert_eq!(
        state.balances.values().sum::<i64>(),
        summary["money"]["after"].as_i64().expect("after")
    );
    // `atoll check` on the file agrees, and exits 0.
    let checked = Command::new(ATOLL)
        .arg("check")
        .arg(&history)
        .output()
        .expect("atoll check");
    let report = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{report}");
    assert!(report.starts_with("atoll check: clean"), "{report}");
    eprintln!("{stderr}\n{report}");
    let json_report = Command::new(ATOLL)
        .args(["check", "-o", "json"])
        .arg(&history)
        .output()
        .expect("atoll check -o json");
    let json_report: Value = serde_json::from_slice(&json_report.stdout).expect("JSON report");
    assert_eq!(json_report["counts"], check["counts"]);
}

/// Issue 9, "Money and internal endpoints": no client can credit an
/// account, write into a standby's copy, or have a transfer body or user id
/// read two ways; only a call signed by an instance of the sandbox counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_no_client_mints_money_forges_a_shipment_or_opens_a_second_account() {
    let sandbox = Sandbox::start();
    let rz03 = sandbox.instance_address("sh-a").await;
    let rz02 = sandbox.instance_address("hz-b").await;
    assert_eq!(sandbox.balance(1099).await, 0);

    // Through any gateway: the credit is not a public operation, and no
    // public route leads to /internal/, however the path is spelled.
    for key in ["transfer/evil-1", "evil-1"] {
        let minted = sandbox
            .post(
                0,
                "/accounts/1099/credit",
                key,
                json!({"amount": 1_000_000}),
            )
            .await;
        assert_eq!(minted.0, 404, "{minted:?}");
        assert_eq!(minted.3["error"], json!("unknownOperation"), "{minted:?}");
        assert!(
            !minted.3["message"]
                .as_str()
                .unwrap_or("")
                .contains("transfer/"),
            "the refusal does not hint at a key: {minted:?}"
        );
    }
    let credit =
        json!({"payee": "1099", "amount": 1_000_000, "transfer": "1001/evil-2", "from": "rz01"});
    for path in [
        "/internal/credits",
        "/accounts/../internal/credits",
        "/accounts/%2e%2e/internal/credits",
        "/accounts/1099/..%2F..%2Finternal/credits",
    ] {
        let through = sandbox.post(1, path, "evil-3", credit.clone()).await;
        assert!(
            matches!(through.0, 400 | 404),
            "{path} through a gateway: {through:?}"
        );
        assert!(!through.2, "{path}: nothing applied");
    }

    // Straight to an instance: unsigned, signed with another secret, or a
    // signature of another body: 401, nothing applied.
    let forged = sandbox
        .http
        .post(format!("http://{rz03}/internal/credits"))
        .json(&credit)
        .send()
        .await
        .expect("post");
    assert_eq!(forged.status().as_u16(), 401);
    let refusal: Value = forged.json().await.expect("json");
    assert_eq!(refusal["error"], json!("unauthenticated"), "{refusal}");
    let wrong = sandbox
        .internal(
            &rz03,
            "/internal/credits",
            &credit,
            b"not-the-sandbox-secret-at-all",
        )
        .await;
    assert_eq!(wrong.0, 401, "{wrong:?}");
    let small = serde_json::to_vec(
        &json!({"payee": "1099", "amount": 1, "transfer": "1001/evil-4", "from": "rz01"}),
    )
    .expect("json");
    let stolen = signature(&sandbox.secret(), "/internal/credits", &small);
    let altered = sandbox
        .http
        .post(format!("http://{rz03}/internal/credits"))
        .header("x-bank-signature", stolen)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&credit).expect("json"))
        .send()
        .await
        .expect("post");
    assert_eq!(
        altered.status().as_u16(),
        401,
        "a signature covers its body"
    );
    assert_eq!(sandbox.balance(1099).await, 0, "no money was minted");

    // A forged replication shipment never reaches the standby's copy.
    let (_, before) = sandbox.get(&format!("http://{rz02}/totals")).await;
    let shipment = json!({
        "source": "rz01", "epoch": 99, "shards": {"1": 0}, "upTo": 1_000_000_000,
        "entries": [{"position": 1_000_000_000, "shard": 1, "change": {"kind": "balance", "user": "1001", "balance": 1_000_000}}],
    });
    let forged = sandbox
        .http
        .post(format!("http://{rz02}/internal/replication/apply"))
        .json(&shipment)
        .send()
        .await
        .expect("post");
    assert_eq!(forged.status().as_u16(), 401);
    let wrong = sandbox
        .internal(
            &rz02,
            "/internal/replication/apply",
            &shipment,
            b"not-the-sandbox-secret-at-all",
        )
        .await;
    assert_eq!(wrong.0, 401, "{wrong:?}");
    let (_, after) = sandbox.get(&format!("http://{rz02}/totals")).await;
    assert_eq!(
        before["replicas"], after["replicas"],
        "the standby's copy is untouched"
    );

    // Header limits agree: what the gateway accepts, the bank accepts.
    for (count, status) in [(100, 200), (101, 431)] {
        let mut request = sandbox
            .http
            .get(format!("{}/accounts/1001", sandbox.gateway(0)));
        // reqwest adds accept and host: `count` headers in all.
        for i in 0..count - 2 {
            request = request.header(format!("x-extra-{i}"), "1");
        }
        let response = request.send().await.expect("get");
        assert_eq!(response.status().as_u16(), status, "{count} headers");
        if status == 431 {
            let body: Value = response
                .json()
                .await
                .expect("a JSON refusal, from the gateway");
            assert_eq!(body["error"], "headersTooLarge", "{body}");
        }
    }

    // Bodies are objects with known fields, each once.
    let deposit = sandbox
        .post(0, "/accounts/1001/deposit", "dep-1", json!({"amount": 100}))
        .await;
    assert_eq!(deposit.0, 200, "{deposit:?}");
    for (n, body) in [
        r#"[7,"1206"]"#,
        r#"{"amount": 7, "to": "1206", "memo": "x"}"#,
        r#"{"amount": 7, "amount": 70, "to": "1206"}"#,
        r#"{"amount": 7.5, "to": "1206"}"#,
        r#""7""#,
    ]
    .into_iter()
    .enumerate()
    {
        let response = sandbox
            .http
            .post(format!("{}/accounts/1001/transfer", sandbox.gateway(0)))
            .header("idempotency-key", format!("body-{n}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("post");
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (status, answer["error"].clone()),
            (400, json!("badBody")),
            "{body}: {answer}"
        );
    }
    assert_eq!(sandbox.balance(1001).await, 100, "no transfer applied");

    // A user id has one form: `01205` is user 1205; signs and spaces are
    // not user ids; a payee is read the same way.
    let padded = sandbox
        .post(0, "/accounts/01205/deposit", "pad-1", json!({"amount": 10}))
        .await;
    assert_eq!(padded.0, 200, "{padded:?}");
    assert_eq!(padded.3["user"], json!("1205"), "{padded:?}");
    assert_eq!(sandbox.balance(1205).await, 10, "the same account");
    let (status, body) = sandbox
        .get(&format!("{}/accounts/001205", sandbox.gateway(1)))
        .await;
    assert_eq!(
        (status, body["user"].clone(), body["balance"].clone()),
        (200, json!("1205"), json!(10))
    );
    for user in ["-1080", "+1080", "1080%20", "10x80"] {
        let response = sandbox
            .post(
                0,
                &format!("/accounts/{user}/deposit"),
                "sign-1",
                json!({"amount": 1}),
            )
            .await;
        assert!(
            response.0 == 400
                && matches!(response.3["error"].as_str(), Some("badUser" | "invalidKey")),
            "{user}: {response:?}"
        );
    }
    let to_padded = sandbox
        .post(
            0,
            "/accounts/1001/transfer",
            "pad-2",
            json!({"to": "001205", "amount": 5}),
        )
        .await;
    assert_eq!(to_padded.0, 200, "{to_padded:?}");
    assert_eq!(to_padded.3["to"], json!("1205"), "{to_padded:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while sandbox.balance(1205).await != 15 {
        assert!(
            Instant::now() < deadline,
            "the credit to 1205 did not arrive:\n{}",
            sandbox.bank_logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `atoll` run as a user at a shell would: the state directory `home`, no
/// `--control`, no `--state-dir`.
fn as_user(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(ATOLL)
        .args(args)
        .env("ATOLL_STATE_DIR", home)
        .env_remove("ATOLL_CONTROL")
        .output()
        .expect("run atoll")
}

/// Issue 9, "A first-time user": a drill finds the running sandbox by
/// itself, shows its progress, keeps its history in the sandbox's state
/// directory, and puts the map back with --restore (or says how); a second
/// control plane started by hand makes commands ask which one, not
/// silently talk to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_a_first_time_user_drills_without_flags_and_is_never_silently_redirected() {
    let home = tempfile::tempdir().expect("home");
    let sandbox = Sandbox::start_with_home(home.path());
    let drill = tokio::task::spawn_blocking({
        let home = home.path().to_owned();
        move || {
            as_user(
                &home,
                &[
                    "drill",
                    "switchover",
                    "--shards",
                    "0-49",
                    "--rate",
                    "100",
                    "--duration",
                    "8s",
                    "--start-after",
                    "2s",
                    "--restore",
                    "-o",
                    "json",
                ],
            )
        }
    })
    .await
    .expect("drill");
    let stderr = String::from_utf8_lossy(&drill.stderr).into_owned();
    let report: Value = serde_json::from_slice(&drill.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&drill.stdout)));
    assert!(drill.status.success(), "{report}\n{stderr}");
    // Live progress: the phase, req/s and errors, while it runs.
    assert!(
        stderr.contains("req/s") && stderr.contains("errors"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warming up") && stderr.contains("switchover"),
        "{stderr}"
    );
    assert!(
        stderr.contains("0-33 rz01 -> rz02, 34-49 rz02 -> rz03"),
        "the moves, named: {stderr}"
    );
    // Its files are the sandbox's.
    let history = report["history"].as_str().expect("history");
    assert!(
        history.starts_with(&format!("{}/drills/", sandbox.state.path().display())),
        "{history}"
    );
    assert!(std::path::Path::new(history).is_file(), "{history}");
    // It says how to put the map back, and did: two ranges, two
    // switchovers one after the other (in the same second, too).
    assert_eq!(
        report["restoreCommands"],
        json!([
            "atoll switchover start --shards 0-33 --to rz01",
            "atoll switchover start --shards 34-49 --to rz02"
        ]),
        "{report}"
    );
    assert_eq!(report["restored"], "completed", "{report}");
    let (_, map) = sandbox
        .get(&format!(
            "{}/v1/resources/shardmaps/users",
            sandbox.control()
        ))
        .await;
    assert_eq!(
        map["spec"]["assignments"],
        json!([
            {"shards": "0-33", "cell": "rz01", "standby": "rz02"},
            {"shards": "34-66", "cell": "rz02", "standby": "rz03"},
            {"shards": "67-99", "cell": "rz03", "standby": "rz01"},
        ]),
        "the map as it was before the drill: {map}"
    );

    // Found without flags...
    let found = as_user(home.path(), &["get", "cells"]);
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    // ...until a second control plane runs: then commands ask which.
    let data = tempfile::tempdir().expect("data");
    let mut second = Command::new(ATOLL)
        .args([
            "control",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data.path())
        .env("ATOLL_STATE_DIR", home.path())
        .env_remove("ATOLL_CONTROL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("second control plane");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !home.path().join("control.json").exists() {
        assert!(
            Instant::now() < deadline,
            "the second control plane did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ambiguous = as_user(home.path(), &["get", "cells"]);
    let stderr = String::from_utf8_lossy(&ambiguous.stderr);
    assert_eq!(ambiguous.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("2 control planes are running")
            && stderr.contains(&sandbox.control())
            && stderr.contains("--control"),
        "{stderr}"
    );
    let chosen = as_user(
        home.path(),
        &["--control", &sandbox.control(), "get", "cells"],
    );
    assert!(chosen.status.success());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = second.wait();
    let again = as_user(home.path(), &["get", "cells"]);
    assert!(
        again.status.success(),
        "one again: {}",
        String::from_utf8_lossy(&again.stderr)
    );
}

/// `atoll get cells` shows the sandbox's three cells healthy.
fn assert_every_cell_healthy(sandbox: &Sandbox) {
    let table = sandbox
        .cli()
        .args(["get", "cells"])
        .output()
        .expect("atoll get cells");
    let table = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.matches("Healthy").count(), 3, "{table}");
}

/// The node's config stream connected once in the whole run.
fn assert_connected_once(sandbox: &Sandbox, node: &str) {
    let connected = lines_with(
        sandbox,
        "control.log",
        &["node connected", &format!("node={node} ")],
    );
    assert_eq!(
        connected, 1,
        "{node}'s config stream connected {connected} times"
    );
}

/// How many lines of a sandbox log contain every one of `words`.
fn lines_with(sandbox: &Sandbox, log: &str, words: &[&str]) -> usize {
    std::fs::read_to_string(sandbox.state.path().join("logs").join(log))
        .unwrap_or_default()
        .lines()
        .filter(|line| words.iter().all(|w| line.contains(w)))
        .count()
}

/// Issue 11, "Certificate rotation under load": with 4-second certificates
/// a gateway and an agent renew theirs 20 times and more during a 60 s
/// `atoll load` run (the bank's instances theirs too, from their agent),
/// and no request fails and no config stream drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renewed_twenty_times_under_load_fail_no_request_and_drop_no_stream() {
    let sandbox = Sandbox::start_with(&["--node-cert-lifetime", "4s"]);
    let output = sandbox
        .cli_async()
        .args([
            "load",
            "--duration",
            "60s",
            "--concurrency",
            "4",
            "--users",
            "200",
            "-o",
            "json",
        ])
        .env_remove("ATOLL_CONTROL")
        .output()
        .await
        .expect("atoll load");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("summary is JSON ({e}): {stderr}"));
    assert!(output.status.success(), "{summary}\n{stderr}");
    assert_eq!(summary["failed"], json!(0), "{summary}");
    assert!(
        summary["requests"].as_u64().expect("requests") > 1000,
        "{summary}"
    );
    for (log, node) in [
        ("gateway-hz-a.log", "gw-hz-a"),
        ("agent-hz-a.log", "agent-hz-a"),
    ] {
        let renewed = lines_with(&sandbox, log, &["renewed the certificate"]);
        eprintln!("{node}: renewed {renewed} times in {}", summary["seconds"]);
        assert!(renewed >= 20, "{node} renewed {renewed} times");
        assert_connected_once(&sandbox, node);
    }
    // The agent renewed its instances' certificates as well, and they kept
    // their streams too.
    let issued = lines_with(&sandbox, "agent-hz-a.log", &["instance certificate issued"]);
    eprintln!(
        "hz-a instance certificates issued: {issued}; {} requests, {} failed",
        summary["requests"], summary["failed"]
    );
    assert!(
        issued >= 20,
        "instance certificates issued in hz-a: {issued}"
    );
    assert_connected_once(&sandbox, "bank-rz01-0");
}

/// One HTTP/1.1 GET over TLS to `address`, presenting the certificate of
/// `cert` (none: no certificate) and accepting any server of the sandbox's
/// CA: the answer's head and body, or why the connection failed.
async fn peer_get(
    sandbox: &Sandbox,
    address: &str,
    cert: Option<&str>,
    path: &str,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pki = sandbox.state.path().join("pki");
    let trust = atoll_transport::Trust::from_file(&pki.join("root.pem")).expect("root");
    let identity = cert.map(|name| {
        atoll_transport::Identity::from_files(
            &pki.join(format!("{name}.pem")),
            &pki.join(format!("{name}.key")),
        )
        .expect("identity")
    });
    let tls = atoll_transport::ClientTls::new(&trust, identity.as_ref()).expect("tls");
    let config = tls.peer_config(std::sync::Arc::new(|_| Ok(())));
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: bank\r\nx-atoll-hop: 1\r\nconnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if answer.is_empty() {
        return Err("closed without an answer".into());
    }
    Ok(answer)
}

/// A counter of a gateway's admin `/metrics`, summed over its labels.
async fn gateway_counter(sandbox: &Sandbox, zone: &str, name: &str) -> f64 {
    let url = format!(
        "{}/metrics",
        sandbox.up["gatewayAdmins"][zone].as_str().expect("admin")
    );
    let text = reqwest::get(&url)
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Issue 11, "gateway-to-gateway forwarding is mTLS": in the secure
/// sandbox a request entering the gateway of another zone is forwarded to
/// the owning zone's gateway on its peer listener, over mutual TLS; that
/// listener serves a gateway's certificate and refuses a client without a
/// certificate and an agent's certificate (counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_forward_to_each_other_over_mutual_tls_only() {
    let sandbox = Sandbox::start();
    let gateway: Value = sandbox
        .control_client()
        .get("/v1/resources/gateways/gw-hz-a")
        .await
        .expect("Gateway gw-hz-a");
    let peer = gateway["spec"]["advertise"]
        .as_str()
        .expect("advertise")
        .to_owned();
    assert_eq!(
        gateway["spec"]["peer"]["port"].as_u64(),
        peer.rsplit(':').next().and_then(|p| p.parse().ok()),
        "{gateway}"
    );
    // User 1001 lives in rz01 (hz-a); it enters through hz-b's gateway.
    let before = gateway_counter(&sandbox, "hz-b", "atoll_gateway_misroutes_total").await;
    for i in 0..5 {
        let (status, cell, _, body) = sandbox
            .post(
                1,
                "/accounts/1001/deposit",
                &format!("peer-{i}"),
                json!({"amount": 1}),
            )
            .await;
        assert_eq!((status, cell.as_str()), (200, "rz01"), "{body}");
    }
    let after = gateway_counter(&sandbox, "hz-b", "atoll_gateway_misroutes_total").await;
    assert!(after >= before + 5.0, "forwarded: {before} -> {after}");

    // The peer listener serves a gateway of the sandbox ...
    let answer = peer_get(&sandbox, &peer, Some("gateway-gw-hz-b"), "/accounts/1001")
        .await
        .expect("a gateway is served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_lowercase().contains("x-bank-cell: rz01"),
        "{answer}"
    );
    // ... and no one else: no certificate, or an agent's.
    let refused = gateway_counter(
        &sandbox,
        "hz-a",
        "atoll_gateway_peer_connections_refused_total",
    )
    .await;
    let error = peer_get(&sandbox, &peer, None, "/accounts/1001")
        .await
        .expect_err("no certificate");
    eprintln!("without a certificate: {error}");
    let error = peer_get(&sandbox, &peer, Some("agent-agent-hz-a"), "/accounts/1001")
        .await
        .expect_err("an agent's certificate");
    eprintln!("with an agent's certificate: {error}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = gateway_counter(
            &sandbox,
            "hz-a",
            "atoll_gateway_peer_connections_refused_total",
        )
        .await;
        if now >= refused + 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refusals counted: {refused} -> {now}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = std::fs::read_to_string(sandbox.state.path().join("logs/gateway-hz-a.log"))
        .unwrap_or_default();
    assert!(
        log.contains("is not a gateway of workspace default"),
        "the refusal names who: {log}"
    );
}

/// The fingerprint of the intermediate that signed the chain in `path`.
fn intermediate_of(path: &std::path::Path) -> Option<String> {
    atoll_identity::intermediate_of_chain(&std::fs::read_to_string(path).ok()?)
}

/// Issue 11, "The CA's intermediate is rotated with the sandbox running;
/// nodes move to the new chain without a restart": with 24-hour
/// certificates, `atoll ca rotate` on the sandbox's CA moves a gateway, an
/// agent and an app instance to certificates of the new intermediate
/// within half a minute (each asks the control plane every 20 s which
/// intermediate it issues with, and renews at once when it changed), under load, with
/// no failed request, no process restarted and no config stream dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_move_to_a_rotated_intermediate_without_a_restart() {
    let sandbox = Sandbox::start();
    let state = sandbox.state.path();
    let pki = state.join("pki");
    let nodes = [
        pki.join("gateway-gw-hz-a.pem"),
        pki.join("agent-agent-hz-a.pem"),
        state.join("agents/hz-a/credentials/bank-rz01-0/cert.pem"),
    ];
    let old = atoll_identity::fingerprints_of_pem(
        &std::fs::read_to_string(pki.join("intermediate.pem")).expect("intermediate"),
    );
    for node in &nodes {
        assert_eq!(
            intermediate_of(node).as_ref(),
            old.first(),
            "{}",
            node.display()
        );
    }
    let pids = sandbox.pids().await;
    let load = sandbox
        .cli_async()
        .args([
            "load",
            "--duration",
            "35s",
            "--concurrency",
            "4",
            "--users",
            "200",
            "-o",
            "json",
        ])
        .env_remove("ATOLL_CONTROL")
        .output();
    let served = gateway_counter(&sandbox, "hz-a", "atoll_gateway_responses_total").await;
    let rotate_and_watch = async {
        // Rotate once the load is under way.
        let started = std::time::Instant::now();
        while gateway_counter(&sandbox, "hz-a", "atoll_gateway_responses_total").await <= served {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(15),
                "the load did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let rotated = sandbox
            .cli_async()
            .args(["ca", "rotate", "--dir", pki.to_str().unwrap()])
            .output()
            .await
            .expect("atoll ca rotate");
        assert!(
            rotated.status.success(),
            "{}",
            String::from_utf8_lossy(&rotated.stderr)
        );
        let new = atoll_identity::fingerprints_of_pem(
            &std::fs::read_to_string(pki.join("intermediate.pem")).expect("intermediate"),
        );
        assert_ne!(new, old, "a new intermediate");
        let started = std::time::Instant::now();
        let mut moved = Vec::new();
        while moved.len() < nodes.len() && started.elapsed() < std::time::Duration::from_secs(30) {
            for node in &nodes {
                if !moved.contains(node) && intermediate_of(node).as_ref() == new.first() {
                    eprintln!("{} moved after {:?}", node.display(), started.elapsed());
                    moved.push(node.clone());
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        let missing: Vec<_> = nodes.iter().filter(|n| !moved.contains(n)).collect();
        assert!(
            missing.is_empty(),
            "not moved to the new intermediate in 30 s: {missing:?}"
        );
    };
    let (output, ()) = tokio::join!(load, rotate_and_watch);
    let output = output.expect("atoll load");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("summary is JSON ({e}): {stderr}"));
    assert!(output.status.success(), "{summary}\n{stderr}");
    assert_eq!(summary["failed"], json!(0), "{summary}");
    assert_eq!(sandbox.pids().await, pids, "nothing restarted");
    for node in ["gw-hz-a", "agent-hz-a", "bank-rz01-0"] {
        assert_connected_once(&sandbox, node);
    }
    // The control plane reads the new intermediate, and what it still
    // serves with (its own certificate from the old one) keeps working.
    assert_every_cell_healthy(&sandbox);
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Issue 11, "What an adversarial run did on 2026-12-02 with no
/// credentials": against the sandbox as `atoll up` starts it, applying an
/// App (whose command an agent would run), replacing a Service's
/// endpoints, renewing a cell's lease from a made-up node and following
/// the config stream as a gateway of another zone are each refused, and
/// each refusal is in the audit chain; nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_refuses_and_audits_what_an_attacker_without_credentials_did() {
    let sandbox = Sandbox::start();
    let state = sandbox.state.path();
    // Its secrets are its own. Run as root, the bank's instances run as
    // `nobody`, who may pass through the state directory (not list it) to
    // its instance's data and credentials, and read nothing else there.
    let root = nix::unistd::geteuid().is_root();
    assert_eq!(mode(state), if root { 0o710 } else { 0o700 });
    if root {
        let bank = state.join("bin/atoll-bank");
        let mut banks = 0;
        for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
            if std::fs::read_link(entry.path().join("exe")).ok().as_deref() == Some(bank.as_path())
            {
                let status =
                    std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
                let uid = status
                    .lines()
                    .find(|l| l.starts_with("Uid:"))
                    .unwrap_or_default();
                assert_eq!(
                    uid.split_whitespace().nth(1),
                    Some("65534"),
                    "a bank instance runs as nobody: {uid}"
                );
                banks += 1;
            }
        }
        assert_eq!(banks, 6, "two bank instances per cell, all as nobody");
        let as_nobody = |args: &[&str]| {
            use std::os::unix::process::CommandExt as _;
            std::process::Command::new(args[0])
                .args(&args[1..])
                .uid(65534)
                .gid(65534)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("run as nobody")
                .success()
        };
        let at = |rest: &str| state.join(rest).display().to_string();
        assert!(
            as_nobody(&["cat", &at("bank-secret")]),
            "the bank's secret is its instances'"
        );
        assert!(
            as_nobody(&["cat", &at("agents/hz-a/credentials/bank-rz01-0/key.pem")]),
            "an instance's key is its own"
        );
        for private in [
            "admin.token",
            "pki/root.key",
            "pki/gateway-gw-hz-a.key",
            "agents/hz-a/config-cache.json",
            "up.json",
        ] {
            assert!(!as_nobody(&["cat", &at(private)]), "nobody reads {private}");
        }
        for unlisted in [
            ".",
            "agents",
            "agents/hz-a",
            "agents/hz-a/credentials",
            "control",
            "logs",
        ] {
            assert!(
                !as_nobody(&["ls", &at(unlisted)]),
                "nobody lists {unlisted}"
            );
        }
    }
    assert_eq!(mode(&state.join("admin.token")), 0o600);
    assert_eq!(mode(&state.join("pki")), 0o700);
    assert_eq!(mode(&state.join("pki/root.key")), 0o600);
    assert_eq!(mode(&state.join("pki/gateway-gw-hz-a.key")), 0o600);
    assert_eq!(
        mode(&state.join("agents/hz-a/credentials/bank-rz01-0/key.pem")),
        0o600
    );
    let (ca, _) = sandbox.credentials().expect("secure by default");
    let control = sandbox.control();
    assert!(control.starts_with("https://"), "{control}");
    let (_, before) = sandbox.get(&format!("{control}/v1/status")).await;

    // Plain HTTP is not served on the control plane's port.
    let plain = control.replacen("https://", "http://", 1);
    let answer = reqwest::Client::new()
        .get(format!("{plain}/v1/resources/cells"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        answer.as_ref().map_or(true, |r| !r.status().is_success()),
        "{answer:?}"
    );

    // Trusting the CA, but with no credential at all.
    let tls = atoll_transport::TlsFiles {
        ca: Some(ca.clone().into()),
        ..atoll_transport::TlsFiles::default()
    }
    .client()
    .expect("CA")
    .expect("TLS");
    let transport = atoll_transport::Transport::with_tls(tls);
    let anonymous = transport.rest(
        atoll_transport::ControlUrls::parse(&control).expect("url"),
        Some(Duration::from_secs(10)),
    );
    let apply = |manifest: &str| atoll_api::rest::ApplyRequest {
        manifests: vec![atoll_api::rest::ManifestFile {
            source: "attacker.yaml".into(),
            content: manifest.into(),
        }],
        ..atoll_api::rest::ApplyRequest::default()
    };
    let app = "apiVersion: atoll/v1\nkind: App\nmetadata: {name: pwn}\nspec: {service: bank, cells: [rz01], command: [/bin/sh, -c, 'id > /tmp/atoll-pwned']}\n";
    let endpoints = "apiVersion: atoll/v1\nkind: Endpoints\nmetadata: {name: bank-hz-a}\nspec: {service: bank, zone: hz-a, endpoints: [{address: '203.0.113.9:80', cell: rz01}]}\n";
    for manifest in [app, endpoints] {
        let body = serde_json::to_vec(&apply(manifest)).expect("json");
        let answer = anonymous
            .send(reqwest::Method::POST, "/v1/apply", Some(body.into()))
            .await
            .expect("an answer");
        assert_eq!(answer.status.as_u16(), 401, "{manifest}");
        let text = String::from_utf8_lossy(&answer.body);
        assert!(text.contains("token"), "says what to send: {text}");
    }

    // The config stream's service, with no certificate: a lease renewal for
    // sh-a's cell from a made-up node, and a gateway of another zone.
    let channel = transport
        .channels(atoll_transport::ChannelOptions::default())
        .connect(&control)
        .await
        .expect("channel");
    let mut client = atoll_api::config::config_stream_client::ConfigStreamClient::new(channel);
    let renewal = client
        .renew_lease(atoll_api::config::LeaseRequest {
            node: Some(atoll_api::config::NodeIdentity {
                name: "made-up".into(),
                role: "app".into(),
                zone: "sh-a".into(),
                cell: "rz03".into(),
                workspace: String::new(),
            }),
            applied_version: 1_000_000,
        })
        .await
        .expect_err("refused");
    assert_eq!(renewal.code(), tonic::Code::Unauthenticated, "{renewal:?}");
    let (hello, receiver) = tokio::sync::mpsc::channel(1);
    hello
        .send(atoll_api::config::NodeMessage {
            message: Some(atoll_api::config::node_message::Message::Hello(
                atoll_api::config::Hello {
                    node: Some(atoll_api::config::NodeIdentity {
                        name: "gw-sh-a".into(),
                        role: "gateway".into(),
                        zone: "sh-a".into(),
                        cell: String::new(),
                        workspace: String::new(),
                    }),
                    applied_version: 0,
                    problem: String::new(),
                },
            )),
        })
        .await
        .expect("hello");
    let followed = client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .expect_err("refused");
    assert_eq!(
        followed.code(),
        tonic::Code::Unauthenticated,
        "{followed:?}"
    );

    // Nothing changed, and each refusal is in the audit chain, as nobody,
    // with where it came from.
    let (_, after) = sandbox.get(&format!("{control}/v1/status")).await;
    assert_eq!(before["revision"], after["revision"], "{before} {after}");
    assert!(!std::path::Path::new("/tmp/atoll-pwned").exists());
    let refused = sandbox
        .cli()
        .args(["audit", "calls", "--refused", "-o", "json"])
        .output()
        .expect("atoll audit calls");
    assert!(
        refused.status.success(),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let entries: Value = serde_json::from_slice(&refused.stdout).expect("json");
    let seen: Vec<(String, u64, String)> = entries
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            assert!(
                e["remote"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("127.0.0.1:")),
                "{e}"
            );
            (
                e["path"].as_str().unwrap_or_default().to_owned(),
                e["status"].as_u64().unwrap_or_default(),
                e["caller"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for path in [
        "/v1/apply",
        "/atoll.config.v1.ConfigStream/RenewLease",
        "/atoll.config.v1.ConfigStream/Subscribe",
    ] {
        assert!(
            seen.iter()
                .any(|(p, status, _)| p == path && *status == 401),
            "{path} refused and recorded: {seen:?}"
        );
    }
    assert_eq!(
        seen.iter().filter(|(p, ..)| p == "/v1/apply").count(),
        2,
        "{seen:?}"
    );
    let verify = sandbox
        .cli()
        .args(["audit", "verify"])
        .output()
        .expect("atoll audit verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}
