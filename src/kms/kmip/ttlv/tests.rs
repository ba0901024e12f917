use super::*;
use proptest::prelude::*;

pub(crate) fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn kmip_spec_examples_encode_exactly() {
    // KMIP 1.4 section 9.1.2 examples.
    let cases: Vec<(Ttlv, &str)> = vec![
        (
            Ttlv::integer(0x420020, 8),
            "42002002000000040000000800000000",
        ),
        (
            Ttlv::long(0x420020, 123456789000000000),
            "420020030000000801B69B4BA5749200",
        ),
        (
            Ttlv::new(
                0x420020,
                Value::BigInteger(Zeroizing::new(unhex("0000000003FD35EB6BC2DF4618080000"))),
            ),
            "42002004000000100000000003FD35EB6BC2DF4618080000",
        ),
        (
            Ttlv::enumeration(0x420020, 255),
            "4200200500000004000000FF00000000",
        ),
        (
            Ttlv::boolean(0x420020, true),
            "42002006000000080000000000000001",
        ),
        (
            Ttlv::text(0x420020, "Hello World"),
            "420020070000000B48656C6C6F20576F726C640000000000",
        ),
        (
            Ttlv::bytes(0x420020, &[1, 2, 3]),
            "42002008000000030102030000000000",
        ),
        (
            Ttlv::datetime(0x420020, 0x47DA67F8),
            "42002009000000080000000047DA67F8",
        ),
        (
            Ttlv::new(0x420020, Value::Interval(864000)),
            "4200200A00000004000D2F0000000000",
        ),
        (
            Ttlv::structure(
                0x420020,
                vec![
                    Ttlv::enumeration(0x420004, 254),
                    Ttlv::integer(0x420005, 255),
                ],
            ),
            "42002001000000204200040500000004000000FE000000004200050200000004000000FF00000000",
        ),
    ];
    for (item, want) in cases {
        let bytes = item.to_bytes();
        assert_eq!(bytes.as_slice(), unhex(want).as_slice(), "{item:?}");
        assert_eq!(Ttlv::decode(&bytes).unwrap(), item);
    }
}

#[test]
fn debug_redacts_bytes_and_passwords() {
    let t = Ttlv::structure(
        tag::CREDENTIAL_VALUE,
        vec![
            Ttlv::text(tag::USERNAME, "alice"),
            Ttlv::text(tag::PASSWORD, "hunter2"),
            Ttlv::bytes(tag::KEY_MATERIAL, &[0xAB; 32]),
        ],
    );
    let s = format!("{t:?}");
    assert!(
        s.contains("alice") && s.contains("<32 bytes>") && s.contains("<redacted>"),
        "{s}"
    );
    assert!(
        !s.contains("hunter2") && !s.to_lowercase().contains("ab, ab") && !s.contains("171"),
        "{s}"
    );
}

#[test]
fn malformed_input_gives_errors() {
    let good = Ttlv::structure(
        tag::REQUEST_PAYLOAD,
        vec![
            Ttlv::text(tag::UNIQUE_IDENTIFIER, "12"),
            Ttlv::integer(tag::BATCH_COUNT, 1),
        ],
    )
    .to_bytes();
    // Every truncation fails.
    for n in 0..good.len() {
        assert!(Ttlv::decode(&good[..n]).is_err(), "prefix {n}");
    }
    // Trailing garbage.
    let mut long = good.to_vec();
    long.extend_from_slice(&[0; 8]);
    assert!(matches!(
        Ttlv::decode(&long),
        Err(TtlvError::Trailing { count: 8 })
    ));
    // Integer with length 8.
    let e = Ttlv::decode(&unhex("42002002000000080000000800000000")).unwrap_err();
    assert!(matches!(e, TtlvError::BadLength { .. }), "{e}");
    // Unknown type 0x0b.
    let e = Ttlv::decode(&unhex("4200200B000000040000000800000000")).unwrap_err();
    assert!(matches!(e, TtlvError::BadType { ty: 0x0b, .. }), "{e}");
    // Boolean 2.
    let e = Ttlv::decode(&unhex("42002006000000080000000000000002")).unwrap_err();
    assert!(matches!(e, TtlvError::BadBoolean { .. }), "{e}");
    // Invalid UTF-8.
    let e = Ttlv::decode(&unhex("4200200700000002FFFE000000000000")).unwrap_err();
    assert!(matches!(e, TtlvError::BadUtf8 { .. }), "{e}");
    // Structure length that is not a multiple of 8 / overruns the buffer.
    assert!(Ttlv::decode(&unhex("4200200100000004")).is_err());
    assert!(Ttlv::decode(&unhex("42002001FFFFFFF8")).is_err());
    // Child overruns its parent structure.
    let e = Ttlv::decode(&unhex(
        "42002001000000084200200800000010000000000000000000000000000000000000000000000000",
    ));
    assert!(e.is_err());
    // Absurd nesting.
    let mut deep = Ttlv::integer(1, 1);
    for _ in 0..(MAX_DEPTH + 2) {
        deep = Ttlv::structure(0x420020, vec![deep]);
    }
    assert_eq!(Ttlv::decode(&deep.to_bytes()), Err(TtlvError::TooDeep));
}

