//! The record format of the crash-test writer (`recwriter`) and its checker.
//!
//! A record is `MAGIC(4) | seq(u64 LE) | len(u32 LE) | payload(len) |
//! crc32(u32 LE over everything before it)`. The payload is generated from
//! (seed, seq), so the checker can also verify it byte for byte. Sequence
//! numbers start at 1 and are global across the files of a multi-file run;
//! each file holds its records in increasing order.
//!
//! The writer is sequential: record N+1 is written only after record N's
//! write (and, in fsync mode, fsync) returned. So any state the writer's
//! files went through holds exactly records 1..=M intact, plus at most one
//! torn record (M+1) at the end of one file. The checker demands that of the
//! copy under test, and M >= the last acknowledged record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MAGIC: [u8; 4] = *b"HPRC";
pub const HEADER_LEN: usize = 16;
pub const TRAILER_LEN: usize = 4;
/// Records larger than this are refused (bounds the checker's reads).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// How payload sizes are chosen.
#[derive(Clone, Copy, Debug)]
pub enum SizeSpec {
    Fixed(usize),
    /// Uniform in min..=max, from (seed, seq).
    Range(usize, usize),
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The payload length of record `seq`.
pub fn payload_len(seed: u64, seq: u64, size: SizeSpec) -> usize {
    match size {
        SizeSpec::Fixed(n) => n.min(MAX_PAYLOAD),
        SizeSpec::Range(lo, hi) => {
            let (lo, hi) = (
                lo.min(MAX_PAYLOAD),
                hi.min(MAX_PAYLOAD).max(lo.min(MAX_PAYLOAD)),
            );
            lo + (mix(seed ^ seq.rotate_left(17)) as usize) % (hi - lo + 1)
        }
    }
}

/// The payload of record `seq`: deterministic bytes from (seed, seq).
pub fn payload(seed: u64, seq: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut s = seed ^ seq.wrapping_mul(0x2545_F491_4F6C_DD1D);
    while out.len() < len {
        s = mix(s);
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The encoded record `seq` with a payload of `len` bytes.
pub fn encode(seed: u64, seq: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + len + TRAILER_LEN);
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&(len as u32).to_le_bytes());
    v.extend_from_slice(&payload(seed, seq, len));
    let crc = crc32fast::hash(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

/// Tries to decode an intact record at the start of `b`: (seq, total length).
pub fn decode(seed: u64, b: &[u8]) -> Option<(u64, usize)> {
    if b.len() < HEADER_LEN + TRAILER_LEN || b[..4] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(b[4..12].try_into().ok()?);
    let len = u32::from_le_bytes(b[12..16].try_into().ok()?) as usize;
    if len > MAX_PAYLOAD || b.len() < HEADER_LEN + len + TRAILER_LEN {
        return None;
    }
    let body = &b[..HEADER_LEN + len];
    let crc = u32::from_le_bytes(
        b[HEADER_LEN + len..HEADER_LEN + len + TRAILER_LEN]
            .try_into()
            .ok()?,
    );
    if crc32fast::hash(body) != crc || body[HEADER_LEN..] != payload(seed, seq, len)[..] {
        return None;
    }
    Some((seq, HEADER_LEN + len + TRAILER_LEN))
}

/// What one file holds.
#[derive(Debug, Default, Clone)]
pub struct FileScan {
    /// Sequence numbers of the intact records, in file order.
    pub seqs: Vec<u64>,
    /// Offset and length of bytes after the last intact record.
    pub torn: Option<(usize, usize)>,
    /// Problems: an intact record after unparsable bytes, etc.
    pub errors: Vec<String>,
}

/// Parses a file's bytes into records and a possible torn tail.
pub fn scan_bytes(seed: u64, data: &[u8]) -> FileScan {
    let mut s = FileScan::default();
    let mut off = 0;
    while off < data.len() {
        match decode(seed, &data[off..]) {
            Some((seq, n)) => {
                s.seqs.push(seq);
                off += n;
            }
            None => {
                s.torn = Some((off, data.len() - off));
                // Unparsable bytes may only be a torn last record: no intact
                // record may follow them anywhere.
                let mut i = off + 1;
                while i + HEADER_LEN <= data.len() {
                    if data[i..i + 4] == MAGIC {
                        if let Some((seq, _)) = decode(seed, &data[i..]) {
                            s.errors.push(format!(
                                "intact record {seq} at byte {i} follows {} unparsable bytes at {off}",
                                i - off
                            ));
                            break;
                        }
                    }
                    i += 1;
                }
                break;
            }
        }
    }
    s
}

/// The result of a successful check.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub acked: u64,
    /// Highest record present (records 1..=present are all intact).
    pub present: u64,
    pub files: usize,
    /// Files ending in a torn record (0 or 1).
    pub torn_files: usize,
}

/// The last acknowledged record in an ack log ("acked N" lines, N = 1, 2,
/// ... consecutively; a torn last line is ignored). 0 if none.
pub fn read_ack_log(path: &Path) -> Result<u64, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("reading ack log {}: {e}", path.display())),
    };
    let text = String::from_utf8_lossy(&text);
    let mut last = 0u64;
    let complete = if text.ends_with('\n') {
        text.as_ref()
    } else {
        text.rsplit_once('\n').map(|x| x.0).unwrap_or("")
    };
    for line in complete.lines() {
        let n: u64 = line
            .strip_prefix("acked ")
            .and_then(|x| x.trim().parse().ok())
            .ok_or_else(|| format!("ack log {}: bad line {line:?}", path.display()))?;
        if n != last + 1 {
            return Err(format!(
                "ack log {}: acked {n} after {last}",
                path.display()
            ));
        }
        last = n;
    }
    Ok(last)
}

