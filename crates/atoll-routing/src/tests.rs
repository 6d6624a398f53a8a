use std::collections::HashSet;

use atoll_model::key::{fnv1a64, hash};
use atoll_model::{HashName, Resource, load, validate};
use http::{HeaderMap, HeaderValue, Method};

use super::*;

/// A topology: regions hz (zones hz-a, hz-b) and sh (sh-a); `cells` rzones
/// spread over the zones; a gzone in hz-a, a czone in hz-b and sh-a each.
fn topology(cells: usize, shards: u32, key: &str, transform: &str, extra: &str) -> String {
    let zones = ["hz-a", "hz-b", "sh-a"];
    let mut text = String::from(
        "apiVersion: atoll/v1\nkind: Region\nmetadata: {name: hz}\n---\napiVersion: atoll/v1\nkind: Region\nmetadata: {name: sh}\n",
    );
    for (zone, region) in [("hz-a", "hz"), ("hz-b", "hz"), ("sh-a", "sh")] {
        text += &format!(
            "---\napiVersion: atoll/v1\nkind: Zone\nmetadata: {{name: {zone}}}\nspec: {{region: {region}}}\n"
        );
    }
    for cell in 0..cells {
        text += &format!(
            "---\napiVersion: atoll/v1\nkind: Cell\nmetadata: {{name: rz{cell:02}}}\nspec: {{zone: {}, type: rzone}}\n",
            zones[cell % 3]
        );
    }
    text += "---\napiVersion: atoll/v1\nkind: Cell\nmetadata: {name: gz}\nspec: {zone: hz-a, type: gzone}\n";
    text += "---\napiVersion: atoll/v1\nkind: Cell\nmetadata: {name: cz-hz}\nspec: {zone: hz-b, type: czone}\n";
    text += "---\napiVersion: atoll/v1\nkind: Cell\nmetadata: {name: cz-sh}\nspec: {zone: sh-a, type: czone}\n";
    text += &format!(
        "---\napiVersion: atoll/v1\nkind: ShardRule\nmetadata: {{name: users}}\nspec:\n  shards: {shards}\n  key:\n    sources: [{key}]\n    transform: {transform}\n"
    );
    text += "---\napiVersion: atoll/v1\nkind: ShardMap\nmetadata: {name: users}\nspec:\n  rule: users\n  epoch: 4\n  assignments:\n";
    let per = shards as usize / cells;
    for cell in 0..cells {
        let start = cell * per;
        let end = if cell + 1 == cells {
            shards as usize - 1
        } else {
            start + per - 1
        };
        text += &format!("    - {{shards: \"{start}-{end}\", cell: rz{cell:02}}}\n");
    }
    text += "---\napiVersion: atoll/v1\nkind: Service\nmetadata: {name: bank}\nspec:\n  kind: unitized\n  shardRule: users\n  endpoints:\n";
    for cell in 0..cells {
        text += &format!(
            "    - {{cell: rz{cell:02}, address: \"10.0.{cell}.1:80\"}}\n    - {{cell: rz{cell:02}, address: \"10.0.{cell}.2:80\"}}\n"
        );
    }
    text += "    - {cell: gz, address: \"10.9.0.1:80\"}\n";
    text += "---\napiVersion: atoll/v1\nkind: Route\nmetadata: {name: bank}\nspec: {match: [{pathPrefix: /}], service: bank}\n";
    for (gateway, zone, port) in [
        ("gw-hz-a", "hz-a", 1),
        ("gw-hz-b", "hz-b", 2),
        ("gw-sh-a", "sh-a", 3),
    ] {
        text += &format!(
            "---\napiVersion: atoll/v1\nkind: Gateway\nmetadata: {{name: {gateway}}}\nspec: {{zone: {zone}, listeners: [{{port: 80, protocol: http}}], advertise: \"10.8.0.{port}:80\"}}\n"
        );
    }
    text + extra
}