#[test]
fn navigation_errors_name_the_tag() {
    let t = Ttlv::structure(
        tag::RESPONSE_PAYLOAD,
        vec![Ttlv::integer(tag::UNIQUE_IDENTIFIER, 5)],
    );
    let e = t.child(tag::DATA).unwrap_err().to_string();
    assert!(e.contains("Data") && e.contains("ResponsePayload"), "{e}");
    let e = t
        .child(tag::UNIQUE_IDENTIFIER)
        .unwrap()
        .as_text()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("UniqueIdentifier") && e.contains("Integer"),
        "{e}"
    );
}

fn arb_ttlv() -> impl Strategy<Value = Ttlv> {
    let leaf = prop_oneof![
        any::<i32>().prop_map(|v| Ttlv::integer(0x420001, v)),
        any::<i64>().prop_map(|v| Ttlv::long(0x420002, v)),
        any::<u32>().prop_map(|v| Ttlv::enumeration(0x420003, v)),
        any::<bool>().prop_map(|v| Ttlv::boolean(0x420004, v)),
        ".{0,20}".prop_map(|s| Ttlv::text(0x420005, &s)),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| Ttlv::bytes(0x420006, &b)),
        any::<i64>().prop_map(|v| Ttlv::datetime(0x420007, v)),
        any::<u32>().prop_map(|v| Ttlv::new(0x420008, Value::Interval(v))),
        proptest::collection::vec(any::<u8>(), 1..4)
            .prop_map(|b| Ttlv::new(0x420009, Value::BigInteger(Zeroizing::new(b.repeat(8))))),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        proptest::collection::vec(inner, 0..6).prop_map(|v| Ttlv::structure(0x420010, v))
    })
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Ttlv::decode(&bytes);
    }

    #[test]
    fn random_bytes_with_valid_prefix_never_panic(
        ty in 1u8..12, len in any::<u32>(), rest in proptest::collection::vec(any::<u8>(), 0..256)
    ) {
        let mut b = vec![0x42, 0x00, 0x7b, ty];
        b.extend_from_slice(&(len % 300).to_be_bytes());
        b.extend_from_slice(&rest);
        let _ = Ttlv::decode(&b);
    }

    #[test]
    fn encode_decode_roundtrip(t in arb_ttlv()) {
        let bytes = t.to_bytes();
        prop_assert_eq!(bytes.len() % 8, 0);
        prop_assert_eq!(Ttlv::decode(&bytes).unwrap(), t);
    }

    #[test]
    fn bit_flips_never_panic(t in arb_ttlv(), pos in any::<usize>(), bit in 0u8..8) {
        let mut bytes = t.to_bytes().to_vec();
        if !bytes.is_empty() {
            let i = pos % bytes.len();
            bytes[i] ^= 1 << bit;
        }
        let _ = Ttlv::decode(&bytes);
    }
}
