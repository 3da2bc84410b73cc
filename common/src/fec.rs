//! Forward error correction for GOP streams: parity rows sent as QUIC datagrams beside a
//! frame's stream bytes, so a viewer rebuilds bytes lost on the way instead of waiting a
//! round trip (or several, when the retransmission is lost too) for quinn to resend them.
//! Pure: no sockets, no clocks. quinn still retransmits what was lost; the viewer just
//! does not have to wait for it.
//!
//! Layout: a protected range of the stream (one frame record, [`FrameHeader`] and
//! payload; a large frame is cut into blocks of at most [`MAX_ROWS`] rows) is laid out in
//! rows of `width` bytes, the last padded with zeros. Reed-Solomon over GF(2^8), applied
//! column by column, gives `parity` rows of `width` bytes, one per datagram. A lost QUIC
//! packet is one contiguous run of stream bytes about one row long, so it erases each
//! column once (twice for the few bytes by which a packet's stream payload exceeds a
//! row). Every column with no more erasures than parity rows at hand is rebuilt. Columns,
//! not packets, are the unit because quinn, not us, decides where packets cut the stream.
//!
//! [`FrameHeader`]: crate::media::FrameHeader

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use reed_solomon_erasure::galois_8::ReedSolomon;

use crate::media::{FrameHeader, MAX_FRAME_PAYLOAD};

/// Most data rows one parity block covers (a larger frame is cut into several blocks):
/// keeps the code's matrices small and GF(2^8)'s 256-shard limit far away.
pub const MAX_ROWS: usize = 128;
/// Most parity rows per block.
pub const MAX_PARITY: usize = 32;
/// Below this packet loss rate no parity is sent: retransmission alone is fast enough.
pub const MIN_LOSS: f64 = 0.005;
/// Narrowest row worth sending: below it the header outweighs the parity.
pub const MIN_WIDTH: usize = 256;

/// Header of one parity datagram, followed by `width` bytes of one parity row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParityHeader {
    /// The GOP stream (QUIC stream id) the protected bytes travel on.
    pub stream: u64,
    /// Stream offset of the first protected byte.
    pub start: u64,
    /// Number of protected bytes.
    pub len: u32,
    /// Data rows: `len` bytes cut into rows of the datagram's width.
    pub rows: u8,
    /// Parity rows of this block.
    pub parity: u8,
    /// Which parity row this datagram carries, `0..parity`.
    pub index: u8,
}

