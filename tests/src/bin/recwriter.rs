//! `recwriter`: writes numbered, checksummed records for crash tests, and
//! checks a copy of them against the acknowledgements.
//!
//! ```text
//! recwriter write --file F            --ack-log L [--mode fsync|write] [--count N] [--duration-ms T] [--seed S] [--size N | --min-size A --max-size B]
//! recwriter write --dir D --files K [--rotate-every R] ...   (multi-file: records spread over K slots, renamed every R records)
//! recwriter check --file F | --dir D  --ack-log L --seed S
//! ```
//! `write` appends "acked N" to the ack log (which must lie outside the
//! mount under test) only after record N's write() returned (`--mode
//! write`) or its fsync (and, for a new or renamed file, the directory's
//! fsync) returned (`--mode fsync`). It stops at the first I/O error
//! (exit 1), or after N records or T milliseconds (exit 0).

use clap::{Parser, Subcommand, ValueEnum};
use hapair_tests::records::{self, SizeSpec};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "recwriter", about = "Crash-test record writer and checker")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum AckMode {
    /// Acknowledge after fsync returned.
    Fsync,
    /// Acknowledge after write() returned (for strict mode).
    Write,
}

#[derive(clap::Args)]
struct Target {
    /// One record file (single-file mode).
    #[arg(long, conflicts_with = "dir")]
    file: Option<PathBuf>,
    /// A directory of slot files (multi-file mode).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    Write {
        #[command(flatten)]
        target: Target,
        /// Slots in multi-file mode.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        files: u32,
        /// Rename a slot's file after this many records in it (0 = never).
        #[arg(long, default_value_t = 0)]
        rotate_every: u64,
        #[arg(long)]
        ack_log: PathBuf,
        #[arg(long, value_enum, default_value_t = AckMode::Fsync)]
        mode: AckMode,
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        #[arg(long, default_value_t = 30_000)]
        duration_ms: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Fixed payload size in bytes.
        #[arg(long, conflicts_with_all = ["min_size", "max_size"])]
        size: Option<usize>,
        #[arg(long, default_value_t = 16)]
        min_size: usize,
        #[arg(long, default_value_t = 16384)]
        max_size: usize,
    },
    Check {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        ack_log: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn fsync_dir(dir: &Path) -> Result<(), String> {
    let d = File::open(dir).map_err(|e| format!("opening directory {}: {e}", dir.display()))?;
    d.sync_all()
        .map_err(|e| format!("fsync of directory {}: {e}", dir.display()))
}

fn create_excl(p: &Path) -> Result<File, String> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(p)
        .map_err(|e| format!("creating {}: {e}", p.display()))
}

/// One output file (single-file mode has one slot).
struct Slot {
    file: Option<File>,
    path: PathBuf,
    in_file: u64,
    generation: u64,
}

#[allow(clippy::too_many_arguments)]
fn write(
    target: Target,
    files: u32,
    rotate_every: u64,
    ack_log: &Path,
    mode: AckMode,
    count: u64,
    duration: Duration,
    seed: u64,
    size: SizeSpec,
) -> Result<u64, String> {
    let mut acks = OpenOptions::new()
        .create(true)
        .append(true)
        .open(ack_log)
        .map_err(|e| format!("opening ack log {}: {e}", ack_log.display()))?;
    let (dir, mut slots): (PathBuf, Vec<Slot>) = match (&target.file, &target.dir) {
        (Some(f), None) => {
            let dir = f
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            (
                dir,
                vec![Slot {
                    file: None,
                    path: f.clone(),
                    in_file: 0,
                    generation: 0,
                }],
            )
        }
        (None, Some(d)) => {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
            let slots = (0..files)
                .map(|k| Slot {
                    file: None,
                    path: d.join(format!("slot-{k}.cur")),
                    in_file: 0,
                    generation: 0,
                })
                .collect();
            (d.clone(), slots)
        }
        _ => return Err("give exactly one of --file or --dir".into()),
    };
    let multi = target.dir.is_some();
    let start = Instant::now();
    let mut seq = 0u64;
    while seq < count && start.elapsed() < duration {
        seq += 1;
        let k = if multi {
            records::slot_of(seed, seq, files) as usize
        } else {
            0
        };
        let slot = &mut slots[k];
        let mut new_name = false;
        if slot.file.is_none() {
            slot.file = Some(create_excl(&slot.path).map_err(|e| format!("record {seq}: {e}"))?);
            new_name = true;
        }
        let rec = records::encode(seed, seq, records::payload_len(seed, seq, size));
        let f = slot.file.as_mut().ok_or("slot without file")?;
        // One write() call per record: in strict mode its return is the ack.
        f.write_all(&rec)
            .map_err(|e| format!("record {seq}: write to {}: {e}", slot.path.display()))?;
        slot.in_file += 1;
        if mode == AckMode::Fsync {
            f.sync_all()
                .map_err(|e| format!("record {seq}: fsync of {}: {e}", slot.path.display()))?;
        }
        if rotate_every > 0 && slot.in_file >= rotate_every {
            // Rotation: the finished file gets a final name and the slot
            // starts a new one, so renames interleave with the writes.
            slot.file = None;
            let done = dir.join(format!("slot-{k}.{:06}", slot.generation));
            std::fs::rename(&slot.path, &done).map_err(|e| {
                format!(
                    "record {seq}: rename {} -> {}: {e}",
                    slot.path.display(),
                    done.display()
                )
            })?;
            slot.generation += 1;
            slot.in_file = 0;
            new_name = true;
        }
        if mode == AckMode::Fsync && new_name {
            fsync_dir(&dir).map_err(|e| format!("record {seq}: {e}"))?;
        }
        acks.write_all(format!("acked {seq}\n").as_bytes())
            .map_err(|e| format!("record {seq}: writing the ack log: {e}"))?;
    }
    Ok(seq)
}

fn check(target: Target, ack_log: &Path, seed: u64) -> Result<records::CheckReport, Vec<String>> {
    let acked = records::read_ack_log(ack_log).map_err(|e| vec![e])?;
    let files = match (&target.file, &target.dir) {
        (Some(f), None) => vec![f.clone()],
        (None, Some(d)) => records::multi_files(d).map_err(|e| vec![e])?,
        _ => return Err(vec!["give exactly one of --file or --dir".into()]),
    };
    records::check_records(&files, seed, acked)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Write {
            target,
            files,
            rotate_every,
            ack_log,
            mode,
            count,
            duration_ms,
            seed,
            size,
            min_size,
            max_size,
        } => {
            let size = match size {
                Some(n) => SizeSpec::Fixed(n),
                None => SizeSpec::Range(min_size, max_size.max(min_size)),
            };
            let r = write(
                target,
                files,
                rotate_every,
                &ack_log,
                mode,
                count,
                Duration::from_millis(duration_ms),
                seed,
                size,
            );
            match r {
                Ok(n) => {
                    println!("done {n}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("recwriter: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Check {
            target,
            ack_log,
            seed,
        } => match check(target, &ack_log, seed) {
            Ok(r) => {
                println!(
                    "ok: acked {} present {} files {} torn {}",
                    r.acked, r.present, r.files, r.torn_files
                );
                ExitCode::SUCCESS
            }
            Err(errs) => {
                for e in errs {
                    eprintln!("recwriter check: {e}");
                }
                ExitCode::from(1)
            }
        },
    }
}
