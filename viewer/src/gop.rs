//! One GOP stream's bytes as they arrive, in any order, turned back into frames; with the
//! camera's parity datagrams ([`peercam_common::fec`]) filling holes that quinn has not
//! retransmitted yet.
//!
//! The stream is read unordered (`read_chunk(_, false)`): bytes after a lost packet are
//! kept instead of waiting in quinn, so once the parity rows of a frame are in, the hole
//! is rebuilt and the frame delivered without the retransmission's round trip. Frames
//! still come out in order: a P-frame is useless before the frames it refers to. This
//! module does not decide when to give up on a GOP; `receive` does.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use peercam_common::fec::{Codecs, ParityHeader};
use peercam_common::media::{FrameHeader, GopHeader, MAX_FRAME_PAYLOAD};
use quinn::RecvStream;
use tokio::sync::mpsc;

/// Most bytes kept ahead of the first missing one (quinn's stream window bounds it too).
const MAX_AHEAD: u64 = (MAX_FRAME_PAYLOAD + 1024 * 1024) as u64;
/// Most parity datagrams kept for streams not being read yet.
const MAX_STORED: usize = 4096;

/// Received byte ranges of a stream, sorted, disjoint, merged.
#[derive(Debug, Default)]
struct Ranges(Vec<Range<u64>>);

impl Ranges {
    fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let mut merged = r;
        self.0.retain(|x| {
            let touches = x.start <= merged.end && merged.start <= x.end;
            if touches {
                merged = merged.start.min(x.start)..merged.end.max(x.end);
            }
            !touches
        });
        let at = self.0.partition_point(|x| x.start < merged.start);
        self.0.insert(at, merged);
    }

    /// End of the run of received bytes that starts at or before `from`.
    fn contiguous_end(&self, from: u64) -> u64 {
        self.0
            .iter()
            .find(|x| x.start <= from && from < x.end)
            .map_or(from, |x| x.end)
    }

    /// The holes inside `within`.
    fn holes(&self, within: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut at = within.start;
        for x in &self.0 {
            if x.end <= at {
                continue;
            }
            if x.start >= within.end {
                break;
            }
            if x.start > at {
                out.push(at..x.start);
            }
            at = at.max(x.end);
        }
        if at < within.end {
            out.push(at..within.end);
        }
        out
    }

    /// Forgets everything before `at`.
    fn trim(&mut self, at: u64) {
        self.0.retain(|x| x.end > at);
        if let Some(first) = self.0.first_mut() {
            first.start = first.start.max(at);
        }
    }
}

/// The parity rows of one protected block, as they arrive.
#[derive(Debug)]
struct ParityBlock {
    header: ParityHeader,
    rows: Vec<Option<Bytes>>,
}

/// Parity rows held by these blocks.
fn rows_held<'a>(blocks: impl IntoIterator<Item = &'a ParityBlock>) -> usize {
    blocks
        .into_iter()
        .map(|b| b.rows.iter().flatten().count())
        .sum()
}

/// Parity datagrams by stream, for the stream being read and the ones queued behind it.
#[derive(Default)]
pub(crate) struct ParityStore {
    by_stream: BTreeMap<u64, Vec<ParityBlock>>,
    stored: usize,
    codecs: Codecs,
}

impl ParityStore {
    /// Files one datagram; garbage is ignored (the camera is authenticated, but a
    /// datagram is only ever a hint: the stream's own bytes are what quinn guarantees).
    pub(crate) fn add(&mut self, datagram: &Bytes) {
        let Ok((header, row)) = ParityHeader::decode(datagram) else {
            return;
        };
        let blocks = self.by_stream.entry(header.stream).or_default();
        let block = match blocks
            .iter_mut()
            .position(|b| b.header.start == header.start && b.header.len == header.len)
        {
            Some(i) => &mut blocks[i],
            None => {
                blocks.push(ParityBlock {
                    header,
                    rows: vec![None; header.parity as usize],
                });
                let last = blocks.len() - 1;
                &mut blocks[last]
            }
        };
        let same_shape = block.header.rows == header.rows && block.header.parity == header.parity;
        let width_ok = block.rows.iter().flatten().all(|r| r.len() == row.len());
        if let (true, true, Some(slot)) = (
            same_shape,
            width_ok,
            block.rows.get_mut(header.index as usize),
        ) {
            if slot.is_none() {
                *slot = Some(row);
                self.stored += 1;
            }
        }
        while self.stored > MAX_STORED {
            let Some((_, dropped)) = self.by_stream.pop_first() else {
                break;
            };
            self.stored -= rows_held(&dropped);
        }
    }

