//! Large block-aligned writes bypass the page cache on both nodes (the
//! mount's backing file and the mirror's copy), and large block-aligned
//! reads the backing's (see fs-replica's `direct` and the mirror's
//! applier): fio writes a mix of direct-eligible and ordinary writes over
//! the same ranges, reads everything back through the mount (read(2) and
//! mmap) with crc32c verification, verifies it again after the caches are
//! dropped (so that the reads reach the backing, some directly), then the
//! mount stops cleanly and the mirror must equal the directory, byte for
//! byte.

use hapair_tests::proc::run_bounded;
use hapair_tests::treediff::DiffOptions;
use hapair_tests::{env, tool_path, Harness, MountOpts};
use std::process::Command;
use std::time::Duration;

#[test]
fn fio_mixed_direct_and_buffered_writes_verify() {
    let _s = env::serial();
    let mut h = Harness::new("direct-io");
    h.start_mirror();
    h.mount(&MountOpts::default());
    let fio = |verify_only: bool| {
        let mut c = Command::new(tool_path("fio"));
        c.current_dir(&h.logs).arg("--verify_state_save=0");
        c.arg(format!("--directory={}", h.dir.display()));
        c.args([
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--runtime=60",
        ]);
        if verify_only {
            c.arg("--verify_only=1");
        }
        // Random writes of 4 KiB to 1 MiB (4 KiB multiples): those of 128 KiB
        // and more go direct, the others through the page cache, overlapping.
        c.args([
            "--name=mixed",
            "--ioengine=psync",
            "--rw=randwrite",
            "--bsrange=4k-1m",
            "--size=24m",
            "--fsync=8",
        ]);
        // Sequential 1 MiB writes (all direct) read back through mmap.
        c.args([
            "--name=seq-mmap",
            "--ioengine=psync",
            "--rw=write",
            "--bs=1m",
            "--size=16m",
            "--end_fsync=1",
        ]);
        // Unaligned offsets and sizes: never direct.
        c.args([
            "--name=unaligned",
            "--ioengine=psync",
            "--rw=randwrite",
            "--bsrange=1k-300k",
            "--bs_unaligned=1",
            "--size=8m",
        ]);
        let name = if verify_only { "fio-verify" } else { "fio" };
        let (s, p) = run_bounded(name, &mut c, &h.logs, Duration::from_secs(180));
        assert!(
            s.success(),
            "{name} failed ({s:?}):\n{}\n{}",
            p.stdout_tail(40),
            p.stderr_tail(20)
        );
        assert!(
            !p.stdout().contains("verify: bad"),
            "{name} verify errors:\n{}",
            p.stdout_tail(40)
        );
    };
    fio(false);
    // Again from the disk: nothing of it left in any page cache.
    let sync = Command::new("sh")
        .args(["-c", "sync && echo 3 > /proc/sys/vm/drop_caches"])
        .status()
        .expect("drop caches");
    assert!(sync.success(), "dropping the caches failed");
    fio(true);
    // Read the sequential file back through mmap too, against what read(2)
    // returns.
    let f = h.dir.join("seq-mmap.0.0");
    let data = std::fs::read(&f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
    let mapped = {
        let file = std::fs::File::open(&f).expect("open for mmap");
        let len = data.len();
        // SAFETY: a private read-only mapping of a file nobody writes now.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {}", f.display());
        // SAFETY: the mapping is `len` bytes long and stays until munmap.
        let v = unsafe { std::slice::from_raw_parts(p as *const u8, len) }.to_vec();
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(p, len) };
        v
    };
    assert!(
        data == mapped,
        "mmap and read(2) disagree on {}",
        f.display()
    );
    h.stop_mount(Duration::from_secs(120));
    h.assert_trees_equal(None, &DiffOptions::default());
}
