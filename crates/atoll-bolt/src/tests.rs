use super::*;

fn request() -> Frame {
    Frame {
        kind: Kind::Request,
        cmd_code: CMD_REQUEST,
        version: 1,
        request_id: 7,
        codec: 1,
        timeout_ms: 3000,
        status: 0,
        class: Bytes::from_static(b"java.lang.String"),
        header: Headers(vec![
            ("service".into(), "bank".into()),
            ("x-user-id".into(), "30".into()),
        ])
        .encode(),
        content: Bytes::from_static(b"\x05hello"),
    }
}

#[test]
fn a_request_round_trips_and_its_fixed_part_is_22_bytes() {
    let frame = request();
    let mut out = BytesMut::new();
    frame.encode(&mut out).expect("encodes");
    assert_eq!(out.len(), frame.encoded_len());
    assert_eq!(&out[..2], &[1, 1]);
    // classLen right after the 4-byte timeout: byte 14.
    assert_eq!(u16::from_be_bytes([out[14], out[15]]), 16);
    let decoded = decode(&mut out, &Limits::default())
        .expect("valid")
        .expect("whole");
    assert_eq!(decoded, frame);
    assert!(out.is_empty());
    let headers = decoded.headers().expect("map");
    assert_eq!(headers.get("service"), Some("bank"));
    assert_eq!(headers.get_ignore_case("X-User-Id"), Some("30"));
}

#[test]
fn a_frame_cut_anywhere_waits_for_the_rest_and_consumes_nothing() {
    let mut whole = BytesMut::new();
    request().encode(&mut whole).expect("encodes");
    for cut in 0..whole.len() {
        let mut part = BytesMut::from(&whole[..cut]);
        assert_eq!(
            decode(&mut part, &Limits::default()),
            Ok(None),
            "cut at {cut}"
        );
        assert_eq!(part.len(), cut);
    }
}

#[test]
fn two_frames_in_one_read_come_out_one_by_one() {
    let mut out = BytesMut::new();
    let first = request();
    let second = first.answer(status::SUCCESS, &Headers::default());
    first.encode(&mut out).expect("encodes");
    second.encode(&mut out).expect("encodes");
    let limits = Limits::default();
    assert_eq!(decode(&mut out, &limits), Ok(Some(first)));
    let answered = decode(&mut out, &limits).expect("valid").expect("whole");
    assert_eq!(answered.kind, Kind::Response);
    assert_eq!(answered.request_id, 7);
    assert_eq!(answered.cmd_code, CMD_RESPONSE);
    assert_eq!(decode(&mut out, &limits), Ok(None));
}

#[test]
fn bad_bytes_say_what_is_wrong() {
    let limits = Limits::default();
    let mut other = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
    let error = decode(&mut other, &limits).expect_err("not bolt");
    assert!(error.to_string().contains("0x47"), "{error}");
    let mut v2 = BytesMut::from(&[2u8, 1][..]);
    assert_eq!(decode(&mut v2, &limits), Err(BoltError::Protocol(2)));
    let mut wrong_type = BytesMut::from(&[1u8, 9][..]);
    assert_eq!(decode(&mut wrong_type, &limits), Err(BoltError::Type(9)));

    let mut big = BytesMut::new();
    let mut frame = request();
    frame.content = Bytes::from(vec![0u8; 2048]);
    frame.encode(&mut big).expect("encodes");
    let small = Limits {
        max_content: 1024,
        ..Limits::default()
    };
    assert_eq!(
        decode(&mut big, &small),
        Err(BoltError::TooLarge(2048, 1024))
    );

    let mut negative = BytesMut::new();
    request().encode(&mut negative).expect("encodes");
    negative[18] = 0xff; // contentLen's top byte
    let error = decode(&mut negative, &limits).expect_err("negative");
    assert!(error.to_string().contains("contentLen"), "{error}");

    let mut torn = request();
    torn.header = Bytes::from_static(&[0, 0, 0, 9, b'a']);
    let mut out = BytesMut::new();
    torn.encode(&mut out).expect("encodes");
    let error = decode(&mut out, &limits).expect_err("torn header");
    assert!(
        error.to_string().contains("header map at byte 0"),
        "{error}"
    );
}

#[test]
fn a_heartbeat_is_answered_with_a_heartbeat_ack() {
    let heartbeat = Frame {
        cmd_code: CMD_HEARTBEAT,
        class: Bytes::new(),
        header: Bytes::new(),
        content: Bytes::new(),
        ..request()
    };
    let ack = heartbeat.answer(status::SUCCESS, &Headers::default());
    assert_eq!(ack.kind, Kind::Response);
    assert_eq!(ack.cmd_code, CMD_HEARTBEAT);
    let mut out = BytesMut::new();
    ack.encode(&mut out).expect("encodes");
    assert_eq!(out.len(), RESPONSE_HEADER_LEN);
}