/// Checks record files against the last acked record: every record
/// 1..=acked is present and intact, records are in order within each file,
/// the records present are exactly 1..=M (no gap: nothing later without
/// everything earlier), no record appears twice, and at most one file ends
/// with a torn record.
pub fn check_records(files: &[PathBuf], seed: u64, acked: u64) -> Result<CheckReport, Vec<String>> {
    let mut errors = Vec::new();
    let mut where_: BTreeMap<u64, String> = BTreeMap::new();
    let mut torn_files = Vec::new();
    for f in files {
        let data = match std::fs::read(f) {
            Ok(d) => d,
            Err(e) => {
                errors.push(format!("reading {}: {e}", f.display()));
                continue;
            }
        };
        let s = scan_bytes(seed, &data);
        for e in s.errors {
            errors.push(format!("{}: {e}", f.display()));
        }
        for w in s.seqs.windows(2) {
            if w[1] <= w[0] {
                errors.push(format!(
                    "{}: record {} after record {}",
                    f.display(),
                    w[1],
                    w[0]
                ));
            }
        }
        for q in &s.seqs {
            if let Some(other) = where_.insert(*q, f.display().to_string()) {
                errors.push(format!(
                    "record {q} present twice: {other} and {}",
                    f.display()
                ));
            }
        }
        if let Some((off, len)) = s.torn {
            torn_files.push(format!("{} ({len} bytes at {off})", f.display()));
        }
    }
    let present = where_.keys().next_back().copied().unwrap_or(0);
    let missing: Vec<u64> = (1..=present.max(acked))
        .filter(|q| !where_.contains_key(q))
        .take(10)
        .collect();
    if !missing.is_empty() {
        errors.push(format!(
            "records missing (first {}): {missing:?}; highest present {present}, last acked {acked}",
            missing.len()
        ));
    }
    if torn_files.len() > 1 {
        errors.push(format!(
            "more than one file ends with a torn record: {torn_files:?}"
        ));
    }
    if errors.is_empty() {
        Ok(CheckReport {
            acked,
            present,
            files: files.len(),
            torn_files: torn_files.len(),
        })
    } else {
        Err(errors)
    }
}