    /// Forgets the parity of `stream` and of every older stream of the same kind.
    pub(crate) fn forget_up_to(&mut self, stream: u64) {
        let keep = self.by_stream.split_off(&(stream + 1));
        let gone = std::mem::replace(&mut self.by_stream, keep);
        self.stored -= rows_held(gone.values().flatten());
    }
}

/// How reading one GOP stream ended, or failed.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// This GOP broke (reset, bad data): go on with the next.
    Broken(String),
    /// The connection is gone.
    ConnectionLost,
}

/// One GOP stream being reassembled.
pub(crate) struct Assembly {
    stream: RecvStream,
    id: u64,
    /// Stream offset of `buf[0]`: everything before it was handed out.
    base: u64,
    buf: BytesMut,
    have: Ranges,
    finished: bool,
    gop: Option<GopHeader>,
    /// Frames completed from parity rather than quinn's retransmission.
    pub(crate) repaired: u64,
}

impl Assembly {
    pub(crate) fn new(stream: RecvStream) -> Self {
        let id = u64::from(quinn::VarInt::from(stream.id()));
        Assembly {
            stream,
            id,
            base: 0,
            buf: BytesMut::new(),
            have: Ranges::default(),
            finished: false,
            gop: None,
            repaired: 0,
        }
    }

    /// Stops the stream: this viewer no longer wants it.
    pub(crate) fn stop(&mut self) {
        let _ = self.stream.stop(quinn::VarInt::from_u32(0));
    }

    /// Whether bytes of a frame not handed out yet have arrived.
    pub(crate) fn pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The stream's id, as the camera's parity datagrams name it.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The GOP header; `Ok(None)` if the stream ended before it.
    pub(crate) async fn header(
        &mut self,
        parity: &mut ParityStore,
        datagrams: &mut mpsc::Receiver<Bytes>,
    ) -> Result<Option<GopHeader>, ReadEnd> {
        while self.gop.is_none() {
            if self.contiguous() >= GopHeader::LEN as u64 {
                let head = self.take(GopHeader::LEN);
                let gop = GopHeader::decode(&head)
                    .map_err(|_| ReadEnd::Broken("stream without a GOP header".into()))?;
                self.gop = Some(gop);
            } else if self.finished {
                return Ok(None);
            } else {
                self.fill(parity, datagrams).await?;
            }
        }
        Ok(self.gop)
    }

    /// The next frame in order; `Ok(None)` at a clean end of the stream.
    pub(crate) async fn next_frame(
        &mut self,
        parity: &mut ParityStore,
        datagrams: &mut mpsc::Receiver<Bytes>,
    ) -> Result<Option<(FrameHeader, Bytes)>, ReadEnd> {
        loop {
            let ready = self.contiguous();
            if ready >= FrameHeader::LEN as u64 {
                // `decode` refuses lengths above MAX_FRAME_PAYLOAD.
                let header = FrameHeader::decode(&self.buf[..FrameHeader::LEN])
                    .map_err(|e| ReadEnd::Broken(e.to_string()))?;
                let total = FrameHeader::LEN + header.len as usize;
                if ready >= total as u64 {
                    let mut record = self.take(total);
                    return Ok(Some((header, record.split_off(FrameHeader::LEN))));
                }
            }
            if self.finished {
                // quinn has handed out every byte, so there is no hole left to wait for.
                return match ready {
                    0 => Ok(None),
                    _ => Err(ReadEnd::Broken("truncated frame".into())),
                };
            }
            if self.repair(parity) {
                self.repaired += 1;
                continue;
            }
            self.fill(parity, datagrams).await?;
        }
    }

    /// Bytes available in order from `base`.
    fn contiguous(&self) -> u64 {
        self.have.contiguous_end(self.base) - self.base
    }

    /// Hands out `n` bytes from `base`.
    fn take(&mut self, n: usize) -> Bytes {
        let out = self.buf.split_to(n).freeze();
        self.base += n as u64;
        self.have.trim(self.base);
        out
    }

