//! Property-based fuzzing of the Bolt v1 decoder: any bytes, split
//! anywhere, never panic and never loop; any frame round-trips however
//! its bytes arrive.

use atoll_bolt::{Frame, Headers, Kind, Limits, decode};
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

fn frames() -> impl Strategy<Value = Frame> {
    (
        prop_oneof![
            Just(Kind::Request),
            Just(Kind::Oneway),
            Just(Kind::Response)
        ],
        any::<bool>(),
        any::<u32>(),
        any::<u32>(),
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(("[a-z.-]{0,12}", "\\PC{0,16}"), 0..6),
        proptest::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(
            |(kind, heartbeat, id, timeout, status, class, headers, content)| Frame {
                kind,
                cmd_code: match (heartbeat, kind) {
                    (true, _) => atoll_bolt::CMD_HEARTBEAT,
                    (false, Kind::Response) => atoll_bolt::CMD_RESPONSE,
                    (false, _) => atoll_bolt::CMD_REQUEST,
                },
                version: 1,
                request_id: id,
                codec: 1,
                timeout_ms: if kind == Kind::Response { 0 } else { timeout },
                status: if kind == Kind::Response { status } else { 0 },
                class: Bytes::from(class),
                header: Headers(headers).encode(),
                content: Bytes::from(content),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_are_a_frame_an_error_or_a_wait(bytes in proptest::collection::vec(any::<u8>(), 0..256), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        // Mostly valid prefixes too: a Bolt protocol byte first.
        for start in [None, Some(1u8)] {
            let mut buf = BytesMut::new();
            if let Some(first) = start { buf.extend_from_slice(&[first]); }
            buf.extend_from_slice(&bytes);
            buf.extend_from_slice(&tail);
            let limits = Limits { max_content: 4096, max_headers: 64 };
            for _ in 0..32 {
                let before = buf.len();
                match decode(&mut buf, &limits) {
                    Ok(Some(frame)) => prop_assert_eq!(before - buf.len(), frame.encoded_len()),
                    Ok(None) => { prop_assert_eq!(buf.len(), before); break; }
                    Err(_) => break,
                }
            }
        }
    }

    #[test]
    fn any_frame_round_trips_however_it_arrives(frame in frames(), cuts in proptest::collection::vec(1usize..64, 0..8)) {
        let mut wire = BytesMut::new();
        frame.encode(&mut wire).expect("encodes");
        let wire = wire.freeze();
        let limits = Limits::default();
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut decoded = None;
        for cut in cuts.iter().copied().chain(std::iter::repeat(wire.len())) {
            let next = (fed + cut).min(wire.len());
            buf.extend_from_slice(&wire[fed..next]);
            fed = next;
            if let Some(frame) = decode(&mut buf, &limits).expect("valid") {
                decoded = Some(frame);
                break;
            }
            prop_assert!(fed < wire.len(), "all bytes fed, no frame");
        }
        prop_assert_eq!(decoded.as_ref(), Some(&frame));
        prop_assert!(buf.is_empty());
        let headers = frame.headers().expect("a map we wrote");
        prop_assert_eq!(Headers(headers.0.clone()).encode(), frame.header.clone());
    }
}
