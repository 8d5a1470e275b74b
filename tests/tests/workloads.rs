//! Independently written workloads and suites run on the mount (fio with
//! crc32c verification, stress-ng filesystem stressors with --verify, fsx,
//! dbench, pjdfstest), each followed by a clean stop and a tree comparison
//! of DIR and MIRROR. Tools come from tests/scripts/install-deps.sh; a
//! missing tool fails the test.

use hapair_tests::proc::run_bounded;
use hapair_tests::treediff::DiffOptions;
use hapair_tests::{env, tool_path, Harness, MountOpts, TestDir};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn mounted(name: &str) -> Harness {
    let mut h = Harness::new(name);
    h.start_mirror();
    h.mount(&MountOpts::default());
    h
}

fn finish(mut h: Harness) {
    h.stop_mount(Duration::from_secs(120));
    h.assert_trees_equal(None, &DiffOptions::default());
}

#[test]
fn fio_verify_crc32c() {
    let _s = env::serial();
    let h = mounted("fio");
    let mut c = Command::new(tool_path("fio"));
    // fio writes verify state files into its working directory.
    c.current_dir(&h.logs).arg("--verify_state_save=0");
    c.arg(format!("--directory={}", h.dir.display()));
    c.args([
        "--ioengine=psync",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--group_reporting",
        "--runtime=60",
    ]);
    // A sequential writer with periodic fsync, then random 4 KiB writes by
    // two jobs, then an fdatasync-per-write job.
    c.args([
        "--name=seq",
        "--rw=write",
        "--bs=64k",
        "--size=16m",
        "--fsync=32",
    ]);
    c.args([
        "--name=rand",
        "--rw=randwrite",
        "--bs=4k",
        "--size=8m",
        "--numjobs=2",
        "--fsync=16",
    ]);
    c.args([
        "--name=dsync",
        "--rw=randwrite",
        "--bs=4k",
        "--size=1m",
        "--fdatasync=1",
    ]);
    let (s, p) = run_bounded("fio", &mut c, &h.logs, Duration::from_secs(180));
    assert!(
        s.success(),
        "fio failed ({s:?}):\n{}\n{}",
        p.stdout_tail(40),
        p.stderr_tail(20)
    );
    assert!(
        !p.stdout().contains("verify: bad"),
        "fio verify errors:\n{}",
        p.stdout_tail(40)
    );
    finish(h);
}

#[test]
fn stress_ng_filesystem_verify() {
    let _s = env::serial();
    let h = mounted("stressng");
    let mut c = Command::new(tool_path("stress-ng"));
    c.current_dir(&h.logs);
    c.arg("--temp-path").arg(&h.dir);
    c.args(["--hdd", "1", "--hdd-bytes", "8m", "--hdd-write-size", "4k"]);
    c.args(["--dir", "1", "--dir-dirs", "256"]);
    c.args([
        "--rename",
        "1",
        "--link",
        "1",
        "--symlink",
        "1",
        "--dentry",
        "1",
    ]);
    c.args(["--fallocate", "1", "--fallocate-bytes", "4m"]);
    c.args([
        "--xattr",
        "1",
        "--seek",
        "1",
        "--seek-size",
        "8m",
        "--fsize",
        "1",
    ]);
    c.args(["--timeout", "10s", "--verify", "--metrics-brief"]);
    let (s, p) = run_bounded("stress-ng", &mut c, &h.logs, Duration::from_secs(120));
    let out = format!("{}\n{}", p.stdout_tail(40), p.stderr_tail(40));
    assert!(s.code() == Some(0), "stress-ng failed ({s:?}):\n{out}");
    assert!(
        !out.contains(" fail:"),
        "stress-ng reported failures:\n{out}"
    );
    assert!(
        out.contains("successful run completed"),
        "stress-ng did not complete successfully:\n{out}"
    );
    eprintln!("{out}");
    finish(h);
}

fn fsx_config(dir: &Path) -> std::path::PathBuf {
    // Every operation fsx knows, on a file up to 1 MiB.
    let cfg = "flen = 1048576\n\n[weights]\nclose_open = 2\nread = 10\nwrite = 10\nmapread = 5\nmapwrite = 5\n\
               invalidate = 1\ntruncate = 3\nfsync = 2\nfdatasync = 2\nposix_fallocate = 2\npunch_hole = 2\n\
               sendfile = 1\nposix_fadvise = 1\ncopy_file_range = 2\n";
    let p = dir.join("fsx.toml");
    std::fs::write(&p, cfg).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    p
}

/// fsx with `seed` on `file`, its logs in `logs`.
fn fsx(
    cfg: &Path,
    seed: u64,
    logs: &Path,
    file: &Path,
    name: &str,
) -> (std::process::ExitStatus, hapair_tests::Proc) {
    let mut c = Command::new(tool_path("fsx"));
    c.current_dir(logs);
    c.arg("-f")
        .arg(cfg)
        .args(["-N", "20000", "-S", &seed.to_string()])
        .arg("-P")
        .arg(logs)
        .arg(file);
    run_bounded(name, &mut c, logs, Duration::from_secs(180))
}

