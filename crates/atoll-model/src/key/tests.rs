use super::*;
use proptest::prelude::*;

struct Request {
    headers: Vec<(&'static str, String)>,
    path: String,
    query: Option<String>,
    body: Option<Vec<u8>>,
}

impl Request {
    fn new(path: &str) -> Self {
        Request {
            headers: Vec::new(),
            path: path.to_owned(),
            query: None,
            body: None,
        }
    }
}

impl RequestView for Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
    fn cookie(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| *n == "cookie")
            .find_map(|(_, v)| cookie_value(v, name))
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
    fn body(&self) -> Option<&[u8]> {
        self.body.as_deref()
    }
}

fn rule(sources: Vec<KeySource>, transform: Transform, shards: u32) -> KeyRule {
    KeyRule::new(
        shards,
        &KeySpec {
            sources,
            transform,
            on_missing: OnMissing::Reject,
        },
    )
    .expect("valid rule")
}

#[test]
fn decimal_suffix_takes_the_last_digits() {
    let t = Transform::DecimalSuffix(2);
    assert_eq!(shard_of(&t, 100, b"2088000000000007"), Ok(7));
    assert_eq!(shard_of(&t, 100, b"user42"), Ok(42));
    assert_eq!(shard_of(&t, 100, b"7"), Ok(7));
    assert_eq!(shard_of(&t, 100, b"007"), Ok(7));
    // Fewer shards than the suffix can address: the suffix is taken modulo.
    assert_eq!(shard_of(&t, 50, b"99"), Ok(49));
    assert!(matches!(
        shard_of(&t, 100, b"user4x"),
        Err(KeyError::NotDecimalSuffix { .. })
    ));
    assert!(matches!(
        shard_of(&t, 100, b"x4"),
        Err(KeyError::NotDecimalSuffix { .. })
    ));
}

#[test]
fn mod_reads_the_whole_key_as_a_number() {
    let t = Transform::Mod(100);
    assert_eq!(shard_of(&t, 100, b"12345"), Ok(45));
    assert_eq!(shard_of(&t, 100, b"0000045"), Ok(45));
    // 2^128 + 1 does not fit any integer type; it is still reduced exactly.
    assert_eq!(
        shard_of(&t, 100, b"340282366920938463463374607431768211457"),
        Ok(57)
    );
    assert!(matches!(
        shard_of(&t, 100, b"-5"),
        Err(KeyError::NotDecimal { .. })
    ));
    assert!(matches!(
        shard_of(&t, 100, b" 5"),
        Err(KeyError::NotDecimal { .. })
    ));
}

#[test]
fn hash_test_vectors_never_change() {
    // These values are published in docs/sharding.md for other languages.
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    assert_eq!(hash(HashName::Xxh3, b""), 0x2d06_8005_38d3_94c2);
    assert_eq!(
        shard_of(&Transform::Hash(HashName::Fnv1a64), 1000, b"u-1001"),
        Ok(u32::try_from(fnv1a64(b"u-1001") % 1000).expect("small"))
    );
}

#[test]
fn keys_with_control_characters_are_refused() {
    for key in [&b"1\r\nX-Injected: yes"[..], b"12\x00", b"\t42", b"4\x7f2"] {
        for t in [
            Transform::Hash(HashName::Fnv1a64),
            Transform::Mod(10),
            Transform::DecimalSuffix(2),
        ] {
            assert_eq!(shard_of(&t, 10, key), Err(KeyError::Control), "{key:?}");
        }
    }
}

#[test]
fn empty_and_oversized_keys_are_refused() {
    let t = Transform::Hash(HashName::Fnv1a64);
    assert_eq!(shard_of(&t, 10, b""), Err(KeyError::Empty));
    let long = vec![b'1'; MAX_KEY_LEN + 1];
    assert_eq!(
        shard_of(&t, 10, &long),
        Err(KeyError::TooLong {
            len: MAX_KEY_LEN + 1
        })
    );
}

