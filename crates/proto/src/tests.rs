use super::*;

fn p(s: &str) -> RelPath {
    RelPath::parse(s.as_bytes()).expect("valid path")
}

#[test]
fn relpath_rejects_escapes() {
    for bad in ["..", "a/../b", "/abs", "a//b", ".", "a/./b", "a/"] {
        assert!(
            RelPath::parse(bad.as_bytes()).is_err(),
            "{bad} must be refused"
        );
    }
    assert!(RelPath::parse(b"a\0b").is_err());
    assert!(RelPath::from_components(vec![b"x/y".to_vec()]).is_err());
    assert!(RelPath::from_components(vec![vec![b'a'; 256]]).is_err());
    assert!(p("a/b").join(b"..").is_err());
    // Non-UTF-8 is fine.
    assert!(RelPath::from_components(vec![vec![0xff, 0xfe]]).is_ok());
}

#[test]
fn relpath_deserialisation_validates() {
    // A hostile peer can hand-craft the postcard bytes of ["..", "etc"].
    let raw: Vec<Vec<u8>> = vec![b"..".to_vec(), b"etc".to_vec()];
    let bytes = postcard::to_stdvec(&raw).unwrap();
    assert!(postcard::from_bytes::<RelPath>(&bytes).is_err());
    let good = postcard::to_stdvec(&p("a/b")).unwrap();
    assert_eq!(postcard::from_bytes::<RelPath>(&good).unwrap(), p("a/b"));
}

#[test]
fn frame_roundtrip_with_payload() {
    let msg = ToMirror::Op {
        seq: 7,
        op: Op::Write {
            path: p("dir/file"),
            offset: 4096,
            mtime: TimeSet::At(Timestamp { sec: 1, nsec: 2 }),
        },
    };
    let mut buf = Vec::new();
    encode_frame(&msg, b"hello", &mut buf).unwrap();
    let len = frame_body_len(buf[..4].try_into().unwrap()).unwrap();
    assert_eq!(len, buf.len() - 4);
    let frame = decode_to_mirror(buf[4..].to_vec()).unwrap();
    assert_eq!(frame.header, msg);
    assert_eq!(&frame.payload[..], b"hello");
}

#[test]
fn oversized_and_garbage_frames_are_refused() {
    assert!(frame_body_len((MAX_FRAME_BYTES as u32 + 1).to_be_bytes()).is_err());
    assert!(frame_body_len(0u32.to_be_bytes()).is_err());
    // Header length beyond the body.
    let mut body = 100u32.to_be_bytes().to_vec();
    body.extend_from_slice(&[1, 2, 3]);
    assert!(decode_to_mirror(body).is_err());
    // Random garbage never panics.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for n in 0..2000usize {
        let mut body = Vec::with_capacity(n % 64 + 4);
        let hl = (n % 60) as u32;
        body.extend_from_slice(&hl.to_be_bytes());
        for _ in 0..(n % 64) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            body.push(x as u8);
        }
        let _ = decode_to_mirror(body.clone());
        let _ = decode_from_mirror(body);
    }
}

#[test]
fn op_validation() {
    let t = Timestamp { sec: 0, nsec: 0 };
    let bad_nsec = Timestamp {
        sec: 0,
        nsec: 1_000_000_000,
    };
    assert!(Op::Unlink {
        path: RelPath::root(),
        parent_mtime: None
    }
    .validate(0)
    .is_err());
    assert!(Op::Write {
        path: p("f"),
        offset: u64::MAX - 1,
        mtime: TimeSet::At(t)
    }
    .validate(10)
    .is_err());
    assert!(Op::Write {
        path: p("f"),
        offset: 0,
        mtime: TimeSet::At(bad_nsec)
    }
    .validate(1)
    .is_err());
    assert!(Op::Write {
        path: p("f"),
        offset: 0,
        mtime: TimeSet::At(t)
    }
    .validate(MAX_WRITE_PAYLOAD + 1)
    .is_err());
    assert!(
        Op::Unlink {
            path: p("f"),
            parent_mtime: None
        }
        .validate(1)
        .is_err(),
        "payload on unlink"
    );
    let ren = |flags| Op::Rename {
        from: p("a"),
        to: p("b"),
        flags,
        from_parent_mtime: None,
        to_parent_mtime: None,
    };
    assert!(ren(0).validate(0).is_ok());
    assert!(ren(3).validate(0).is_err());
    assert!(ren(8).validate(0).is_err());
    let sym = |target: &[u8]| Op::Symlink {
        path: p("l"),
        target: target.to_vec(),
        uid: 0,
        gid: 0,
        mtime: t,
        parent_mtime: None,
    };
    assert!(sym(b"").validate(0).is_err());
    assert!(
        sym(b"../../etc/passwd").validate(0).is_ok(),
        "targets are data, never followed"
    );
    let sa = Op::SetAttr {
        path: p("f"),
        mode: Some(0o170777),
        uid: None,
        gid: None,
        size: None,
        atime: TimeSet::Omit,
        mtime: TimeSet::Omit,
    };
    assert!(sa.validate(0).is_err());
}