fn compile(text: &str, zone: &str, gateway: &str) -> RoutingTable {
    let located = load("t.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    validate(&located).unwrap_or_else(|e| panic!("{e}"));
    let resources: Vec<Resource> = located.into_iter().map(|l| l.resource).collect();
    RoutingTable::compile(
        1,
        &resources,
        &Scope {
            zone: zone.into(),
            gateway: Some(gateway.into()),
            peer_tls: false,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

struct Req {
    method: Method,
    host: Option<String>,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Option<Vec<u8>>,
    forwarded: bool,
}

impl Req {
    fn get(path: &str) -> Req {
        Req {
            method: Method::GET,
            host: None,
            path: path.into(),
            query: None,
            headers: HeaderMap::new(),
            body: None,
            forwarded: false,
        }
    }

    fn header(mut self, name: &'static str, value: &str) -> Req {
        self.headers
            .append(name, HeaderValue::from_str(value).expect("value"));
        self
    }

    fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            method: &self.method,
            host: self.host.as_deref(),
            path: &self.path,
            query: self.query.as_deref(),
            headers: &self.headers,
            body: self.body.as_deref(),
            forwarded: self.forwarded,
        }
    }
}

fn route(table: &RoutingTable, req: &Req) -> Result<(String, Via, Option<u32>), Refusal> {
    let info = req.info();
    let route = table.match_route(&info).ok_or(Refusal::NoRoute)?;
    match table.decide(route, &info, &AllAvailable) {
        Decision::Upstream(target) => {
            let endpoint = &table.endpoints[target.endpoint as usize];
            if target.via == Via::Direct {
                assert_eq!(
                    endpoint.cell,
                    Some(target.cell),
                    "a direct endpoint is in the chosen cell"
                );
            }
            Ok((
                table.cells[usize::from(target.cell)].name.clone(),
                target.via,
                target.shard,
            ))
        }
        Decision::Refuse(refusal) => Err(refusal),
    }
}

/// The owner of `shard` as the topology above assigns it.
fn owner(shard: u32, shards: u32, cells: usize) -> String {
    let per = shards as usize / cells;
    let cell = (shard as usize / per).min(cells - 1);
    format!("rz{cell:02}")
}

fn cell_zone(table: &RoutingTable, name: &str) -> String {
    let cell = &table.cells[usize::from(table.cell_id(name).expect("cell"))];
    table.zones[usize::from(cell.zone)].name.clone()
}

#[test]
fn ten_thousand_users_reach_their_owner_for_every_source_and_transform() {
    type ShardOf = fn(u64) -> u32;
    type MakeRequest = fn(u64) -> Req;
    let transforms: [(&str, u32, ShardOf); 4] = [
        ("{decimalSuffix: 2}", 100, |id| (id % 100) as u32),
        ("{mod: 1000}", 1000, |id| (id % 1000) as u32),
        ("{hash: fnv1a64}", 1000, |id| {
            (fnv1a64(id.to_string().as_bytes()) % 1000) as u32
        }),
        ("{hash: xxh3}", 1000, |id| {
            (hash(HashName::Xxh3, id.to_string().as_bytes()) % 1000) as u32
        }),
    ];
    let sources: [(&str, MakeRequest); 5] = [
        ("{header: x-user-id}", |id| {
            Req::get("/api").header("x-user-id", &id.to_string())
        }),
        ("{cookie: uid}", |id| {
            Req::get("/api").header("cookie", &format!("theme=dark; uid={id}"))
        }),
        ("{query: uid}", |id| {
            let mut r = Req::get("/api");
            r.query = Some(format!("a=1&uid={id}"));
            r
        }),
        ("{path: \"/users/{uid}\"}", |id| {
            Req::get(&format!("/users/{id}/balance"))
        }),
        ("{body: payer.id}", |id| {
            let mut r = Req::get("/transfer");
            r.method = Method::POST;
            r.body = Some(format!("{{\"payer\": {{\"id\": \"{id}\"}}}}").into_bytes());
            r
        }),
    ];
    let cells = 12;
    for (transform, shards, expected_shard) in transforms {
        for (source, request) in sources {
            let table = compile(
                &topology(cells, shards, source, transform, ""),
                "hz-a",
                "gw-hz-a",
            );
            let mut seen = HashSet::new();
            for i in 0..10_000u64 {
                let id = 2_088_000_000_000_000 + i * 7919;
                let req = request(id);
                let (cell, via, shard) = route(&table, &req)
                    .unwrap_or_else(|r| panic!("{source} {transform} {id}: {r:?}"));
                let expected = expected_shard(id);
                assert_eq!(shard, Some(expected), "{source} {transform} user {id}");
                let owner = owner(expected, shards, cells);
                assert_eq!(cell, owner, "{source} {transform} user {id}");
                let local = cell_zone(&table, &cell) == "hz-a";
                assert_eq!(via, if local { Via::Direct } else { Via::Gateway });
                seen.insert(cell);
            }
            assert_eq!(
                seen.len(),
                cells,
                "{source} {transform}: every cell gets users"
            );
        }
    }
}

#[test]
fn fenced_shards_refuse_writes_and_serve_reads() {
    let extra = "";
    let text = topology(4, 100, "{header: x-user-id}", "{decimalSuffix: 2}", extra).replace(
        "- {shards: \"0-24\", cell: rz00}",
        "- {shards: \"0-24\", cell: rz00, state: fenced}",
    );
    let table = compile(&text, "hz-a", "gw-hz-a");
    let mut write = Req::get("/api").header("x-user-id", "1007");
    write.method = Method::POST;
    assert_eq!(
        route(&table, &write),
        Err(Refusal::Fenced {
            service: table.service_id("bank").expect("bank"),
            shard: 7,
            epoch: 4,
            cell: table.cell_id("rz00").expect("cell")
        })
    );
    let refusal = Refusal::Fenced {
        service: 0,
        shard: 7,
        epoch: 4,
        cell: 0,
    };
    assert_eq!(refusal.status(), 503);
    assert!(
        refusal
            .message(&table)
            .contains("shard 7 (cell rz00) is fenced")
    );
    let read = Req::get("/api").header("x-user-id", "1007");
    assert_eq!(route(&table, &read).map(|r| r.0), Ok("rz00".into()));
    let mut other = Req::get("/api").header("x-user-id", "1030");
    other.method = Method::POST;
    assert!(route(&table, &other).is_ok(), "other shards take writes");
}

#[test]
fn missing_keys_follow_the_rule() {
    let base = topology(4, 100, "{header: x-user-id}", "{decimalSuffix: 2}", "");
    let table = compile(&base, "hz-a", "gw-hz-a");
    assert!(matches!(
        route(&table, &Req::get("/api")),
        Err(Refusal::MissingKey { .. })
    ));
    let invalid = Req::get("/api").header("x-user-id", "abc");
    assert!(matches!(
        route(&table, &invalid),
        Err(Refusal::InvalidKey(_))
    ));
    let global = base.replace(
        "transform: {decimalSuffix: 2}\n",
        "transform: {decimalSuffix: 2}\n    onMissing: global\n",
    );
    let table = compile(&global, "hz-a", "gw-hz-a");
    assert_eq!(
        route(&table, &Req::get("/api")).map(|r| r.0),
        Ok("gz".into())
    );
}

#[test]
fn a_forwarded_request_for_another_zone_is_a_loop_not_a_second_hop() {
    let table = compile(
        &topology(3, 99, "{header: x-user-id}", "{mod: 99}", ""),
        "hz-a",
        "gw-hz-a",
    );
    // Shard 40 belongs to rz01 in hz-b.
    let mut req = Req::get("/api").header("x-user-id", "40");
    assert_eq!(
        route(&table, &req).map(|r| (r.0, r.1)),
        Ok(("rz01".into(), Via::Gateway))
    );
    req.forwarded = true;
    assert_eq!(route(&table, &req), Err(Refusal::Loop { cell: 1 }));
    assert_eq!(Refusal::Loop { cell: 1 }.status(), 508);
    // A forwarded request for this zone is served.
    let mut local = Req::get("/api").header("x-user-id", "5");
    local.forwarded = true;
    assert_eq!(route(&table, &local).map(|r| r.1), Ok(Via::Direct));
}

#[test]
fn misroute_endpoints_mode_goes_direct() {
    let text = topology(3, 99, "{header: x-user-id}", "{mod: 99}", "").replace(
        "spec: {zone: hz-a, listeners: [{port: 80, protocol: http}], advertise: \"10.8.0.1:80\"}",
        "spec: {zone: hz-a, listeners: [{port: 80, protocol: http}], misroute: endpoints}",
    );
    let table = compile(&text, "hz-a", "gw-hz-a");
    let req = Req::get("/api").header("x-user-id", "40");
    assert_eq!(
        route(&table, &req).map(|r| (r.0, r.1)),
        Ok(("rz01".into(), Via::Direct))
    );
}

const LOCAL_AND_GLOBAL: &str = "---\napiVersion: atoll/v1\nkind: Service\nmetadata: {name: web}\nspec:\n  kind: local\n  endpoints:\n    - {cell: rz00, address: \"10.1.0.1:80\"}\n    - {cell: rz01, address: \"10.1.1.1:80\"}\n    - {cell: rz02, address: \"10.1.2.1:80\"}\n---\napiVersion: atoll/v1\nkind: Route\nmetadata: {name: web}\nspec: {hosts: [web.example], service: web}\n---\napiVersion: atoll/v1\nkind: Service\nmetadata: {name: rates}\nspec:\n  kind: global\n  endpoints:\n    - {cell: gz, address: \"10.2.0.1:80\"}\n    - {cell: cz-hz, address: \"10.2.1.1:80\"}\n    - {cell: cz-sh, address: \"10.2.2.1:80\"}\n---\napiVersion: atoll/v1\nkind: Route\nmetadata: {name: rates}\nspec: {hosts: [rates.example], service: rates}\n";

fn host(mut req: Req, host: &str) -> Req {
    req.host = Some(host.into());
    req
}

#[test]
fn local_services_stay_in_the_zone_then_the_region() {
    let text = topology(3, 99, "{header: x-user-id}", "{mod: 99}", LOCAL_AND_GLOBAL);
    let table = compile(&text, "hz-a", "gw-hz-a");
    for _ in 0..100 {
        assert_eq!(
            route(&table, &host(Req::get("/"), "web.example")).map(|r| r.0),
            Ok("rz00".into())
        );
    }
    // rz00 down: the same region (rz01 in hz-b), never sh-a.
    struct Down(EndpointId);
    impl Health for Down {
        fn available(&self, e: EndpointId) -> bool {
            e != self.0
        }
    }
    let web = table.service_id("web").expect("web");
    let down = Down(table.endpoints_of(web, table.cell_id("rz00").expect("rz00"))[0]);
    let req = host(Req::get("/"), "web.example");
    let info = req.info();
    let route_id = table.match_route(&info).expect("route");
    for _ in 0..100 {
        match table.decide(route_id, &info, &down) {
            Decision::Upstream(t) => assert_eq!(table.cells[usize::from(t.cell)].name, "rz01"),
            other => panic!("{other:?}"),
        }
    }
    // Zone weight 0 drains hz-a.
    let drained = text.replace(
        "kind: Zone\nmetadata: {name: hz-a}\nspec: {region: hz}",
        "kind: Zone\nmetadata: {name: hz-a}\nspec: {region: hz, weight: 0}",
    );
    let table = compile(&drained, "hz-a", "gw-hz-a");
    assert_eq!(
        route(&table, &host(Req::get("/"), "web.example")).map(|r| r.0),
        Ok("rz01".into())
    );
}

#[test]
fn global_services_write_to_the_gzone_and_read_nearby() {
    let text = topology(3, 99, "{header: x-user-id}", "{mod: 99}", LOCAL_AND_GLOBAL);
    let table = compile(&text, "sh-a", "gw-sh-a");
    assert_eq!(
        route(&table, &host(Req::get("/"), "rates.example")).map(|r| r.0),
        Ok("cz-sh".into())
    );
    let mut write = host(Req::get("/"), "rates.example");
    write.method = Method::PUT;
    assert_eq!(
        route(&table, &write).map(|r| (r.0, r.1)),
        Ok(("gz".into(), Via::Gateway))
    );
    let table = compile(&text, "hz-a", "gw-hz-a");
    // hz's czone is in hz-b: same city, reached through hz-b's gateway.
    assert_eq!(
        route(&table, &host(Req::get("/"), "rates.example")).map(|r| r.0),
        Ok("cz-hz".into())
    );
}

#[test]
fn routes_prefer_exact_hosts_and_specific_paths() {
    let extra = "---\napiVersion: atoll/v1\nkind: Service\nmetadata: {name: a}\nspec:\n  kind: local\n  endpoints: [{cell: rz00, address: \"10.3.0.1:80\"}]\n---\napiVersion: atoll/v1\nkind: Service\nmetadata: {name: b}\nspec:\n  kind: local\n  endpoints: [{cell: rz00, address: \"10.3.0.2:80\"}]\n---\napiVersion: atoll/v1\nkind: Route\nmetadata: {name: wild}\nspec: {hosts: [\"*.example\"], service: a}\n---\napiVersion: atoll/v1\nkind: Route\nmetadata: {name: exact}\nspec: {hosts: [x.example], match: [{pathPrefix: /v1}, {pathExact: /v1/special, methods: [GET]}], service: b}\n";
    let table = compile(
        &topology(3, 99, "{header: x-user-id}", "{mod: 99}", extra),
        "hz-a",
        "gw-hz-a",
    );
    let name = |req: Req| {
        let info = req.info();
        table
            .match_route(&info)
            .map(|r| table.routes[r as usize].name.clone())
    };
    assert_eq!(
        name(host(Req::get("/v1/x"), "X.Example")),
        Some("exact".into())
    );
    assert_eq!(
        name(host(Req::get("/v2"), "x.example")),
        Some("wild".into()),
        "exact host, no path match: wildcard"
    );
    assert_eq!(
        name(host(Req::get("/v1"), "y.example")),
        Some("wild".into())
    );
    assert_eq!(
        name(host(Req::get("/v1"), "example")),
        Some("bank".into()),
        "a wildcard needs a label before it"
    );
    assert_eq!(name(Req::get("/anything")), Some("bank".into()));
}

#[test]
fn splits_pin_by_header_and_weigh_the_rest() {
    let extra = "";
    let text = topology(3, 99, "{header: x-user-id}", "{mod: 99}", extra)
        .replace("    - {cell: rz00, address: \"10.0.0.2:80\"}\n", "    - {cell: rz00, address: \"10.0.0.2:80\", labels: {version: v2}}\n")
        .replace("  shardRule: users\n  endpoints:", "  shardRule: users\n  subsets: [{name: stable, labels: {version: v1}}, {name: canary, labels: {version: v2}}]\n  endpoints:")
        .replace("spec: {match: [{pathPrefix: /}], service: bank}", "spec: {match: [{pathPrefix: /}], service: bank, split: [{subset: stable, weight: 90}, {subset: canary, weight: 10, headers: [{name: x-canary, exact: \"1\"}]}]}");
    let table = compile(&text, "hz-a", "gw-hz-a");
    let canary = table
        .endpoints
        .iter()
        .position(|e| e.address == "10.0.0.2:80")
        .expect("canary") as EndpointId;
    let pinned = Req::get("/")
        .header("x-user-id", "3")
        .header("x-canary", "1");
    let info = pinned.info();
    let route_id = table.match_route(&info).expect("route");
    for _ in 0..50 {
        match table.decide(route_id, &info, &AllAvailable) {
            Decision::Upstream(t) => assert_eq!(t.endpoint, canary),
            other => panic!("{other:?}"),
        }
    }
    let plain = Req::get("/").header("x-user-id", "3");
    let info = plain.info();
    let mut to_canary = 0;
    for _ in 0..10_000 {
        if let Decision::Upstream(t) = table.decide(route_id, &info, &AllAvailable) {
            to_canary += usize::from(t.endpoint == canary);
        }
    }
    // 10% by weight; rz00's stable subset is empty (no v1 label), so the
    // stable share falls back to the whole cell, half of which is canary.
    assert!((4_000..6_000).contains(&to_canary), "{to_canary}");
}

#[test]
fn unavailable_endpoints_are_skipped_until_none_is_left() {
    let table = compile(
        &topology(3, 99, "{header: x-user-id}", "{mod: 99}", ""),
        "hz-a",
        "gw-hz-a",
    );
    let bank = table.service_id("bank").expect("bank");
    let rz00 = table.cell_id("rz00").expect("rz00");
    let [first, second] = table.endpoints_of(bank, rz00) else {
        panic!("two endpoints")
    };
    struct Only(Option<EndpointId>);
    impl Health for Only {
        fn available(&self, e: EndpointId) -> bool {
            Some(e) == self.0
        }
    }
    let req = Req::get("/").header("x-user-id", "3");
    let info = req.info();
    let route_id = table.match_route(&info).expect("route");
    for _ in 0..10 {
        match table.decide(route_id, &info, &Only(Some(*second))) {
            Decision::Upstream(t) => {
                assert_eq!(t.endpoint, *second);
                assert_eq!(
                    table.retry_endpoint(&t, *second, &Only(Some(*second))),
                    None
                );
                assert_eq!(
                    table.retry_endpoint(&t, *second, &AllAvailable),
                    Some(*first)
                );
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        table.decide(route_id, &info, &Only(None)),
        Decision::Refuse(Refusal::NoEndpoint {
            service: bank,
            cell: Some(rz00)
        })
    );
}

#[test]
fn mirrors_respect_percent_and_shards() {
    let extra = "---\napiVersion: atoll/v1\nkind: Service\nmetadata: {name: shadow}\nspec:\n  kind: local\n  endpoints: [{cell: rz00, address: \"10.4.0.1:80\"}]\n";
    let text = topology(3, 99, "{header: x-user-id}", "{mod: 99}", extra).replace(
        "spec: {match: [{pathPrefix: /}], service: bank}",
        "spec: {match: [{pathPrefix: /}], service: bank, mirror: {service: shadow, percent: 100, shards: \"0-9\"}}",
    );
    let table = compile(&text, "hz-a", "gw-hz-a");
    for (user, mirrored) in [("5", true), ("20", false)] {
        let req = Req::get("/").header("x-user-id", user);
        let info = req.info();
        let route_id = table.match_route(&info).expect("route");
        let Decision::Upstream(target) = table.decide(route_id, &info, &AllAvailable) else {
            panic!()
        };
        let mirror = table.mirror(&target, &info, &AllAvailable);
        assert_eq!(mirror.is_some(), mirrored, "user {user}");
        if let Some(endpoint) = mirror {
            assert_eq!(table.endpoints[endpoint as usize].address, "10.4.0.1:80");
        }
    }
}

#[test]
fn a_missing_gateway_does_not_compile() {
    let text = topology(3, 99, "{header: x-user-id}", "{mod: 99}", "");
    let located = load("t.yaml", &text).expect("valid");
    let resources: Vec<Resource> = located.into_iter().map(|l| l.resource).collect();
    let error = RoutingTable::compile(
        7,
        &resources,
        &Scope {
            zone: "hz-a".into(),
            gateway: Some("gw-nope".into()),
            peer_tls: false,
        },
    )
    .expect_err("unknown gateway");
    assert!(
        error.contains("Gateway `gw-nope` does not exist in version 7"),
        "{error}"
    );
}

#[test]
fn reported_endpoints_join_static_ones_when_ready() {
    let extra = "---\napiVersion: atoll/v1\nkind: Service\nmetadata: {name: api}\nspec: {kind: local}\n---\napiVersion: atoll/v1\nkind: Route\nmetadata: {name: api}\nspec: {hosts: [api.example], service: api}\n---\napiVersion: atoll/v1\nkind: Endpoints\nmetadata: {name: api-hz-a}\nspec:\n  service: api\n  zone: hz-a\n  endpoints:\n    - {cell: rz00, address: \"10.5.0.1:80\", instance: api-rz00-0, ready: true, labels: {version: \"2\"}}\n    - {cell: rz00, address: \"10.5.0.2:80\", instance: api-rz00-1, ready: false}\n    - {cell: gone, address: \"10.5.0.3:80\", instance: api-gone-0, ready: true}\n";
    let table = compile(
        &topology(3, 99, "{header: x-user-id}", "{mod: 99}", extra),
        "hz-a",
        "gw-hz-a",
    );
    let api = table.service_id("api").expect("api");
    let rz00 = table.cell_id("rz00").expect("rz00");
    let addresses: Vec<&str> = table
        .endpoints_of(api, rz00)
        .iter()
        .map(|e| table.endpoints[*e as usize].address.as_str())
        .collect();
    assert_eq!(
        addresses,
        ["10.5.0.1:80"],
        "only the ready instance, and no cell that is gone"
    );
    assert_eq!(
        route(&table, &host(Req::get("/"), "api.example")).map(|r| r.0),
        Ok("rz00".into())
    );
}

/// East-west calls: the table decides the cell, the caller's own sets say
/// which cells serve.
#[test]
fn an_east_west_call_goes_by_its_key_else_the_propagated_one_and_local_services_stay_in_the_callers_cell()
 {
    let text = topology(
        4,
        100,
        "{header: x-user-id}",
        "{decimalSuffix: 2}",
        LOCAL_AND_GLOBAL,
    )
    .replace(
        "- {shards: \"25-49\", cell: rz01}",
        "- {shards: \"25-49\", cell: rz01, state: fenced}",
    );
    let table = compile(&text, "hz-a", "gw-hz-a");
    let bank = table.service_id("bank").expect("bank");
    let web = table.service_id("web").expect("web");
    let cell = |name: &str| table.cell_id(name).expect("cell");
    let all = |_: CellId| true;
    let headers = |pairs: &[(&'static str, &'static str)]| {
        let mut map = HeaderMap::new();
        for (n, v) in pairs {
            map.insert(*n, HeaderValue::from_static(v));
        }
        map
    };
    let info = |method: &'static Method, headers: &'static HeaderMap| RequestInfo {
        method,
        host: None,
        path: "/",
        query: None,
        headers,
        body: None,
        forwarded: false,
    };
    // The call's own key wins over the propagated one.
    let own: &'static HeaderMap = Box::leak(Box::new(headers(&[("x-user-id", "1007")])));
    let get_own = info(&Method::GET, own);
    let call = table
        .decide_call(bank, &get_own, Some("1080"), None, &all)
        .expect("routed");
    assert_eq!(
        (call.cell, call.shard, call.epoch),
        (cell("rz00"), Some(7), Some(4))
    );
    // Without one, the propagated key decides.
    let none: &'static HeaderMap = Box::leak(Box::new(HeaderMap::new()));
    let get_none = info(&Method::GET, none);
    let call = table
        .decide_call(bank, &get_none, Some("1080"), None, &all)
        .expect("routed");
    assert_eq!((call.cell, call.shard), (cell("rz03"), Some(80)));
    assert_eq!(call.key.as_deref(), Some("1080"));
    // A write for a fenced shard is refused, by either key.
    let post_none = info(&Method::POST, none);
    let refused = table.decide_call(bank, &post_none, Some("1030"), None, &all);
    assert!(
        matches!(refused, Err(Refusal::Fenced { shard: 30, .. })),
        "{refused:?}"
    );
    // No key at all: the rule's onMissing (reject).
    let refused = table.decide_call(bank, &get_none, None, None, &all);
    assert!(
        matches!(refused, Err(Refusal::MissingKey { .. })),
        "{refused:?}"
    );
    // The owner has no instance in rotation: no endpoint, not another cell.
    let refused = table.decide_call(bank, &get_own, None, None, &|c: CellId| c != cell("rz00"));
    assert!(
        matches!(refused, Err(Refusal::NoEndpoint { cell: Some(c), .. }) if c == cell("rz00")),
        "{refused:?}"
    );
    // A local service: the caller's own cell when it serves (rz01 is in
    // hz-b, not this table's zone), else this zone's.
    let call = table
        .decide_call(web, &get_none, None, Some(cell("rz01")), &all)
        .expect("routed");
    assert_eq!(call.cell, cell("rz01"));
    let call = table
        .decide_call(web, &get_none, None, Some(cell("rz01")), &|c: CellId| {
            c != cell("rz01")
        })
        .expect("routed");
    assert_eq!(
        table.cells[usize::from(call.cell)].zone,
        table.cells[usize::from(cell("rz00"))].zone,
        "a cell of the table's zone next"
    );
    assert!(table.is_write(bank, &Method::POST));
    assert!(!table.is_write(bank, &Method::GET));
}