    /// Waits for the next chunk of the stream or parity datagram and files it.
    async fn fill(
        &mut self,
        parity: &mut ParityStore,
        datagrams: &mut mpsc::Receiver<Bytes>,
    ) -> Result<(), ReadEnd> {
        tokio::select! {
            chunk = self.stream.read_chunk(usize::MAX, false), if !self.finished => match chunk {
                Ok(Some(c)) => self.put(c.offset, &c.bytes),
                Ok(None) => {
                    self.finished = true;
                    Ok(())
                }
                Err(quinn::ReadError::Reset(code)) => {
                    Err(ReadEnd::Broken(format!("reset by camera ({code})")))
                }
                Err(quinn::ReadError::ConnectionLost(_)) => Err(ReadEnd::ConnectionLost),
                Err(e) => Err(ReadEnd::Broken(e.to_string())),
            },
            Some(d) = datagrams.recv() => {
                parity.add(&d);
                Ok(())
            }
            else => Err(ReadEnd::ConnectionLost),
        }
    }

    /// Files received bytes at stream offset `at`.
    fn put(&mut self, at: u64, bytes: &[u8]) -> Result<(), ReadEnd> {
        let end = at + bytes.len() as u64;
        if end <= self.base {
            return Ok(()); // a retransmission of something rebuilt or handed out already
        }
        if end > self.base + MAX_AHEAD {
            return Err(ReadEnd::Broken("stream data too far ahead".into()));
        }
        let skip = self.base.saturating_sub(at) as usize;
        let from = at.max(self.base);
        self.grow_to(end);
        let i = (from - self.base) as usize;
        self.buf[i..i + bytes.len() - skip].copy_from_slice(&bytes[skip..]);
        self.have.insert(from..end);
        Ok(())
    }

    fn grow_to(&mut self, end: u64) {
        let len = (end - self.base) as usize;
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
    }

    /// Rebuilds the first hole from parity, if a block covering it has enough rows.
    fn repair(&mut self, parity: &mut ParityStore) -> bool {
        let hole = self.have.contiguous_end(self.base);
        let ParityStore {
            by_stream, codecs, ..
        } = parity;
        let Some(blocks) = by_stream.get(&self.id) else {
            return false;
        };
        let Some(block) = blocks.iter().find(|b| b.header.range().contains(&hole)) else {
            return false;
        };
        let range = block.header.range();
        if range.start < self.base || range.end > self.base + MAX_AHEAD {
            return false;
        }
        let holes: Vec<Range<usize>> = self
            .have
            .holes(range.clone())
            .into_iter()
            .map(|h| (h.start - range.start) as usize..(h.end - range.start) as usize)
            .collect();
        self.grow_to(range.end);
        let i = (range.start - self.base) as usize;
        let bytes = &mut self.buf[i..i + block.header.len as usize];
        if !codecs.recover(bytes, &holes, block.header.rows as usize, &block.rows) {
            return false;
        }
        self.have.insert(range);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_report_holes() {
        let mut r = Ranges::default();
        r.insert(10..20);
        r.insert(30..40);
        r.insert(0..5);
        assert_eq!(r.holes(0..50), vec![5..10, 20..30, 40..50]);
        r.insert(18..31);
        assert_eq!(r.0, vec![0..5, 10..40]);
        assert_eq!(r.contiguous_end(0), 5);
        assert_eq!(r.contiguous_end(12), 40);
        assert_eq!(r.contiguous_end(7), 7);
        r.insert(5..10);
        assert_eq!(r.0, vec![0..40]);
        r.trim(25);
        assert_eq!(r.0, vec![25..40]);
        assert_eq!(r.holes(20..45), vec![20..25, 40..45]);
    }

    #[test]
    fn parity_store_is_bounded_and_forgets_old_streams() {
        let mut store = ParityStore::default();
        let header = |stream: u64, start: u64| ParityHeader {
            stream,
            start,
            len: 2000,
            rows: 2,
            parity: 1,
            index: 0,
        };
        for i in 0..(MAX_STORED as u64 + 100) {
            store.add(&header(i / 1000, i * 2000).encode(&[1; 1000]));
            store.add(&header(i / 1000, i * 2000).encode(&[1; 1000])); // duplicate
        }
        assert!(store.stored <= MAX_STORED);
        assert!(
            !store.by_stream.contains_key(&0),
            "oldest stream dropped first"
        );
        store.forget_up_to(3);
        assert!(store.by_stream.keys().all(|&s| s > 3));
        let left = rows_held(store.by_stream.values().flatten());
        assert_eq!(left, store.stored);
        store.add(&Bytes::from_static(b"garbage"));
    }
}
