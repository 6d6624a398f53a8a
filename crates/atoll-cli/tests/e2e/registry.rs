//! The service registry of a real `atoll control`: registrants register
//! under sessions with heartbeats, subscribers get per-instance deltas for
//! the services they call, a registrant that dies disappears within its
//! session's TTL, and what a registrant may register is checked.

use std::time::{Duration, Instant};

use atoll_api::registry::registry_client::RegistryClient;
use atoll_api::registry::{HeartbeatRequest, Instance, RegisterRequest, Registrant};
use atoll_registry::client::{Registrar, Watcher};

use crate::harness::{Control, examples};

fn registrant(role: &str, zone: &str, name: &str) -> Registrant {
    Registrant {
        name: name.into(),
        role: role.into(),
        zone: zone.into(),
        workspace: String::new(),
    }
}

fn instance(service: &str, zone: &str, cell: &str, name: &str, port: u32) -> Instance {
    Instance {
        service: service.into(),
        name: name.into(),
        zone: zone.into(),
        cell: cell.into(),
        address: "127.0.0.1".into(),
        port,
        protocol: "http".into(),
        version: "v1".into(),
        ..Instance::default()
    }
}

fn clients(control: &Control) -> (atoll_transport::Channels, atoll_transport::ControlUrls) {
    (
        atoll_transport::Transport::plain().channels(atoll_transport::ChannelOptions::default()),
        atoll_transport::ControlUrls::parse(&control.url).expect("url"),
    )
}

/// Apps whose instances sidecars and SDK processes of these tests are
/// (a sidecar registers only its App's instance). No agent runs them.
const APPS: &str = r#"
apiVersion: atoll/v1
kind: App
metadata: {name: web}
spec: {service: web, cells: [rz01, rz02], replicas: 2, command: [web]}
"#;

