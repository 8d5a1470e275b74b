//! Tests of the support library itself, without the hapair binary:
//! process and namespace guards, and the record writer/checker on a plain
//! filesystem.

use hapair_tests::records::{self, check_records, read_ack_log};
use hapair_tests::{env, Netns, Proc, TestDir, Veth};
use std::process::Command;
use std::time::Duration;

const RECWRITER: &str = env!("CARGO_BIN_EXE_recwriter");

#[test]
fn proc_guard_kills_and_reaps() {
    let t = TestDir::new("proc");
    let pid;
    {
        let mut p = Proc::spawn("sleeper", Command::new("sleep").arg("600"), t.path());
        pid = p.pid();
        assert!(p.is_running());
    }
    // Reaped: the PID no longer exists (not even as a zombie).
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists after drop"
    );
    let mut p = Proc::spawn(
        "echo",
        Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
        t.path(),
    );
    let s = p.wait_or_kill(Duration::from_secs(10));
    assert_eq!(s.code(), Some(3));
    assert_eq!(p.stdout().trim(), "out");
    assert_eq!(p.stderr_tail(1), "err");
}

#[test]
fn netns_and_veth_guards() {
    env::require_root();
    let name;
    let host_if;
    {
        let ns = Netns::new("hpt");
        name = ns.name().to_string();
        let v = Veth::new(&ns, 16000);
        host_if = v.host_if().to_string();
        let o = ns.exec_ok(&["ip", "-o", "addr"]);
        assert!(String::from_utf8_lossy(&o.stdout).contains(&v.ns_ip));
        // The namespace answers on its address over the veth.
        let o = ns.exec_ok(&["ip", "route", "get", &v.host_ip]);
        assert!(String::from_utf8_lossy(&o.stdout).contains("dev"), "{o:?}");
        v.set_up(false);
        let o = Command::new("ip")
            .args(["-o", "link", "show", v.host_if()])
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&o.stdout).contains(",UP"), "{o:?}");
        v.set_up(true);
    }
    let o = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains(&name),
        "netns {name} left behind"
    );
    let o = Command::new("ip")
        .args(["link", "show", &host_if])
        .output()
        .unwrap();
    assert!(!o.status.success(), "veth {host_if} left behind");
}

fn recwriter(args: &[&str]) -> std::process::Output {
    Command::new(RECWRITER)
        .args(args)
        .output()
        .expect("running recwriter")
}

