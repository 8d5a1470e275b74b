//! The kernel asks for `security.capability` before every write; the
//! filesystem answers "absent" from memory once it has seen it absent. A
//! capability set through the mount must be visible at once, recorded, and
//! removed by the next write (on the backing, as on any local filesystem).

mod common;

use common::*;
use hapair_proto::Op;
use std::fs;
use std::io::Write;
use std::process::Command;
use std::sync::Arc;

fn getcap(p: &std::path::Path) -> String {
    let o = Command::new("getcap").arg(p).output().expect("run getcap");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn setcap(p: &std::path::Path) {
    let s = Command::new("setcap")
        .args(["cap_net_raw+ep"])
        .arg(p)
        .status()
        .expect("run setcap");
    assert!(s.success(), "setcap failed");
}

#[test]
fn capability_set_after_absence_is_seen_and_killed_by_write() {
    let dir = tempfile::tempdir().unwrap();
    let (b, m) = (dir.path().join("backing"), dir.path().join("mnt"));
    fs::create_dir(&b).unwrap();
    fs::create_dir(&m).unwrap();
    let rec = Arc::new(Recorder::default());
    let mnt = mount(&b, &m, rec.clone());
    let f = mnt.mnt.join("f");
    let mut h = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&f)
        .unwrap();
    // Writes make the kernel ask, and the filesystem remember the absence.
    h.write_all(b"one").unwrap();
    h.write_all(b"two").unwrap();
    assert_eq!(getcap(&f), "", "no capability yet");
    setcap(&f);
    assert!(
        getcap(&f).contains("cap_net_raw"),
        "capability visible at once"
    );
    assert!(
        getcap(&b.join("f")).contains("cap_net_raw"),
        "on the backing"
    );
    assert!(
        rec.ops()
            .iter()
            .any(|o| matches!(o, Op::SetXattr { name, .. }
            if name == b"security.capability")),
        "the capability was recorded"
    );
    h.write_all(b"three").unwrap();
    assert_eq!(getcap(&f), "", "a write removes the capability");
    assert_eq!(getcap(&b.join("f")), "", "on the backing too");
    drop(h);
    mnt.unmount();
}
