//! Certificate generation and loading, on real files.

use hapair_transport::{tls_init, TlsMaterial};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => return vec![],
    };
    v.sort();
    v
}

#[test]
fn writes_ca_and_node_files_with_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    let written = tls_init(&dir, &names(&["alpha", "beta_2", "node-3.example"]), false).unwrap();

    assert_eq!(mode(&dir), 0o700, "created directory must be private");
    let expected = [
        "alpha.key",
        "alpha.pem",
        "beta_2.key",
        "beta_2.pem",
        "ca.key",
        "ca.pem",
        "node-3.example.key",
        "node-3.example.pem",
    ];
    assert_eq!(entries(&dir), expected, "exactly these files, no leftovers");
    assert_eq!(written.len(), 8);
    assert_eq!(written[0], dir.join("ca.pem"));
    assert_eq!(written[1], dir.join("ca.key"));
    for f in expected {
        let want = if f.ends_with(".key") { 0o600 } else { 0o644 };
        assert_eq!(mode(&dir.join(f)), want, "mode of {f}");
    }
    assert!(fs::read_to_string(dir.join("ca.pem"))
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(fs::read_to_string(dir.join("alpha.key"))
        .unwrap()
        .contains("PRIVATE KEY"));

    for node in ["alpha", "beta_2", "node-3.example"] {
        let m = TlsMaterial::load(&dir, node).unwrap();
        assert_eq!(m.node(), node);
    }
}

#[test]
fn existing_directory_keeps_its_mode_and_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fs::write(dir.join("unrelated.txt"), b"x").unwrap();
    tls_init(dir, &names(&["a", "b"]), false).unwrap();
    assert!(dir.join("unrelated.txt").exists());
    TlsMaterial::load(dir, "a").unwrap();
}

#[test]
fn bad_node_names_are_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    let long = "x".repeat(65);
    let bad: Vec<Vec<String>> = vec![
        vec![],
        names(&[""]),
        names(&["a/b"]),
        names(&["a b"]),
        names(&["..", "b"]),
        names(&["."]),
        names(&["a..b"]),
        names(&["-a"]),
        names(&["a-"]),
        names(&["ca"]),
        names(&["CA"]),
        names(&["10.0.0.1"]),
        names(&["é"]),
        names(&["a\0"]),
        vec![long],
        names(&["a", "b", "a"]),
        names(&["node", "NODE"]),
    ];
    for nodes in bad {
        let r = tls_init(&dir, &nodes, false);
        assert!(r.is_err(), "{nodes:?} should be refused");
        assert!(!dir.exists(), "{nodes:?}: nothing may be written");
        // Even with force.
        assert!(tls_init(&dir, &nodes, true).is_err());
        assert!(!dir.exists());
    }
    // A single DNS label is at most 63 bytes.
    assert!(tls_init(&dir, &["y".repeat(64)], false).is_err());
    assert!(!dir.exists());
    // The longest allowed names work.
    let longest = format!("{}.{}", "y".repeat(32), "z".repeat(31));
    tls_init(&dir, &["y".repeat(63), longest.clone()], false).unwrap();
    TlsMaterial::load(&dir, &longest).unwrap();
}

#[test]
fn existing_files_are_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    tls_init(dir, &names(&["a", "b"]), false).unwrap();
    let before: Vec<(String, Vec<u8>)> = entries(dir)
        .into_iter()
        .map(|f| (f.clone(), fs::read(dir.join(&f)).unwrap()))
        .collect();

    // Same set, or a set that only overlaps in the CA files: refused, untouched.
    for nodes in [names(&["a", "b"]), names(&["c"])] {
        let err = tls_init(dir, &nodes, false).unwrap_err();
        assert!(format!("{err:#}").contains("ca.pem"), "{err:#}");
        let after: Vec<(String, Vec<u8>)> = entries(dir)
            .into_iter()
            .map(|f| (f.clone(), fs::read(dir.join(&f)).unwrap()))
            .collect();
        assert_eq!(before, after, "refusal must not touch anything");
    }

    // A key loosened by hand is replaced with the right mode when forced.
    fs::set_permissions(dir.join("a.key"), fs::Permissions::from_mode(0o644)).unwrap();
    tls_init(dir, &names(&["a", "b"]), true).unwrap();
    let old_ca = &before.iter().find(|(f, _)| f == "ca.pem").unwrap().1;
    assert_ne!(
        &fs::read(dir.join("ca.pem")).unwrap(),
        old_ca,
        "a new CA was written"
    );
    assert_eq!(mode(&dir.join("a.key")), 0o600);
    assert_eq!(
        entries(dir),
        ["a.key", "a.pem", "b.key", "b.pem", "ca.key", "ca.pem"]
    );
    TlsMaterial::load(dir, "a").unwrap();
}

#[test]
fn load_reports_the_file_at_fault() {
    let tmp = tempfile::tempdir().unwrap();
    let d1 = tmp.path().join("one");
    let d2 = tmp.path().join("two");
    tls_init(&d1, &names(&["a", "b"]), false).unwrap();
    tls_init(&d2, &names(&["a", "b"]), false).unwrap();

    // Missing node.
    let err = format!("{:#}", TlsMaterial::load(&d1, "zz").unwrap_err());
    assert!(err.contains("zz.pem"), "{err}");

    // Key readable by others.
    fs::set_permissions(d1.join("a.key"), fs::Permissions::from_mode(0o640)).unwrap();
    let err = format!("{:#}", TlsMaterial::load(&d1, "a").unwrap_err());
    assert!(err.contains("a.key") && err.contains("chmod 600"), "{err}");
    fs::set_permissions(d1.join("a.key"), fs::Permissions::from_mode(0o600)).unwrap();

    // Certificate and key of another cluster.
    fs::copy(d2.join("a.pem"), d1.join("a.pem")).unwrap();
    fs::copy(d2.join("a.key"), d1.join("a.key")).unwrap();
    let err = format!("{:#}", TlsMaterial::load(&d1, "a").unwrap_err());
    assert!(err.contains("a.pem") && err.contains("ca.pem"), "{err}");

    // Another node's certificate under this node's name.
    fs::copy(d1.join("b.pem"), d1.join("a.pem")).unwrap();
    fs::copy(d1.join("b.key"), d1.join("a.key")).unwrap();
    let err = format!("{:#}", TlsMaterial::load(&d1, "a").unwrap_err());
    assert!(err.contains("a.pem"), "{err}");

    // A key that does not match the certificate.
    tls_init(&d1, &names(&["a", "b"]), true).unwrap();
    fs::copy(d1.join("b.key"), d1.join("a.key")).unwrap();
    let err = format!("{:#}", TlsMaterial::load(&d1, "a").unwrap_err());
    assert!(err.contains("a.key"), "{err}");

    // Garbage in the CA file.
    tls_init(&d1, &names(&["a", "b"]), true).unwrap();
    fs::write(d1.join("ca.pem"), b"not a certificate").unwrap();
    let err = format!("{:#}", TlsMaterial::load(&d1, "a").unwrap_err());
    assert!(err.contains("ca.pem"), "{err}");
}
