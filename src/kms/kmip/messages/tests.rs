use super::super::ttlv::{Ttlv, tag};
use super::request::protocol_version;
use super::*;
use crate::crypto::keys::Secret;

/// Parses kmip-1.4-ttlv-samples.txt (copied verbatim below) into
/// `(section title, request bytes, response bytes)`.
fn samples() -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let text = include_str!("../testdata/kmip-1.4-ttlv-samples.txt");
    let mut out = Vec::new();
    let mut title = String::new();
    let mut req = None;
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        if let Some(t) = l.strip_prefix("## ") {
            title = t.to_string();
        } else if l.starts_with("request (") {
            req = Some(unhex(lines.next().unwrap()));
        } else if l.starts_with("response (") {
            out.push((
                title.clone(),
                req.take().unwrap(),
                unhex(lines.next().unwrap()),
            ));
        }
    }
    out
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.trim().len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn sample(prefix: &str) -> (Vec<u8>, Ttlv) {
    let (_, req, resp) = samples()
        .into_iter()
        .find(|s| s.0.starts_with(prefix))
        .unwrap();
    (req, Ttlv::decode(&resp).unwrap())
}

fn uid_payload() -> Vec<Ttlv> {
    uid_only("1")
}

#[test]
fn all_captured_samples_decode_and_reencode_identically() {
    let s = samples();
    assert_eq!(s.len(), 8);
    for (title, req, resp) in s {
        for bytes in [&req, &resp] {
            let t = Ttlv::decode(bytes).unwrap_or_else(|e| panic!("{title}: {e}"));
            assert_eq!(t.to_bytes().as_slice(), bytes.as_slice(), "{title}");
        }
    }
}

#[test]
fn our_requests_match_captured_bytes() {
    let (req, _) = sample("Locate");
    // The capture has only the Name attribute; ours adds Object Type first.
    let mut payload = locate_by_name("kmfs-ttlv-sample");
    payload.remove(0);
    assert_eq!(
        request(Operation::Locate, payload, None)
            .to_bytes()
            .as_slice(),
        req.as_slice()
    );

    let (req, _) = sample("Encrypt");
    let iv: Vec<u8> = (0..12).collect();
    let p = encrypt_gcm("1", &[0u8; 32], Some(&iv), b"kmfs");
    assert_eq!(
        request(Operation::Encrypt, p, None).to_bytes().as_slice(),
        req.as_slice()
    );

    let (req, _) = sample("Decrypt");
    let ct = unhex("4702d61bc5e5c21b8d41978bb1e9786d83d68734f07b5f7c3867e5851d6900b2");
    let tg = unhex("0f17a25dfef4b0a200ae855ec0f99dda");
    let p = decrypt_gcm("1", &ct, &iv, b"kmfs", &tg);
    assert_eq!(
        request(Operation::Decrypt, p, None).to_bytes().as_slice(),
        req.as_slice()
    );

    let (req, _) = sample("Revoke");
    assert_eq!(
        request(Operation::Revoke, revoke("1"), None)
            .to_bytes()
            .as_slice(),
        req.as_slice()
    );
    let (req, _) = sample("DiscoverVersions");
    assert_eq!(
        request(Operation::DiscoverVersions, discover_versions(), None)
            .to_bytes()
            .as_slice(),
        req.as_slice()
    );
    let (req, _) = sample("Get");
    assert_eq!(
        request(Operation::Get, uid_payload(), None)
            .to_bytes()
            .as_slice(),
        req.as_slice()
    );
}

#[test]
fn create_request_matches_capture_except_mask() {
    let (req, _) = sample("Create");
    let mut ours = request(Operation::Create, create_aes256("kmfs-ttlv-created"), None).to_bytes();
    // The capture used mask Encrypt|Decrypt (0x0c); kmfs adds Wrap|Unwrap (0x3c).
    let pos = ours.windows(4).position(|w| w == [0, 0, 0, 0x3c]).unwrap();
    ours[pos + 3] = 0x0c;
    assert_eq!(ours.as_slice(), req.as_slice());
}