#[test]
fn fsx_bounded() {
    let _s = env::serial();
    let h = mounted("fsx");
    let cfg = fsx_config(&h.logs);
    // Some seeds make fsx itself give up on any filesystem (seed 502764
    // asks for a posix_fallocate of 0 bytes, gets EINVAL, and stops, on
    // plain ext4 too). The seed is first run on a plain directory; one
    // that fails there is skipped for the next.
    let base = h.tmp().mkdir("fsx-baseline");
    let first = env::seed() % 1_000_000;
    let seed = (first..first + 10)
        .find(|&seed| {
            let (s, _) = fsx(&cfg, seed, &h.logs, &base.join("fsx.data"), "fsx-baseline");
            let _ = std::fs::remove_file(base.join("fsx.data"));
            if !s.success() {
                eprintln!("fsx seed {seed} fails on a plain directory too: skipped");
            }
            s.success()
        })
        .unwrap_or_else(|| {
            panic!(
                "fsx failed on a plain directory with seeds {first}..{}",
                first + 10
            )
        });
    eprintln!("fsx seed {seed}");
    let (s, p) = fsx(&cfg, seed, &h.logs, &h.dir.join("fsx.data"), "fsx");
    assert!(
        s.success(),
        "fsx (seed {seed}) failed ({s:?}):\n{}\n{}",
        p.stdout_tail(30),
        p.stderr_tail(30)
    );
    finish(h);
}

#[test]
fn dbench_short() {
    let _s = env::serial();
    let h = mounted("dbench");
    let mut c = Command::new(tool_path("dbench"));
    c.current_dir(&h.logs);
    c.args(["-c", "/usr/share/dbench/client.txt", "-t", "10", "-D"])
        .arg(&h.dir)
        .arg("2");
    let (s, p) = run_bounded("dbench", &mut c, &h.logs, Duration::from_secs(120));
    assert!(
        s.success(),
        "dbench failed ({s:?}):\n{}\n{}",
        p.stdout_tail(30),
        p.stderr_tail(30)
    );
    finish(h);
}

/// The summary line of pjdfstest: (failed, skipped, passed), plus the
/// names of failed cases.
fn pjdfstest(dir: &Path, log_dir: &Path) -> (u64, u64, u64, Vec<String>) {
    let cfg = log_dir.join("pjdfstest.toml");
    std::fs::write(
        &cfg,
        "[features]\nposix_fallocate = {}\nutime_now = {}\nutimensat = {}\n\n[settings]\nnaptime = 0.1\nallow_remount = false\n\n\
         [dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"tests\", \"tests\"]]\n",
    )
    .unwrap_or_else(|e| panic!("writing {}: {e}", cfg.display()));
    let mut c = Command::new(tool_path("pjdfstest"));
    c.current_dir(log_dir);
    c.arg("-c").arg(&cfg).arg("-p").arg(dir);
    let (_s, p) = run_bounded("pjdfstest", &mut c, log_dir, Duration::from_secs(300));
    let out = p.stdout();
    let summary = out
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| {
            panic!(
                "pjdfstest printed no summary:\n{}\n{}",
                p.stdout_tail(30),
                p.stderr_tail(30)
            )
        })
        .to_string();
    let num = |what: &str| -> u64 {
        summary
            .split(',')
            .find_map(|part| {
                let part = part.trim().trim_start_matches("Summary:").trim();
                part.strip_suffix(what).and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("no '{what}' count in {summary:?}"))
    };
    let failed_names: Vec<String> = out
        .lines()
        .filter(|l| l.trim_end().ends_with("FAILED"))
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    eprintln!("pjdfstest on {}: {summary}", dir.display());
    (num("failed"), num("skipped"), num("passed"), failed_names)
}

/// pjdfstest switches to other users: the path down to its directory must
/// be searchable by them.
fn open_up(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

#[test]
fn pjdfstest_on_mount() {
    let _s = env::serial();
    let mut h = Harness::new("pjdfstest");
    open_up(h.tmp().path());
    open_up(&h.dir);
    h.start_mirror();
    h.mount(&MountOpts::default());
    let t = h.dir.join("pjd");
    std::fs::create_dir(&t).expect("mkdir on the mount");
    open_up(&t);
    let (failed, skipped, passed, names) = pjdfstest(&t, &h.logs.clone());
    eprintln!("pjdfstest on the mount: {passed} passed, {failed} failed, {skipped} skipped; failed: {names:?}");
    assert!(passed > 300, "pjdfstest passed only {passed} cases");
    assert_eq!(failed, 0, "pjdfstest failures on the mount: {names:?}");
    finish(h);
}

/// The same suite on plain ext4 (/tmp), the baseline the mount must match.
#[test]
fn pjdfstest_on_ext4_baseline() {
    env::require_root();
    let t = TestDir::new("pjd-ext4");
    open_up(t.path());
    let d = t.mkdir("t");
    open_up(&d);
    let logs = t.mkdir("logs");
    let (failed, skipped, passed, names) = pjdfstest(&d, &logs);
    eprintln!(
        "pjdfstest on ext4: {passed} passed, {failed} failed, {skipped} skipped; failed: {names:?}"
    );
    assert_eq!(failed, 0, "pjdfstest fails on plain ext4 too: {names:?}");
}
