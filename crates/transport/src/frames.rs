//! Frame I/O over QUIC streams, with hapair-proto's framing: a big-endian
//! u32 length of what follows, then the body.

use anyhow::{bail, Context, Result};
use hapair_proto::{encode_frame, frame_body_len, BufPool, PooledBuf};

/// Writes frames to a QUIC send stream.
pub struct FrameWriter {
    stream: quinn::SendStream,
    /// Reused between frames so that steady streaming does not allocate.
    buf: Vec<u8>,
}

impl FrameWriter {
    pub fn new(stream: quinn::SendStream) -> Self {
        FrameWriter {
            stream,
            buf: Vec::new(),
        }
    }

    /// Encodes one frame with [`hapair_proto::encode_frame`] and writes it.
    pub async fn send<H: serde::Serialize>(&mut self, header: &H, payload: &[u8]) -> Result<()> {
        self.buf.clear();
        encode_frame(header, payload, &mut self.buf).context("cannot encode frame")?;
        self.stream
            .write_all(&self.buf)
            .await
            .context("cannot write frame to the stream")?;
        // Do not keep a buffer sized for the largest frame ever sent forever.
        if self.buf.capacity() > 2 * hapair_proto::MAX_WRITE_PAYLOAD {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Writes already-encoded frames (one contiguous buffer of frames built
    /// with [`hapair_proto::encode_frame`]) in one call.
    pub async fn send_raw(&mut self, encoded: &[u8]) -> Result<()> {
        self.stream
            .write_all(encoded)
            .await
            .context("cannot write frames to the stream")?;
        Ok(())
    }

    /// Writes already-encoded frames given as chunks (see
    /// [`hapair_proto::encode_frame_head`]) without copying them: the stream
    /// keeps references to the chunks until the peer acknowledged them.
    pub async fn send_chunks(&mut self, chunks: &mut [bytes::Bytes]) -> Result<()> {
        self.stream
            .write_all_chunks(chunks)
            .await
            .context("cannot write frames to the stream")?;
        Ok(())
    }

    /// Marks the end of the stream. Data written so far is still delivered
    /// as long as the connection stays open; this does not wait for the peer.
    pub async fn finish(mut self) -> Result<()> {
        self.stream.finish().context("cannot finish the stream")?;
        Ok(())
    }

    /// The underlying stream (for priorities, or to wait for `stopped`).
    pub fn stream_mut(&mut self) -> &mut quinn::SendStream {
        &mut self.stream
    }
}

/// Reads frames from a QUIC receive stream.
///
/// [`FrameReader::next_body`] is cancel-safe: the partial frame is kept in
/// the reader, so it can be used in `tokio::select!` or under a timeout and
/// called again.
///
/// A large body is read into a buffer of the reader's pool, placed so that
/// its payload (what follows the header) starts on a
/// [`hapair_proto::buf::DIRECT_ALIGN`] boundary: the mirror writes it to
/// the disk from there, and nothing is zeroed or moved on the way.
pub struct FrameReader {
    stream: quinn::RecvStream,
    /// The length prefix, then the body's first 4 bytes (the header's
    /// length, which says where the payload starts).
    prefix: [u8; 8],
    prefix_filled: usize,
    /// The body being read, once its length is known.
    body: Option<PooledBuf>,
    body_filled: usize,
    pool: BufPool,
}

impl FrameReader {
    pub fn new(stream: quinn::RecvStream) -> Self {
        FrameReader {
            stream,
            prefix: [0; 8],
            prefix_filled: 0,
            body: None,
            body_filled: 0,
            pool: BufPool::default(),
        }
    }

    /// Reads one frame body (the bytes after the length prefix). A length
    /// over [`hapair_proto::MAX_FRAME_BYTES`] is refused before anything is
    /// allocated. Returns `Ok(None)` when the peer finished the stream
    /// cleanly between frames; an end inside a frame is an error.
    pub async fn next_body(&mut self) -> Result<Option<PooledBuf>> {
        if self.body.is_none() {
            loop {
                if self.prefix_filled >= 4 {
                    // Refused as soon as the length is known (and again on
                    // every later call: the stream is out of step).
                    let [a, b, c, d, ..] = self.prefix;
                    frame_body_len([a, b, c, d]).context("refusing frame")?;
                }
                if self.prefix_filled == self.prefix.len() {
                    break;
                }
                let n = self
                    .stream
                    .read(&mut self.prefix[self.prefix_filled..])
                    .await
                    .context("cannot read a frame length from the stream")?;
                match n {
                    Some(n) => self.prefix_filled += n,
                    None if self.prefix_filled == 0 => return Ok(None),
                    None if self.prefix_filled < 4 => bail!(
                        "stream ended inside a frame length ({} of 4 bytes)",
                        self.prefix_filled
                    ),
                    None => bail!(
                        "stream ended inside a frame ({} of at least 4 bytes)",
                        self.prefix_filled - 4
                    ),
                }
            }
            let [a, b, c, d, h0, h1, h2, h3] = self.prefix;
            // At least 4: `frame_body_len` refuses shorter bodies.
            let len = frame_body_len([a, b, c, d]).context("refusing frame")?;
            let hlen = u32::from_be_bytes([h0, h1, h2, h3]) as usize;
            // A header length that does not fit is refused by the decoder.
            let payload_at = 4usize.saturating_add(hlen).min(len);
            let mut body = self.pool.take(len, payload_at);
            body[..4].copy_from_slice(&[h0, h1, h2, h3]);
            self.body = Some(body);
            self.body_filled = 4;
        }
        if let Some(body) = self.body.as_mut() {
            while self.body_filled < body.len() {
                let n = self
                    .stream
                    .read(&mut body[self.body_filled..])
                    .await
                    .context("cannot read a frame from the stream")?;
                match n {
                    Some(n) => self.body_filled += n,
                    None => bail!(
                        "stream ended inside a frame ({} of {} bytes)",
                        self.body_filled,
                        body.len()
                    ),
                }
            }
        }
        self.prefix_filled = 0;
        self.body_filled = 0;
        Ok(self.body.take())
    }

    /// The underlying stream (for example to `stop` it).
    pub fn stream_mut(&mut self) -> &mut quinn::RecvStream {
        &mut self.stream
    }
}
