//! The routing decision for a unitized request with the key in a header:
//! route match, key extraction, shard, owner cell, endpoint. A 10,000-shard
//! map over 100 cells. Goal: under 100 ns. Run: `cargo bench -p atoll-routing`.

use std::hint::black_box;

use atoll_model::Resource;
use atoll_routing::{AllAvailable, Decision, RequestInfo, RoutingTable, Scope};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};

fn table() -> RoutingTable {
    let mut text = String::from(
        "apiVersion: atoll/v1\nkind: Region\nmetadata: {name: r}\n---\napiVersion: atoll/v1\nkind: Zone\nmetadata: {name: z}\nspec: {region: r}\n",
    );
    for cell in 0..100 {
        text += &format!(
            "---\napiVersion: atoll/v1\nkind: Cell\nmetadata: {{name: c{cell}}}\nspec: {{zone: z, type: rzone}}\n"
        );
    }
    text += "---\napiVersion: atoll/v1\nkind: ShardRule\nmetadata: {name: users}\nspec:\n  shards: 10000\n  key: {sources: [{header: x-user-id}], transform: {decimalSuffix: 4}}\n";
    text += "---\napiVersion: atoll/v1\nkind: ShardMap\nmetadata: {name: users}\nspec:\n  rule: users\n  assignments:\n";
    for cell in 0..100 {
        text += &format!(
            "    - {{shards: \"{}-{}\", cell: c{cell}}}\n",
            cell * 100,
            cell * 100 + 99
        );
    }
    text += "---\napiVersion: atoll/v1\nkind: Service\nmetadata: {name: bank}\nspec:\n  kind: unitized\n  shardRule: users\n  endpoints:\n";
    for cell in 0..100 {
        text += &format!(
            "    - {{cell: c{cell}, address: \"10.0.{cell}.1:80\"}}\n    - {{cell: c{cell}, address: \"10.0.{cell}.2:80\"}}\n"
        );
    }
    text += "---\napiVersion: atoll/v1\nkind: Route\nmetadata: {name: bank}\nspec: {match: [{pathPrefix: /api/}], service: bank}\n";
    text += "---\napiVersion: atoll/v1\nkind: Gateway\nmetadata: {name: gw}\nspec: {zone: z, listeners: [{port: 80, protocol: http}]}\n";
    let resources: Vec<Resource> = atoll_model::load("bench.yaml", &text)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .map(|l| l.resource)
        .collect();
    RoutingTable::compile(
        1,
        &resources,
        &Scope {
            zone: "z".into(),
            gateway: Some("gw".into()),
            peer_tls: false,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn decision(c: &mut Criterion) {
    let table = table();
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("bank.example"));
    headers.insert("user-agent", HeaderValue::from_static("wrk"));
    headers.insert("x-user-id", HeaderValue::from_static("2088000000004217"));
    let method = Method::GET;
    c.bench_function("route+decide (header key, 10k shards, 100 cells)", |b| {
        b.iter(|| {
            let info = RequestInfo {
                method: &method,
                host: Some("bank.example"),
                path: black_box("/api/balance"),
                query: None,
                headers: black_box(&headers),
                body: None,
                forwarded: false,
            };
            let route = table.match_route(&info).unwrap_or_default();
            match table.decide(route, &info, &AllAvailable) {
                Decision::Upstream(target) => black_box(target.endpoint),
                Decision::Refuse(_) => 0,
            }
        })
    });
}

criterion_group!(benches, decision);
criterion_main!(benches);