#[test]
fn sources_are_tried_in_order_and_empty_values_skipped() {
    let r = rule(
        vec![
            KeySource::Header("X-User-Id".into()),
            KeySource::Cookie("uid".into()),
            KeySource::Query("uid".into()),
            KeySource::Path("/users/{uid}".into()),
            KeySource::Body("payer.id".into()),
        ],
        Transform::DecimalSuffix(2),
        100,
    );
    let mut request = Request::new("/users/1234/accounts");
    assert_eq!(request.path(), "/users/1234/accounts");
    assert_eq!(r.extract(&request).as_deref(), Some("1234"));
    request.query = Some("a=1&uid=5%36".into());
    assert_eq!(r.extract(&request).as_deref(), Some("56"));
    request
        .headers
        .push(("cookie", "theme=dark; uid=\"777\"".into()));
    assert_eq!(r.extract(&request).as_deref(), Some("777"));
    request.headers.push(("x-user-id", String::new()));
    assert_eq!(
        r.extract(&request).as_deref(),
        Some("777"),
        "empty header skipped"
    );
}

#[test]
fn body_fields_accept_strings_and_integers() {
    assert_eq!(
        json_field(br#"{"payer":{"id":"42"}}"#, "payer.id").as_deref(),
        Some("42")
    );
    assert_eq!(
        json_field(br#"{"payer":{"id":42}}"#, "payer.id").as_deref(),
        Some("42")
    );
    assert_eq!(json_field(br#"{"payer":{"id":4.2}}"#, "payer.id"), None);
    assert_eq!(
        json_field(br#"{"list":["a","b"]}"#, "list.1").as_deref(),
        Some("b")
    );
    assert_eq!(json_field(b"not json", "payer.id"), None);
}

#[test]
fn outcomes_distinguish_missing_from_invalid() {
    let r = rule(
        vec![KeySource::Header("x-user-id".into())],
        Transform::Mod(10),
        10,
    );
    let mut request = Request::new("/");
    assert_eq!(r.route(&request), KeyOutcome::Missing(OnMissing::Reject));
    request.headers.push(("x-user-id", "abc".into()));
    assert!(matches!(
        r.route(&request),
        KeyOutcome::Invalid(KeyError::NotDecimal { .. })
    ));
    request.headers[0].1 = "1234".into();
    assert_eq!(
        r.route(&request),
        KeyOutcome::Shard {
            key: "1234".into(),
            shard: 4
        }
    );
}

#[test]
fn path_templates() {
    let t = PathTemplate::parse("/v1/*/users/{uid}").expect("valid");
    assert_eq!(t.capture("/v1/x/users/42").as_deref(), Some("42"));
    assert_eq!(t.capture("/v1/x/users/42/more").as_deref(), Some("42"));
    assert_eq!(t.capture("/v1/x/users/a%20b").as_deref(), Some("a b"));
    assert_eq!(t.capture("/v2/x/users/42"), None);
    assert_eq!(t.capture("/v1/x/users"), None);
    assert!(PathTemplate::parse("users/{id}").is_err());
    assert!(PathTemplate::parse("/users/{a}/{b}").is_err());
    assert!(PathTemplate::parse("/users").is_err());
    assert!(PathTemplate::parse("/users/x{id}").is_err());
}

proptest! {
    #[test]
    fn every_transform_stays_in_range(key in proptest::collection::vec(any::<u8>(), 0..300), shards in 1u32..100_000) {
        for t in [Transform::DecimalSuffix(5), Transform::Mod(u64::from(shards)), Transform::Hash(HashName::Fnv1a64), Transform::Hash(HashName::Xxh3)] {
            if let Ok(shard) = shard_of(&t, shards, &key) {
                prop_assert!(shard < shards);
            }
        }
    }

    #[test]
    fn decimal_suffix_matches_arithmetic(id in any::<u64>(), digits in 1u32..=9, pad in 0usize..5) {
        let shards = 10u32.pow(digits);
        let key = format!("{}{id}", "0".repeat(pad));
        let expected = id % u64::from(shards);
        // A key shorter than the suffix is read whole; leading zeros change nothing.
        prop_assert_eq!(shard_of(&Transform::DecimalSuffix(digits), shards, key.as_bytes()), Ok(u32::try_from(expected).expect("small")));
    }

    #[test]
    fn decimal_suffix_ignores_everything_before_the_suffix(prefix in "[a-z0-9-]{0,20}", suffix in "[0-9]{2}") {
        let key = format!("{prefix}{suffix}");
        let expected: u32 = suffix.parse().expect("digits");
        prop_assert_eq!(shard_of(&Transform::DecimalSuffix(2), 100, key.as_bytes()), Ok(expected));
    }

    #[test]
    fn mod_matches_arithmetic_and_ignores_leading_zeros(id in any::<u64>(), modulus in 1u64..1_000_000, pad in 0usize..30) {
        let shards = u32::try_from(modulus).expect("small");
        let key = format!("{}{id}", "0".repeat(pad));
        prop_assert_eq!(shard_of(&Transform::Mod(modulus), shards, key.as_bytes()), Ok(u32::try_from(id % modulus).expect("small")));
    }

    #[test]
    fn mod_of_huge_numbers_agrees_with_concatenation(high in any::<u64>(), low in 0u64..1_000_000_000_000_000_000, modulus in 1u64..100_000) {
        // (high * 10^18 + low) mod m, computed with u128 arithmetic.
        let key = format!("{high}{low:018}");
        let expected = (u128::from(high) * 1_000_000_000_000_000_000 + u128::from(low)) % u128::from(modulus);
        let shards = u32::try_from(modulus).expect("small");
        prop_assert_eq!(shard_of(&Transform::Mod(modulus), shards, key.as_bytes()), Ok(u32::try_from(expected).expect("small")));
    }

    #[test]
    fn non_digits_are_invalid_for_mod(key in "[0-9]{0,5}[^0-9][0-9a-z]{0,5}") {
        prop_assert!(
            matches!(shard_of(&Transform::Mod(10), 10, key.as_bytes()), Err(KeyError::NotDecimal { .. } | KeyError::Control)),
            "non-digit key {:?} must be refused", key
        );
    }

    #[test]
    fn fnv_matches_an_independent_implementation(key in proptest::collection::vec(0x20u8..=0xff, 1..200), shards in 1u32..10_000) {
        let key: Vec<u8> = key.into_iter().filter(|b| *b != 0x7f).chain([b'k']).collect();
        // FNV-1a as its authors define it, byte by byte, in 128-bit arithmetic.
        let mut expected: u128 = 0xcbf2_9ce4_8422_2325;
        for byte in &key {
            expected ^= u128::from(*byte);
            expected = (expected * 0x0000_0100_0000_01b3) % (1u128 << 64);
        }
        let expected = u32::try_from(expected % u128::from(shards)).expect("small");
        prop_assert_eq!(shard_of(&Transform::Hash(HashName::Fnv1a64), shards, &key), Ok(expected));
    }

    #[test]
    fn parsers_never_panic(text in "\\PC{0,80}", name in "[a-z]{1,5}") {
        let _ = cookie_value(&text, &name);
        let _ = query_value(&text, &name);
        let _ = json_field(text.as_bytes(), &name);
        if let Ok(t) = PathTemplate::parse(&text) {
            let _ = t.capture(&text);
        }
    }

    #[test]
    fn query_values_round_trip(value in "[a-zA-Z0-9 ]{1,20}") {
        let encoded = value.replace(' ', "+");
        let query = format!("x=1&uid={encoded}&uid=other");
        let found = query_value(&query, "uid");
        prop_assert_eq!(found.as_deref(), Some(value.as_str()));
    }
}
