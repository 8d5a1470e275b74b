//! `hapair demo-app`: the small real application of `hapair demo` and of
//! the failover tests. It serves a TCP port (on the VIP) and appends every
//! record a client sends to `DIR/records.log` in the replicated directory,
//! with its checksum, and answers `OK n` only after fdatasync returned: an
//! acknowledged record is durable, so after a failover the new primary must
//! have it.
//!
//! Protocol, one line each way: `PUT <n> <text>` → `OK <n>`; `COUNT` →
//! `<records in the log>`; `WHO` → the node it runs on (`$HAPAIR_NODE`);
//! anything else → `ERR <why>`.

use anyhow::Context;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Most concurrent client connections.
const MAX_CONNECTIONS: usize = 32;
/// Longest request line.
const MAX_LINE: usize = 4096;

/// One record as stored: `n text crc32-hex`.
pub fn record_line(n: u64, text: &str) -> String {
    let body = format!("{n} {text}");
    format!("{body} {:08x}\n", crc32fast::hash(body.as_bytes()))
}

/// Parses a stored record line; None if torn or corrupt.
pub fn parse_record(line: &str) -> Option<(u64, String)> {
    let (body, crc) = line.rsplit_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(body.as_bytes()) {
        return None;
    }
    let (n, text) = body.split_once(' ')?;
    Some((n.parse().ok()?, text.to_string()))
}

pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("records.log")
}

pub fn run(dir: PathBuf, listen: SocketAddr) -> anyhow::Result<()> {
    let path = log_path(&dir);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let existing = std::fs::read_to_string(&path)
        .map(|s| s.lines().filter(|l| parse_record(l).is_some()).count())
        .unwrap_or(0);
    let listener = bind_retrying(listen)?;
    eprintln!(
        "demo-app: serving {listen}, {existing} records in {}",
        path.display()
    );
    let log = Arc::new(Mutex::new(file));
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if active.load(std::sync::atomic::Ordering::SeqCst) >= MAX_CONNECTIONS {
            continue; // dropped: the client retries
        }
        active.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (log, active, path) = (log.clone(), active.clone(), path.clone());
        std::thread::spawn(move || {
            let _ = serve(conn, &log, &path);
            active.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
    Ok(())
}

/// The VIP may appear a moment after the application starts.
fn bind_retrying(listen: SocketAddr) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for _ in 0..100 {
        match TcpListener::bind(listen) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Err(last
        .map(anyhow::Error::new)
        .unwrap_or_else(|| anyhow::anyhow!("bind failed")))
    .with_context(|| format!("listening on {listen}"))
}

fn serve(conn: TcpStream, log: &Mutex<std::fs::File>, path: &Path) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut r).take(MAX_LINE as u64).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        let req = line.trim_end();
        let answer = if let Some(rest) = req.strip_prefix("PUT ") {
            match rest
                .split_once(' ')
                .and_then(|(n, t)| Some((n.parse::<u64>().ok()?, t)))
            {
                Some((n, text)) => {
                    let mut f = log.lock().unwrap_or_else(|p| p.into_inner());
                    match f
                        .write_all(record_line(n, text).as_bytes())
                        .and_then(|()| f.sync_data())
                    {
                        Ok(()) => format!("OK {n}\n"),
                        Err(e) => format!("ERR {e}\n"),
                    }
                }
                None => "ERR usage: PUT <n> <text>\n".to_string(),
            }
        } else if req == "WHO" {
            format!(
                "{}\n",
                std::env::var("HAPAIR_NODE").unwrap_or_else(|_| "?".into())
            )
        } else if req == "COUNT" {
            let c = std::fs::read_to_string(path)
                .map(|s| s.lines().filter(|l| parse_record(l).is_some()).count())
                .unwrap_or(0);
            format!("{c}\n")
        } else {
            "ERR unknown request\n".to_string()
        };
        w.write_all(answer.as_bytes())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_corruption_is_detected() {
        let l = record_line(42, "hello world");
        assert_eq!(
            parse_record(l.trim_end()),
            Some((42, "hello world".to_string()))
        );
        let bad = l.replace("hello", "hellO");
        assert_eq!(parse_record(bad.trim_end()), None);
        assert_eq!(parse_record("42 torn"), None);
    }
}