fn started() -> Control {
    let control = Control::start();
    control
        .atoll(&["apply", "-f", examples().to_str().expect("utf-8 path")])
        .success();
    control
        .atoll_with_stdin(&["apply", "-f", "-"], Some(APPS))
        .success();
    control
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_registered_reach_watchers_as_deltas_and_go_when_their_registrant_dies() {
    let control = started();
    let (channels, urls) = clients(&control);
    let agent = Registrar::start(
        channels.clone(),
        urls.clone(),
        registrant("agent", "hz-a", "hz-a"),
        Duration::from_secs(3),
    );
    agent.put(instance("web", "hz-a", "rz01", "web-rz01-0", 7001));
    agent.put(instance("web", "hz-a", "rz01", "web-rz01-1", 7002));
    agent
        .settled(Duration::from_secs(10))
        .await
        .expect("the agent registers");

    let watcher = Watcher::start(
        channels.clone(),
        urls.clone(),
        registrant("sidecar", "hz-b", "bank-rz02-0"),
        ["web".to_owned()],
    );
    let view = watcher
        .wait_for(Duration::from_secs(10), |v| v.instances("web").len() == 2)
        .await
        .expect("the watcher sees both instances");
    let first = view.instances("web")[0].clone();
    assert_eq!(first.region, "hz", "the registry fills the region in");
    assert_eq!(first.registered_by, "agent/hz-a/hz-a");
    assert_eq!(first.weight, 100);

    // A sidecar registers itself; it is killed (no deregistration): its
    // instance goes when its session runs out, within the TTL.
    let bytes_before_add = watcher.read(|v| v.bytes);
    let sidecar = Registrar::start(
        channels.clone(),
        urls.clone(),
        registrant("sidecar", "hz-b", "web-rz02-0"),
        Duration::from_secs(3),
    );
    let mut own = instance("web", "hz-b", "rz02", "web-rz02-0", 7003);
    own.protocol = "grpc".into();
    sidecar.put(own);
    sidecar
        .settled(Duration::from_secs(10))
        .await
        .expect("the sidecar registers");
    let view = watcher
        .wait_for(Duration::from_secs(5), |v| v.instances("web").len() == 3)
        .await
        .expect("the watcher sees the sidecar's instance");
    let before = view.bytes;
    let from_sidecar = view
        .instances("web")
        .into_iter()
        .find(|i| i.name == "web-rz02-0")
        .cloned()
        .expect("there");
    assert_eq!(from_sidecar.mode, "sidecar");
    assert_eq!(from_sidecar.protocol, "grpc");
    // One instance added cost one instance on the wire, not the service.
    let added = view.bytes - bytes_before_add;
    let one = prost::Message::encoded_len(&from_sidecar) as u64;
    assert!(
        added <= one + 40,
        "adding one instance ({one} bytes) sent {added}"
    );

    drop(sidecar);
    let killed = Instant::now();
    watcher
        .wait_for(Duration::from_secs(8), |v| v.instances("web").len() == 2)
        .await
        .expect("the killed sidecar's instance expires");
    let gone_after = killed.elapsed();
    assert!(
        gone_after >= Duration::from_millis(1500) && gone_after < Duration::from_secs(5),
        "expired after {gone_after:?} with a 3 s TTL"
    );

    // The agent's instances stayed: its heartbeats kept its session.
    assert_eq!(watcher.read(|v| v.count("web")), 2);

    // An instance deregistered goes at once.
    let removing = Instant::now();
    agent.remove("web", "hz-a", "web-rz01-1");
    let view = watcher
        .wait_for(Duration::from_secs(3), |v| v.instances("web").len() == 1)
        .await
        .expect("the deregistered instance goes");
    assert!(
        removing.elapsed() < Duration::from_secs(1),
        "{:?}",
        removing.elapsed()
    );
    // A removal is a key on the wire, not the service.
    let removal_bytes = view.bytes - before;
    assert!(
        removal_bytes < 200,
        "a removal and an expiry cost {removal_bytes} bytes"
    );

    // What this replica sent is counted.
    let (_, metrics) =
        crate::harness::http_get(control.url.trim_start_matches("http://"), "/metrics")
            .expect("metrics");
    assert!(
        metrics.contains("atoll_control_registry_update_bytes_sent_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("atoll_control_registry_subscribers 1"),
        "{metrics}"
    );

    // Ending the agent's session removes everything it registered.
    agent.close().await;
    watcher
        .wait_for(Duration::from_secs(3), |v| v.instances("web").is_empty())
        .await
        .expect("a closed session's instances go");

    // `atoll registry list` reads the same.
    let listed = control.json(&["registry", "list"]);
    assert_eq!(
        listed["instances"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registrant_registers_only_what_it_may_and_bad_instances_say_why() {
    let control = started();
    let mut client = RegistryClient::connect(control.url.clone())
        .await
        .expect("connect");
    let register = |who: Registrant, instances: Vec<Instance>| RegisterRequest {
        registrant: Some(who),
        session: 0,
        ttl_ms: 0,
        instances,
    };
    // Each bad instance is refused alone, with why; its neighbours in
    // the call are registered.
    let answer = client
        .register(register(
            registrant("agent", "hz-a", "hz-a"),
            vec![
                instance("web", "hz-a", "rz02", "web-x", 1),
                instance("web", "hz-a", "rz01", "web-ok", 2),
                Instance {
                    version: "v".repeat(64),
                    ..instance("web", "hz-a", "rz01", "web-long", 3)
                },
            ],
        ))
        .await
        .expect("the good instance is registered")
        .into_inner();
    let reasons: Vec<(&str, &str, &str)> = answer
        .refused
        .iter()
        .map(|r| {
            (
                r.instance.as_ref().map_or("", |k| k.name.as_str()),
                r.code.as_str(),
                r.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0].0, "web-x");
    assert_eq!(reasons[0].1, "invalid");
    assert!(
        reasons[0]
            .2
            .contains("instances[0] (web/hz-a/web-x): cell `rz02` is in zone `hz-b`"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1].0, "web-long");
    assert!(reasons[1].2.contains("version: at most 63"), "{reasons:?}");
    let listed = control.json(&["registry", "list", "web"]);
    assert_eq!(
        listed["instances"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert_eq!(listed["instances"][0]["name"], "web-ok", "{listed}");
    client
        .deregister(atoll_api::registry::DeregisterRequest {
            registrant: Some(registrant("agent", "hz-a", "hz-a")),
            session: answer.session,
            instances: Vec::new(),
        })
        .await
        .expect("ends its session");

    // A sidecar registers only its own instance, as its App's Service.
    let answer = client
        .register(register(
            registrant("sidecar", "hz-a", "web-rz01-0"),
            vec![
                instance("web", "hz-a", "rz01", "web-rz01-9", 1),
                instance("bank", "hz-a", "rz01", "web-rz01-0", 1),
            ],
        ))
        .await
        .expect("answers")
        .into_inner();
    assert_eq!(answer.refused.len(), 2, "{answer:?}");
    assert_eq!(answer.refused[0].code, "forbidden");
    assert!(
        answer.refused[0].reason.contains("only its own instance"),
        "{answer:?}"
    );
    assert!(
        answer.refused[1]
            .reason
            .contains("App instance of Service `web`"),
        "{answer:?}"
    );
    // A role that registers nothing is refused whole, and no session is
    // made for it.
    let refused = client
        .register(register(
            registrant("gateway", "hz-a", "gw-1"),
            vec![instance("web", "hz-a", "rz01", "gw-1", 1)],
        ))
        .await
        .expect_err("gateways do not register");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    let refused = client
        .register(RegisterRequest {
            ttl_ms: 100,
            ..register(registrant("agent", "hz-a", "hz-a"), Vec::new())
        })
        .await
        .expect_err("a TTL too short");
    assert!(refused.message().contains("ttlMs 100"), "{refused:?}");

    // A session is its maker's: another registrant cannot keep or use it.
    let made = client
        .register(register(
            registrant("agent", "hz-a", "hz-a"),
            vec![instance("web", "hz-a", "rz01", "web-a", 1)],
        ))
        .await
        .expect("registers")
        .into_inner();
    let refused = client
        .heartbeat(HeartbeatRequest {
            registrant: Some(registrant("agent", "hz-b", "hz-b")),
            session: made.session,
        })
        .await
        .expect_err("not its session");
    // Answered as a missing session: nothing is told of another's.
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(!refused.message().contains("hz-a"), "{refused:?}");
    let refused = client
        .heartbeat(HeartbeatRequest {
            registrant: Some(Registrant {
                workspace: "payments".into(),
                ..registrant("agent", "hz-a", "hz-a")
            }),
            session: made.session,
        })
        .await
        .expect_err("the same name in another workspace is another owner");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    let refused = client
        .heartbeat(HeartbeatRequest {
            registrant: Some(registrant("agent", "hz-a", "hz-a")),
            session: 0x7777_7777,
        })
        .await
        .expect_err("no such session");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    assert!(
        refused.message().contains("register them again"),
        "{refused:?}"
    );

    // The control plane still serves, and lists the one instance.
    let listed = control.json(&["registry", "list", "web"]);
    assert_eq!(listed["instances"][0]["name"], "web-a", "{listed}");
    assert_eq!(listed["instances"][0]["cell"], "rz01", "{listed}");
}

/// Two replicas on one real etcd: a registrant's session lives in etcd,
/// so when the replica it registered through hangs (SIGSTOP: it answers
/// nothing, and refuses nothing either) it carries on through the other
/// with the same session and nothing flaps; a watcher of the other
/// replica sees every instance the whole time.
#[tokio::test(flavor = "multi_thread")]
async fn the_registry_outlives_the_replica_a_registrant_used() {
    let etcd = atoll_testing::EtcdServer::start();
    let replica = |etcd: &atoll_testing::EtcdServer| {
        Control::start_with(vec![
            "--store=etcd".into(),
            format!("--etcd-endpoints={}", etcd.endpoint()),
            "--election-ttl=2s".into(),
        ])
    };
    let first = replica(&etcd);
    let second = replica(&etcd);
    first
        .atoll(&["apply", "-f", examples().to_str().expect("utf-8 path")])
        .success();
    let channels =
        atoll_transport::Transport::plain().channels(atoll_transport::ChannelOptions::default());
    // The registrant uses the first replica first, the watcher the second.
    let both =
        atoll_transport::ControlUrls::parse_in_order(&format!("{},{}", first.url, second.url))
            .expect("urls");
    let agent = Registrar::start(
        channels.clone(),
        both,
        registrant("agent", "hz-a", "hz-a"),
        Duration::from_secs(3),
    );
    agent.put(instance("web", "hz-a", "rz01", "web-rz01-0", 7001));
    let registered = agent
        .settled(Duration::from_secs(15))
        .await
        .expect("registered through the first replica");
    let watcher = Watcher::start(
        channels.clone(),
        atoll_transport::ControlUrls::parse(&second.url).expect("url"),
        registrant("sidecar", "hz-b", "bank-rz02-0"),
        ["web".to_owned()],
    );
    watcher
        .wait_for(Duration::from_secs(10), |v| v.instances("web").len() == 1)
        .await
        .expect("the second replica's watcher sees it");

    first.signal("STOP");
    // Three TTLs later the session is the same one, kept through the
    // second replica, and the instance never left.
    let mut gone = false;
    let mut changes = watcher.subscribe();
    let until = Instant::now() + Duration::from_secs(9);
    while Instant::now() < until {
        changes.borrow_and_update();
        if watcher.read(|v| v.count("web")) == 0 {
            gone = true;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
    }
    assert!(
        !gone,
        "the instance left the registry while its registrant lived"
    );
    let now = agent.state();
    assert_eq!(now.session, registered.session, "{now:?}");
    assert_eq!(now.sessions, 1, "{now:?}");
    assert!(now.problem.is_none(), "{now:?}");
    first.signal("CONT");
}

/// Over TLS a registrant is who its certificate says: an SDK process
/// registers its own instance, claiming another name is refused, and no
/// certificate is refused with what to give.
#[tokio::test(flavor = "multi_thread")]
async fn over_tls_a_registrant_is_who_its_certificate_says() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_dir = crate::tls::ca(dir.path(), "ca");
    let root = ca_dir.join("root.pem");
    let replica_cert = dir.path().join("control");
    crate::tls::issue(
        &ca_dir,
        "atoll://default/control/-/replica-1",
        &replica_cert,
    );
    let control = Control::start_with(vec![
        format!("--ca={}", root.display()),
        format!("--cert={}", replica_cert.with_extension("pem").display()),
        format!("--key={}", replica_cert.with_extension("key").display()),
    ]);
    let ca_flag = format!("--ca={}", root.display());
    control
        .atoll(&[&ca_flag, "apply", "-f", examples().to_str().expect("utf-8")])
        .success();
    control
        .atoll_with_stdin(&[&ca_flag, "apply", "-f", "-"], Some(APPS))
        .success();
    let transport = |cert: Option<&std::path::Path>| {
        let trust = atoll_transport::Trust::from_file(&root).expect("root");
        let identity = cert.map(|cert| {
            atoll_transport::Identity::from_files(
                &cert.with_extension("pem"),
                &cert.with_extension("key"),
            )
            .expect("identity")
        });
        atoll_transport::Transport::with_tls(
            atoll_transport::ClientTls::new(&trust, identity.as_ref()).expect("tls"),
        )
        .channels(atoll_transport::ChannelOptions::default())
    };
    let urls = atoll_transport::ControlUrls::parse(&control.url).expect("url");
    let sdk = dir.path().join("sdk");
    crate::tls::issue(&ca_dir, "atoll://default/sdk/hz-a/web-rz01-0", &sdk);

    let registrar = Registrar::start(
        transport(Some(&sdk)),
        urls.clone(),
        registrant("sdk", "hz-a", "web-rz01-0"),
        Duration::from_secs(5),
    );
    registrar.put(instance("web", "hz-a", "rz01", "web-rz01-0", 7100));
    registrar
        .settled(Duration::from_secs(10))
        .await
        .expect("registers its own instance");
    let gateway = dir.path().join("gateway");
    crate::tls::issue(&ca_dir, "atoll://default/gateway/hz-b/gw-1", &gateway);
    let watcher = Watcher::start(
        transport(Some(&gateway)),
        urls.clone(),
        registrant("gateway", "hz-b", "gw-1"),
        ["web".to_owned()],
    );
    let view = watcher
        .wait_for(Duration::from_secs(10), |v| v.instances("web").len() == 1)
        .await
        .expect("a gateway watches it");
    assert_eq!(
        view.instances("web")[0].registered_by,
        "sdk/hz-a/web-rz01-0"
    );
    assert_eq!(view.instances("web")[0].mode, "sdk");

    let channel = transport(Some(&sdk))
        .connect(&control.url)
        .await
        .expect("connect");
    let mut client = RegistryClient::new(channel);
    let claimed = client
        .register(RegisterRequest {
            registrant: Some(registrant("sdk", "hz-a", "web-rz01-1")),
            session: 0,
            ttl_ms: 0,
            instances: vec![instance("web", "hz-a", "rz01", "web-rz01-1", 7101)],
        })
        .await
        .expect_err("another name than its certificate's");
    assert_eq!(claimed.code(), tonic::Code::PermissionDenied, "{claimed:?}");
    assert!(
        claimed
            .message()
            .contains("a node is who its certificate says"),
        "{claimed:?}"
    );

    let channel = transport(None)
        .connect(&control.url)
        .await
        .expect("connect");
    let mut anonymous = RegistryClient::new(channel);
    let refused = anonymous
        .register(RegisterRequest {
            registrant: Some(registrant("agent", "hz-a", "agent-hz-a")),
            session: 0,
            ttl_ms: 0,
            instances: Vec::new(),
        })
        .await
        .expect_err("no certificate");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains("--cert"), "{refused:?}");
}