/// A parity datagram that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad parity datagram: {0}")]
pub struct ParityError(&'static str);

impl ParityHeader {
    /// Encoded size.
    pub const LEN: usize = 24;
    /// First byte: the kind of datagram (room for others later).
    pub const KIND: u8 = 0xfe;

    /// Encodes the header followed by the parity row.
    pub fn encode(&self, row: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(Self::LEN + row.len());
        out.put_u8(Self::KIND);
        out.put_u64(self.stream);
        out.put_u64(self.start);
        out.put_u32(self.len);
        out.put_u8(self.rows);
        out.put_u8(self.parity);
        out.put_u8(self.index);
        out.extend_from_slice(row);
        Bytes::from(out)
    }

    /// Decodes a datagram into its header and parity row, checking that the fields agree.
    pub fn decode(d: &Bytes) -> Result<(Self, Bytes), ParityError> {
        if d.len() < Self::LEN + 1 || d[0] != Self::KIND {
            return Err(ParityError("too short or not a parity datagram"));
        }
        let u64_at = |i: usize| u64::from_be_bytes(d[i..i + 8].try_into().unwrap_or([0; 8]));
        let h = ParityHeader {
            stream: u64_at(1),
            start: u64_at(9),
            len: u32::from_be_bytes(d[17..21].try_into().unwrap_or([0; 4])),
            rows: d[21],
            parity: d[22],
            index: d[23],
        };
        let width = d.len() - Self::LEN;
        let (rows, len) = (h.rows as usize, h.len as usize);
        if rows == 0 || rows > MAX_ROWS || h.parity == 0 || h.parity as usize > MAX_PARITY {
            return Err(ParityError("row counts out of range"));
        }
        if h.index >= h.parity {
            return Err(ParityError("parity index out of range"));
        }
        if len == 0 || len > rows * width || len <= (rows - 1) * width {
            return Err(ParityError("length does not match rows and width"));
        }
        if len > MAX_FRAME_PAYLOAD + FrameHeader::LEN || h.start.checked_add(h.len as u64).is_none()
        {
            return Err(ParityError("range out of bounds"));
        }
        Ok((h, d.slice(Self::LEN..)))
    }

    /// The protected stream range.
    pub fn range(&self) -> Range<u64> {
        self.start..self.start + self.len as u64
    }
}

/// How many parity rows to send for `rows` data rows at a packet loss rate `loss`: the
/// expected losses plus two standard deviations (Poisson), at least two, so all but a few percent of
/// frames are whole without a retransmission; none below [`MIN_LOSS`]. (With 1.5, one
/// 50 kB keyframe in eight at 5 % loss still waited for a retransmission, and the frames
/// behind it with it.)
pub fn parity_rows(rows: usize, loss: f64) -> usize {
    if loss.is_nan() || loss < MIN_LOSS || rows == 0 {
        return 0;
    }
    let expected = rows as f64 * loss.min(0.5);
    let m = (expected + 2.0 * expected.sqrt()).ceil() as usize;
    // At least two: a full packet carries a few more stream bytes than a datagram can
    // carry parity (its frame header is smaller than a datagram's plus ours), so one
    // lost packet erases some columns twice and one parity row never rebuilds it.
    m.clamp(2, MAX_PARITY)
}

/// A connection's packet loss rate, smoothed, from quinn's running counters of packets
/// sent and declared lost (`ConnectionStats::path`). Parity sent is counted too, so the
/// estimate includes the datagrams' own losses.
#[derive(Debug, Default, Clone)]
pub struct LossEstimate {
    last: Option<(u64, u64)>,
    rate: Option<f64>,
}

impl LossEstimate {
    /// Packets between two samples: fewer make the rate too noisy to act on.
    const SAMPLE_PACKETS: u64 = 64;
    /// Weight of a new sample.
    const GAIN: f64 = 0.3;

    /// Takes the counters now and returns the smoothed loss rate (0 until a sample).
    pub fn update(&mut self, sent: u64, lost: u64) -> f64 {
        match self.last {
            None => self.last = Some((sent, lost)),
            Some((s0, l0)) if sent >= s0 + Self::SAMPLE_PACKETS => {
                let sample = (lost.saturating_sub(l0) as f64 / (sent - s0) as f64).min(1.0);
                self.rate = Some(match self.rate {
                    None => sample,
                    Some(r) => r + Self::GAIN * (sample - r),
                });
                self.last = Some((sent, lost));
            }
            Some(_) => {}
        }
        self.rate.unwrap_or(0.0)
    }
}

/// Reed-Solomon codecs by shape, built once: building one inverts a matrix.
#[derive(Default)]
pub struct Codecs {
    by_shape: HashMap<(usize, usize), Arc<ReedSolomon>>,
}

impl Codecs {
    /// Most shapes kept; the map starts over when full (shapes repeat frame after frame).
    const CAPACITY: usize = 64;

    fn get(&mut self, rows: usize, parity: usize) -> Option<Arc<ReedSolomon>> {
        if let Some(c) = self.by_shape.get(&(rows, parity)) {
            return Some(c.clone());
        }
        let codec = Arc::new(ReedSolomon::new(rows, parity).ok()?);
        if self.by_shape.len() >= Self::CAPACITY {
            self.by_shape.clear();
        }
        self.by_shape.insert((rows, parity), codec.clone());
        Some(codec)
    }

    /// Parity datagrams, each at most `max_datagram` bytes, for `record`, which starts at
    /// stream offset `start` of `stream`, with parity for a packet loss rate of `loss`.
    /// Empty when no parity is due or the datagrams would be too small to be worth it.
    pub fn protect(
        &mut self,
        stream: u64,
        start: u64,
        record: &[u8],
        max_datagram: usize,
        loss: f64,
    ) -> Vec<Bytes> {
        let mut out = Vec::new();
        let width = max_datagram.saturating_sub(ParityHeader::LEN);
        if width < MIN_WIDTH {
            return out;
        }
        for (i, block) in record.chunks(MAX_ROWS * width).enumerate() {
            let rows = block.len().div_ceil(width);
            let parity = parity_rows(rows, loss);
            if parity == 0 {
                continue;
            }
            let Some(codec) = self.get(rows, parity) else {
                continue;
            };
            let mut data: Vec<&[u8]> = block.chunks(width).collect();
            let padded;
            if let Some(last) = data.last_mut() {
                if last.len() < width {
                    padded = [*last, &vec![0u8; width - last.len()][..]].concat();
                    *last = &padded;
                }
            }
            let mut rows_out = vec![vec![0u8; width]; parity];
            if codec.encode_sep(&data, &mut rows_out).is_err() {
                continue;
            }
            let header = |index: usize| ParityHeader {
                stream,
                start: start + (i * MAX_ROWS * width) as u64,
                len: block.len() as u32,
                rows: rows as u8,
                parity: parity as u8,
                index: index as u8,
            };
            out.extend(
                rows_out
                    .iter()
                    .enumerate()
                    .map(|(j, row)| header(j).encode(row)),
            );
        }
        out
    }

    /// Rebuilds the `missing` byte ranges (relative to the block start, sorted, disjoint)
    /// of `block` in place from the parity rows at hand (`parity[j]` is row `j`, `None` if
    /// it did not arrive; all of one width). Returns false, leaving `block` as it was,
    /// when some column lost more bytes than there are parity rows.
    pub fn recover(
        &mut self,
        block: &mut [u8],
        missing: &[Range<usize>],
        rows: usize,
        parity: &[Option<Bytes>],
    ) -> bool {
        let Some(width) = parity.iter().flatten().map(|p| p.len()).next() else {
            return false;
        };
        if rows == 0
            || block.len() > rows * width
            || parity.iter().flatten().any(|p| p.len() != width)
        {
            return false;
        }
        let have = parity.iter().flatten().count();
        // Erased (row, columns) pieces, and the column boundaries where the set changes.
        let mut pieces: Vec<(usize, Range<usize>)> = Vec::new();
        for hole in missing {
            let hole = hole.start.min(block.len())..hole.end.min(block.len());
            let mut at = hole.start;
            while at < hole.end {
                let row = at / width;
                let end = hole.end.min((row + 1) * width);
                pieces.push((row, at - row * width..end - row * width));
                at = end;
            }
        }
        let mut cuts: Vec<usize> = pieces.iter().flat_map(|(_, c)| [c.start, c.end]).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let segments: Vec<(Range<usize>, Vec<usize>)> = cuts
            .windows(2)
            .filter_map(|w| {
                let erased: Vec<usize> = pieces
                    .iter()
                    .filter(|(_, c)| c.start <= w[0] && w[1] <= c.end)
                    .map(|(r, _)| *r)
                    .collect();
                (!erased.is_empty()).then(|| (w[0]..w[1], erased))
            })
            .collect();
        if segments.iter().any(|(_, erased)| erased.len() > have) {
            return false;
        }
        let Some(codec) = self.get(rows, parity.len()) else {
            return false;
        };
        let mut padded = vec![0u8; rows * width];
        padded[..block.len()].copy_from_slice(block);
        for (cols, erased) in &segments {
            let mut shards: Vec<(Vec<u8>, bool)> = padded
                .chunks(width)
                .enumerate()
                .map(|(r, row)| (row[cols.clone()].to_vec(), !erased.contains(&r)))
                .chain(parity.iter().map(|p| match p {
                    Some(p) => (p[cols.clone()].to_vec(), true),
                    None => (vec![0u8; cols.len()], false),
                }))
                .collect();
            if codec.reconstruct_data(&mut shards).is_err() {
                return false;
            }
            for &r in erased {
                padded[r * width + cols.start..r * width + cols.end].copy_from_slice(&shards[r].0);
            }
        }
        block.copy_from_slice(&padded[..block.len()]);
        true
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // one hole is a slice of one range
mod tests {
    use super::*;

    fn record(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Protects `len` bytes, loses `holes`, recovers with the parity rows kept by `keep`.
    fn round_trip(
        len: usize,
        width: usize,
        loss: f64,
        holes: &[Range<usize>],
        keep: impl Fn(usize) -> bool,
    ) -> bool {
        let mut codecs = Codecs::default();
        let original = record(len);
        let datagrams = codecs.protect(9, 100, &original, width + ParityHeader::LEN, loss);
        assert!(!datagrams.is_empty());
        let (h0, _) = ParityHeader::decode(&datagrams[0]).expect("decodes");
        let mut parity = vec![None; h0.parity as usize];
        for d in &datagrams {
            let (h, row) = ParityHeader::decode(d).expect("decodes");
            assert_eq!((h.stream, h.start, h.len), (9, 100, len as u32));
            if keep(h.index as usize) {
                parity[h.index as usize] = Some(row);
            }
        }
        let mut damaged = original.clone();
        for h in holes {
            damaged[h.clone()].fill(0xaa);
        }
        let ok = codecs.recover(&mut damaged, holes, h0.rows as usize, &parity);
        if ok {
            assert_eq!(damaged, original, "recovered bytes differ");
        } else {
            let mut untouched = original.clone();
            for h in holes {
                untouched[h.clone()].fill(0xaa);
            }
            assert_eq!(
                damaged, untouched,
                "a failed recovery must not touch the block"
            );
        }
        ok
    }

    #[test]
    fn one_lost_packet_spanning_two_rows_is_rebuilt_from_one_parity_row() {
        // 20 kB frame, rows of 1176, a packet of 1150 bytes lost across a row boundary:
        // one of the two parity rows is enough.
        assert!(round_trip(20_000, 1176, 0.005, &[1000..2150], |i| i == 1));
    }

    #[test]
    fn as_many_lost_packets_as_parity_rows_are_rebuilt() {
        // At 5 % loss an 18-row frame gets 3 parity rows: three losses anywhere.
        assert_eq!(parity_rows(18, 0.05), 3);
        let holes = [0..1100, 7000..8150, 19_500..20_000];
        assert!(round_trip(20_000, 1176, 0.05, &holes, |_| true));
    }

    #[test]
    fn a_lost_parity_row_counts_against_the_budget() {
        let holes = [0..1100, 7000..8150];
        assert!(round_trip(20_000, 1176, 0.05, &holes, |i| i != 0));
        let holes = [0..1100, 7000..8150, 12_000..13_000];
        assert!(!round_trip(20_000, 1176, 0.05, &holes, |i| i != 0));
    }

    #[test]
    fn more_losses_than_parity_rows_leave_the_block_untouched() {
        let holes = [0..1100, 3000..4000, 7000..8150, 12_000..13_000];
        assert!(!round_trip(20_000, 1176, 0.05, &holes, |_| true));
    }

    #[test]
    fn packets_longer_than_a_row_erase_some_columns_twice() {
        // A 1200-byte loss with rows of 1176: 24 columns lost twice; one parity row is not
        // enough, two are (so at least two are always sent).
        assert_eq!(parity_rows(18, 0.005), 2);
        assert!(!round_trip(20_000, 1176, 0.005, &[500..1700], |i| i == 0));
        assert!(round_trip(20_000, 1176, 0.005, &[500..1700], |_| true));
    }

    #[test]
    fn large_frames_are_cut_into_blocks_that_recover_independently() {
        let mut codecs = Codecs::default();
        let width = 1000;
        let original = record(300_000);
        let datagrams = codecs.protect(1, 0, &original, width + ParityHeader::LEN, 0.05);
        let headers: Vec<ParityHeader> = datagrams
            .iter()
            .map(|d| ParityHeader::decode(d).expect("decodes").0)
            .collect();
        let starts: std::collections::BTreeSet<u64> = headers.iter().map(|h| h.start).collect();
        assert_eq!(
            starts.into_iter().collect::<Vec<_>>(),
            [0, 128_000, 256_000]
        );
        assert!(headers.iter().all(|h| h.rows as usize <= MAX_ROWS));
        // Lose a packet in the second block and rebuild it from that block's parity.
        let second: Vec<_> = datagrams
            .iter()
            .map(|d| ParityHeader::decode(d).expect("decodes"))
            .filter(|(h, _)| h.start == 128_000)
            .collect();
        let mut parity = vec![None; second[0].0.parity as usize];
        for (h, row) in &second {
            parity[h.index as usize] = Some(row.clone());
        }
        let mut block = original[128_000..256_000].to_vec();
        block[5000..6000].fill(0);
        assert!(codecs.recover(&mut block, &[5000..6000], 128, &parity));
        assert_eq!(block, original[128_000..256_000]);
    }

    #[test]
    fn parity_is_only_sent_when_loss_calls_for_it() {
        assert_eq!(parity_rows(18, 0.0), 0);
        assert_eq!(parity_rows(18, 0.004), 0);
        assert_eq!(parity_rows(18, f64::NAN), 0);
        assert_eq!(parity_rows(100, 0.05), 10);
        assert_eq!(parity_rows(36, 0.05), 5);
        assert_eq!(parity_rows(128, 1.0), MAX_PARITY);
        assert!(Codecs::default()
            .protect(1, 0, &record(5000), 1200, 0.0)
            .is_empty());
        assert!(Codecs::default()
            .protect(1, 0, &record(5000), 100, 0.05)
            .is_empty());
    }

    #[test]
    fn loss_estimate_follows_the_counters_smoothly() {
        let mut e = LossEstimate::default();
        assert_eq!(e.update(0, 0), 0.0);
        assert_eq!(e.update(10, 5), 0.0, "too few packets for a sample");
        assert!((e.update(100, 5) - 0.05).abs() < 1e-9);
        // A clean stretch lowers it gradually.
        let after = e.update(200, 5);
        assert!(after > 0.0 && after < 0.05);
        for i in 0..40 {
            e.update(300 + i * 100, 5);
        }
        assert!(e.update(10_000, 5) < MIN_LOSS);
    }

    #[test]
    fn header_golden_bytes() {
        let h = ParityHeader {
            stream: 3,
            start: 0x0102,
            len: 2000,
            rows: 2,
            parity: 1,
            index: 0,
        };
        let d = h.encode(&[0xee; 1000]);
        assert_eq!(
            &d[..ParityHeader::LEN],
            &[0xfe, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0x07, 0xd0, 2, 1, 0]
        );
        assert_eq!(
            ParityHeader::decode(&d),
            Ok((h, Bytes::from(vec![0xee; 1000])))
        );
    }

    #[test]
    fn garbage_datagrams_never_panic_and_inconsistent_ones_are_refused() {
        let ok = ParityHeader {
            stream: 3,
            start: 0,
            len: 2000,
            rows: 2,
            parity: 2,
            index: 1,
        };
        for bad in [
            ParityHeader { rows: 3, ..ok },
            ParityHeader { rows: 0, ..ok },
            ParityHeader { index: 2, ..ok },
            ParityHeader {
                parity: 0,
                index: 0,
                ..ok
            },
            ParityHeader { len: 0, ..ok },
            ParityHeader {
                start: u64::MAX,
                ..ok
            },
        ] {
            assert!(
                ParityHeader::decode(&bad.encode(&[0; 1000])).is_err(),
                "{bad:?}"
            );
        }
        for n in 0..64 {
            let d: Bytes = (0..n).map(|i| (i * 37) as u8).collect();
            let _ = ParityHeader::decode(&d);
        }
        // A recovery with rows that do not fit the block fails instead of panicking.
        let mut block = vec![0u8; 5000];
        let parity = vec![Some(Bytes::from(vec![0u8; 1000]))];
        assert!(!Codecs::default().recover(&mut block, &[0..10], 2, &parity));
        assert!(!Codecs::default().recover(&mut block, &[0..10], 5, &[None]));
    }
}