#[test]
fn captured_responses_parse() {
    let (_, r) = sample("Create");
    assert_eq!(
        parse_uid(&parse_response(&r, Operation::Create).unwrap()).unwrap(),
        "2"
    );
    let (_, r) = sample("Locate");
    assert_eq!(
        parse_uids(&parse_response(&r, Operation::Locate).unwrap()).unwrap(),
        ["1"]
    );
    let (_, r) = sample("Encrypt");
    let e = parse_encrypt(&parse_response(&r, Operation::Encrypt).unwrap()).unwrap();
    assert_eq!(
        e.data,
        unhex("4702d61bc5e5c21b8d41978bb1e9786d83d68734f07b5f7c3867e5851d6900b2")
    );
    assert_eq!(e.tag.unwrap(), unhex("0f17a25dfef4b0a200ae855ec0f99dda"));
    assert!(e.iv.is_none());
    let (_, r) = sample("Decrypt");
    let d = parse_data_secret(&parse_response(&r, Operation::Decrypt).unwrap()).unwrap();
    assert_eq!(d.as_bytes(), &[0u8; 32]);
    let (_, r) = sample("Get");
    let k = parse_get_symmetric_key(&parse_response(&r, Operation::Get).unwrap()).unwrap();
    assert_eq!(k.as_bytes(), (0u8..32).collect::<Vec<_>>().as_slice());
    let (_, r) = sample("Revoke");
    assert_eq!(
        parse_uid(&parse_response(&r, Operation::Revoke).unwrap()).unwrap(),
        "1"
    );
    let (_, r) = sample("DiscoverVersions");
    let v = parse_versions(&parse_response(&r, Operation::DiscoverVersions).unwrap()).unwrap();
    assert_eq!(v, ["2.0", "1.4", "1.3", "1.2", "1.1", "1.0"]);
}

#[test]
fn wrong_operation_and_failures_are_reported() {
    let (_, r) = sample("Locate");
    let e = parse_response(&r, Operation::Get).unwrap_err();
    assert!(matches!(e, ResponseError::Malformed(_)), "{e}");
    let fail = Ttlv::structure(
        tag::RESPONSE_MESSAGE,
        vec![
            Ttlv::structure(
                tag::RESPONSE_HEADER,
                vec![
                    protocol_version(),
                    Ttlv::datetime(tag::TIME_STAMP, 1),
                    Ttlv::integer(tag::BATCH_COUNT, 1),
                ],
            ),
            Ttlv::structure(
                tag::BATCH_ITEM,
                vec![
                    Ttlv::enumeration(tag::OPERATION, Operation::Decrypt as u32),
                    Ttlv::enumeration(tag::RESULT_STATUS, 1),
                    Ttlv::enumeration(tag::RESULT_REASON, reason::PERMISSION_DENIED),
                    Ttlv::text(tag::RESULT_MESSAGE, "Not\nallowed"),
                ],
            ),
        ],
    );
    let bytes = fail.to_bytes();
    let e = parse_response(&Ttlv::decode(&bytes).unwrap(), Operation::Decrypt).unwrap_err();
    assert_eq!(e.to_string(), "PERMISSION_DENIED: Not allowed");
}

#[test]
fn credential_is_encoded_before_batch_count_and_redacted() {
    let pw = Secret::from_slice(b"s3cret");
    let cred = Credential {
        username: "kmfs",
        password: Some(&pw),
    };
    let r = request(Operation::Query, query_server_information(), Some(&cred));
    let hdr = r.child(tag::REQUEST_HEADER).unwrap().items().unwrap();
    assert_eq!(hdr[1].tag, tag::AUTHENTICATION);
    assert_eq!(hdr[2].tag, tag::BATCH_COUNT);
    assert!(!format!("{r:?}").contains("s3cret"));
    let bytes = r.to_bytes();
    assert!(bytes.windows(6).any(|w| w == b"s3cret"));
}