#[test]
fn recwriter_single_file_round_trip_and_torn_tail() {
    let t = TestDir::new("rec1");
    let f = t.join("records");
    let acks = t.join("acks");
    let (fs, a) = (f.to_str().unwrap(), acks.to_str().unwrap());
    let o = recwriter(&[
        "write",
        "--file",
        fs,
        "--ack-log",
        a,
        "--count",
        "300",
        "--seed",
        "5",
        "--mode",
        "fsync",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(read_ack_log(&acks).unwrap(), 300);
    let o = recwriter(&["check", "--file", fs, "--ack-log", a, "--seed", "5"]);
    assert!(o.status.success(), "{o:?}");
    // A torn last record (unacked) is fine; a lost acked record is not.
    let data = std::fs::read(&f).unwrap();
    let s = records::scan_bytes(5, &data);
    assert_eq!(s.seqs.len(), 300);
    std::fs::write(&f, &data[..data.len() - 7]).unwrap();
    let r = check_records(std::slice::from_ref(&f), 5, 299).expect("torn unacked tail is allowed");
    assert_eq!((r.present, r.torn_files), (299, 1));
    assert!(
        check_records(std::slice::from_ref(&f), 5, 300).is_err(),
        "record 300 was acked and is torn"
    );
    // A flipped byte in the middle is found.
    let mut bad = data.clone();
    bad[data.len() / 2] ^= 0x40;
    std::fs::write(&f, &bad).unwrap();
    assert!(check_records(std::slice::from_ref(&f), 5, 1).is_err());
}

#[test]
fn recwriter_multi_file_with_renames() {
    let t = TestDir::new("recm");
    let d = t.join("recs");
    let acks = t.join("acks");
    let (ds, a) = (d.to_str().unwrap(), acks.to_str().unwrap());
    let o = recwriter(&[
        "write",
        "--dir",
        ds,
        "--files",
        "4",
        "--rotate-every",
        "5",
        "--ack-log",
        a,
        "--count",
        "200",
        "--seed",
        "9",
        "--mode",
        "write",
    ]);
    assert!(o.status.success(), "{o:?}");
    let files = records::multi_files(&d).unwrap();
    assert!(files.len() > 10, "expected rotated files, got {files:?}");
    let o = recwriter(&["check", "--dir", ds, "--ack-log", a, "--seed", "9"]);
    assert!(o.status.success(), "{o:?}");
    // Losing one rotated file leaves a gap: refused.
    std::fs::remove_file(&files[0]).unwrap();
    let o = recwriter(&["check", "--dir", ds, "--ack-log", a, "--seed", "9"]);
    assert!(!o.status.success(), "a missing file must fail the check");
}

#[test]
fn recwriter_stops_at_duration() {
    let t = TestDir::new("recd");
    let f = t.join("records");
    let acks = t.join("acks");
    let start = std::time::Instant::now();
    let o = recwriter(&[
        "write",
        "--file",
        f.to_str().unwrap(),
        "--ack-log",
        acks.to_str().unwrap(),
        "--duration-ms",
        "300",
        "--mode",
        "write",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(read_ack_log(&acks).unwrap() > 0);
}

/// The FUSE guard with a real FUSE filesystem (bindfs): waits for the
/// mount, and unmounts on drop even while a file on it is open.
#[test]
fn fuse_guard_unmounts_a_busy_mount() {
    env::require_root_and_fuse();
    let t = TestDir::new("fuseguard");
    let src = t.mkdir("src");
    let mnt = t.mkdir("mnt");
    std::fs::write(src.join("f"), b"hello").unwrap();
    let mut p = Proc::spawn(
        "bindfs",
        Command::new(env::tool_path("bindfs"))
            .arg("-f")
            .arg(&src)
            .arg(&mnt),
        t.path(),
    );
    let open_file;
    {
        let g = hapair_tests::FuseMount::new(&mnt);
        g.wait_mounted("fuse", Duration::from_secs(10), &mut p)
            .unwrap();
        assert!(g.is_mounted());
        assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"hello");
        // Keep a file open so that a plain unmount is refused as busy.
        open_file = std::fs::File::open(mnt.join("f")).unwrap();
    }
    assert_eq!(
        hapair_tests::mount_fstype(&mnt),
        None,
        "guard left {} mounted",
        mnt.display()
    );
    drop(open_file);
    drop(p);
}

/// `wait_udp_bound` sees a UDP listener in the host namespace and inside a
/// netns (through /proc/<pid>/net/udp of the listener).
#[test]
fn udp_listener_detection_in_netns() {
    env::require_root();
    let t = TestDir::new("udpwait");
    let ns = Netns::new("hpt");
    let v = Veth::new(&ns, 16001);
    let script = "import socket,sys,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind((sys.argv[1],int(sys.argv[2])))\ntime.sleep(60)\n";
    let mut c = ns.command(std::path::Path::new("/usr/bin/python3"));
    c.args(["-c", script, &v.ns_ip, "7701"]);
    let mut p = Proc::spawn("udp", &mut c, t.path());
    hapair_tests::harness::wait_udp_bound(&mut p, 7701, Duration::from_secs(10));
    let port = env::free_udp_port("127.0.0.1");
    let mut q = Proc::spawn(
        "udp-host",
        Command::new("/usr/bin/python3").args(["-c", script, "127.0.0.1", &port.to_string()]),
        t.path(),
    );
    hapair_tests::harness::wait_udp_bound(&mut q, port, Duration::from_secs(10));
}