/// The record files of a multi-file run in `dir`: regular files named
/// `slot-*`, sorted.
pub fn multi_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let rd = std::fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|e| format!("listing {}: {e}", dir.display()))?;
        let name = e.file_name();
        let is_file = e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if is_file && name.to_string_lossy().starts_with("slot-") {
            v.push(e.path());
        }
    }
    v.sort();
    Ok(v)
}

/// The slot (file) of record `seq` in a multi-file run.
pub fn slot_of(seed: u64, seq: u64, files: u32) -> u32 {
    (mix(seed.rotate_left(7) ^ seq) % u64::from(files.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_records(seed: u64, seqs: &[u64], size: SizeSpec) -> Vec<u8> {
        let mut v = Vec::new();
        for &q in seqs {
            v.extend(encode(seed, q, payload_len(seed, q, size)));
        }
        v
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let seed = 7;
        let mut d = write_records(seed, &[1, 2, 3], SizeSpec::Range(0, 5000));
        let s = scan_bytes(seed, &d);
        assert_eq!(s.seqs, vec![1, 2, 3]);
        assert!(s.torn.is_none());
        let r4 = encode(seed, 4, 100);
        d.extend_from_slice(&r4[..50]);
        let s = scan_bytes(seed, &d);
        assert_eq!(s.seqs, vec![1, 2, 3]);
        assert_eq!(s.torn.map(|t| t.1), Some(50));
        assert!(s.errors.is_empty());
    }

    #[test]
    fn garbage_before_a_record_is_an_error() {
        let seed = 9;
        let mut d = write_records(seed, &[1], SizeSpec::Fixed(64));
        d.extend_from_slice(&[0u8; 100]);
        d.extend(encode(seed, 2, 64));
        let s = scan_bytes(seed, &d);
        assert_eq!(s.seqs, vec![1]);
        assert_eq!(s.errors.len(), 1, "{:?}", s.errors);
    }

    #[test]
    fn flipped_byte_is_detected() {
        let seed = 3;
        let mut d = write_records(seed, &[1, 2], SizeSpec::Fixed(64));
        let n = d.len();
        d[n - 30] ^= 1;
        assert_eq!(scan_bytes(seed, &d).seqs, vec![1]);
    }

    #[test]
    fn checker_rules() {
        let dir = tempfile::tempdir().unwrap();
        let seed = 11;
        let a = dir.path().join("slot-0");
        let b = dir.path().join("slot-1");
        std::fs::write(&a, write_records(seed, &[1, 3, 4], SizeSpec::Fixed(10))).unwrap();
        std::fs::write(&b, write_records(seed, &[2, 5], SizeSpec::Fixed(10))).unwrap();
        let files = multi_files(dir.path()).unwrap();
        assert_eq!(check_records(&files, seed, 5).unwrap().present, 5);
        assert!(
            check_records(&files, seed, 6).is_err(),
            "acked beyond present"
        );
        // A gap (record 2 lost, 3.. present) is a reordering.
        std::fs::write(&b, write_records(seed, &[5], SizeSpec::Fixed(10))).unwrap();
        let e = check_records(&files, seed, 1).unwrap_err();
        assert!(e[0].contains("missing"), "{e:?}");
        // Two torn files are refused.
        let mut x = write_records(seed, &[1, 3, 4], SizeSpec::Fixed(10));
        x.extend_from_slice(b"HPRC");
        std::fs::write(&a, x).unwrap();
        let mut y = write_records(seed, &[2, 5], SizeSpec::Fixed(10));
        y.extend_from_slice(b"xx");
        std::fs::write(&b, y).unwrap();
        assert!(check_records(&files, seed, 5).is_err());
    }

    #[test]
    fn ack_log_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("acks");
        assert_eq!(read_ack_log(&p).unwrap(), 0);
        std::fs::write(&p, "acked 1\nacked 2\nack").unwrap();
        assert_eq!(read_ack_log(&p).unwrap(), 2);
        std::fs::write(&p, "acked 1\nacked 3\n").unwrap();
        assert!(read_ack_log(&p).is_err());
    }
}
