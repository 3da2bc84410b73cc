//! H.264 Annex B byte-stream handling: splitting a stream into access units (one coded
//! picture each, with its parameter sets and SEI), iterating NAL units, reading the
//! picture size and frame rate from the SPS, and putting SPS/PPS in front of IDR pictures
//! so a decoder can start from them.
//!
//! This module owns only the byte-stream layer: start codes, NAL unit headers, access unit
//! boundaries (H.264 7.4.1.2.3, simplified) and the few SPS fields callers need. It does
//! not decode pictures, interpret slice data beyond `first_mb_in_slice`, reorder frames,
//! assign timestamps, or deal with any container (MP4/avcC, RTP); parsing of the SPS itself
//! is delegated to `h264-reader`. No input, however malformed, makes it panic, and the
//! incremental reader never buffers more than [`MAX_ACCESS_UNIT`] bytes (plus one input
//! piece) of a pending access unit.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use h264_reader::nal::sps::SeqParameterSet;
use h264_reader::rbsp::{decode_nal, BitReader};

/// Largest access unit accepted, in bytes (start codes included). A larger one is an
/// [`H264Error::AccessUnitTooLarge`] error and is dropped, never buffered without bound.
pub const MAX_ACCESS_UNIT: usize = 16 * 1024 * 1024;

/// How much of a `push` is appended to the buffer before it is scanned; bounds memory to
/// `MAX_ACCESS_UNIT + PIECE` whatever chunk size the caller uses.
const PIECE: usize = 64 * 1024;

/// The 4-byte start code used when this module writes NAL units.
const START_CODE: [u8; 4] = [0, 0, 0, 1];

/// NAL unit type of a non-IDR coded slice.
const NAL_SLICE: u8 = 1;
/// NAL unit type of an IDR coded slice.
const NAL_IDR: u8 = 5;
/// NAL unit type of a sequence parameter set.
const NAL_SPS: u8 = 7;
/// NAL unit type of a picture parameter set.
const NAL_PPS: u8 = 8;
/// NAL unit type of an access unit delimiter.
const NAL_AUD: u8 = 9;

/// Errors from H.264 byte-stream handling.
#[derive(Debug, thiserror::Error)]
pub enum H264Error {
    /// An access unit grew beyond [`MAX_ACCESS_UNIT`] bytes (or the input contains no
    /// start codes for that long). Its bytes were dropped; an [`AnnexBReader`] resumes at
    /// the next access unit boundary.
    #[error("H.264 access unit larger than {} bytes", MAX_ACCESS_UNIT)]
    AccessUnitTooLarge,
    /// The access unit does not contain both an SPS (type 7) and a PPS (type 8) NAL unit.
    #[error("H.264 access unit has no SPS and PPS")]
    NoParameterSets,
    /// The SPS could not be parsed, or describes an impossible picture size.
    #[error("bad H.264 SPS: {0}")]
    BadSps(String),
}

/// One access unit: all NAL units of one coded picture, in Annex B form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUnit {
    /// The original Annex B bytes, start codes included (and any bytes before the first
    /// start code of the stream, for the first access unit). Concatenating the `data` of
    /// all access units of a stream gives back the stream.
    pub data: Bytes,
    /// The access unit contains an IDR slice (NAL type 5): decoding can start here.
    pub is_idr: bool,
    /// The access unit contains both an SPS (type 7) and a PPS (type 8).
    pub has_parameter_sets: bool,
}

/// What the reader knows about the access unit being assembled.
#[derive(Debug, Clone, Copy, Default)]
struct AuFlags {
    has_vcl: bool,
    is_idr: bool,
    has_sps: bool,
    has_pps: bool,
}

impl AuFlags {
    fn add(&mut self, nal_type: u8) {
        match nal_type {
            1..=5 => {
                self.has_vcl = true;
                self.is_idr |= nal_type == NAL_IDR;
            }
            NAL_SPS => self.has_sps = true,
            NAL_PPS => self.has_pps = true,
            _ => {}
        }
    }
}

/// A start code that has been found but whose NAL unit header is not classified yet.
#[derive(Debug, Clone, Copy)]
struct PendingNal {
    /// First byte of the start code, leading zero bytes included.
    start: usize,
    /// Index of the NAL unit header byte (just after `00 00 01`).
    header: usize,
}

/// Incremental splitter of an Annex B byte stream into [`AccessUnit`]s.
///
/// Feed it chunks of any size with [`push`](Self::push) (start codes and NAL units may be
/// split anywhere), take complete access units with
/// [`next_access_unit`](Self::next_access_unit), and at end of stream call
/// [`finish`](Self::finish) until it returns `None`. An access unit is complete once the
/// first NAL unit of the next one has been seen, so a live stream without access unit
/// delimiters is delivered one NAL header late. Completed access units are queued until
/// taken, so drain them after every `push`.
#[derive(Debug)]
pub struct AnnexBReader {
    /// The access unit being assembled (from its first byte), then unclassified input.
    buf: BytesMut,
    /// Next index of `buf` that may be the `01` of a start code; always at least 2.
    scan: usize,
    /// A start code whose NAL unit header has not arrived yet.
    pending: Option<PendingNal>,
    /// Flags of the classified NAL units in `buf`.
    au: AuFlags,
    /// After an oversized access unit: drop input until the next access unit starts.
    discarding: bool,
    /// Complete access units not taken yet.
    ready: VecDeque<AccessUnit>,
}

impl Default for AnnexBReader {
    fn default() -> Self {
        Self::new()
    }
}

impl AnnexBReader {
    /// Creates a reader at the start of a stream.
    pub fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            scan: 2,
            pending: None,
            au: AuFlags::default(),
            discarding: false,
            ready: VecDeque::new(),
        }
    }

    /// Feeds the next chunk of the byte stream.
    ///
    /// The whole chunk is always consumed. On [`H264Error::AccessUnitTooLarge`] the
    /// oversized access unit has been dropped and the reader resynchronises at the next
    /// access unit boundary; access units completed before and after it stay available, so
    /// the reader can keep being used.
    ///
    /// # Errors
    ///
    /// [`H264Error::AccessUnitTooLarge`], as described above.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), H264Error> {
        let mut result = Ok(());
        for piece in bytes.chunks(PIECE) {
            self.buf.extend_from_slice(piece);
            if let Err(e) = self.process(false) {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Takes the next complete access unit, if any.
    pub fn next_access_unit(&mut self) -> Option<AccessUnit> {
        self.ready.pop_front()
    }

    /// Ends the stream: completes the last access unit from whatever is buffered and returns
    /// the next access unit not taken yet. Call it until it returns `None`; afterwards the
    /// reader is empty and can start a new stream.
    pub fn finish(&mut self) -> Option<AccessUnit> {
        // Only oversized data can fail here, and it is dropped either way.
        let _ = self.process(true);
        let rest = self.buf.split().freeze();
        if !self.discarding && !rest.is_empty() && rest.len() <= MAX_ACCESS_UNIT {
            self.ready.push_back(Self::access_unit(rest, self.au));
        }
        self.scan = 2;
        self.pending = None;
        self.au = AuFlags::default();
        self.discarding = false;
        self.ready.pop_front()
    }

    /// Builds an access unit from its bytes and flags.
    fn access_unit(data: Bytes, au: AuFlags) -> AccessUnit {
        AccessUnit {
            data,
            is_idr: au.is_idr,
            has_parameter_sets: au.has_sps && au.has_pps,
        }
    }

    /// Finds start codes and access unit boundaries in the buffered input. With `eof`, a
    /// NAL unit cut short by the end of the stream is classified with what is there.
    fn process(&mut self, eof: bool) -> Result<(), H264Error> {
        let mut result = Ok(());
        loop {
            if let Some(p) = self.pending {
                let Some(&header) = self.buf.get(p.header) else {
                    if eof {
                        // A start code right at the end: an empty NAL unit.
                        self.pending = None;
                    }
                    break;
                };
                let nal_type = header & 0x1f;
                let first_mb_zero = if matches!(nal_type, NAL_SLICE | NAL_IDR) {
                    match self.buf.get(p.header + 1) {
                        // first_mb_in_slice is ue(v): 0 is coded as a single `1` bit.
                        Some(&b) => b & 0x80 != 0,
                        None if eof => false,
                        None => break,
                    }
                } else {
                    false
                };
                self.pending = None;
                let starts_au = self.au.has_vcl
                    && (matches!(nal_type, 6..=9 | 14..=18)
                        || (matches!(nal_type, NAL_SLICE | NAL_IDR) && first_mb_zero));
                if starts_au {
                    if let Err(e) = self.cut(p.start) {
                        result = result.and(Err(e));
                    }
                }
                self.au.add(nal_type);
                continue;
            }
            match find_start_code(&self.buf, self.scan) {
                Some(one) => {
                    // `one >= 2` and the two bytes before it are zero.
                    let floor = self.buf[..one - 2]
                        .iter()
                        .rposition(|&b| b != 0)
                        .map_or(0, |i| i + 1);
                    self.pending = Some(PendingNal {
                        start: floor,
                        header: one + 1,
                    });
                    self.scan = one + 1;
                }
                None => {
                    self.scan = self.scan.max(self.buf.len());
                    break;
                }
            }
        }
        if eof {
            return result;
        }
        // Bytes certainly in the current access unit: everything before an unclassified
        // start code, or all but a possible `00 00 00` start code prefix at the end.
        let certain = match self.pending {
            Some(p) => p.start,
            None => self.buf.len().saturating_sub(3),
        };
        if !self.discarding && certain > MAX_ACCESS_UNIT {
            self.discarding = true;
            // Drop everything up to the next access unit boundary.
            self.au = AuFlags {
                has_vcl: true,
                ..AuFlags::default()
            };
            result = result.and(Err(H264Error::AccessUnitTooLarge));
        }
        if self.discarding {
            // Keep only what the start code search still needs.
            let keep_from = match self.pending {
                Some(p) => p.start,
                None => self.scan - 2,
            };
            self.drop_front(keep_from);
        }
        result
    }

    /// Ends the current access unit at `at` (which starts the next one).
    fn cut(&mut self, at: usize) -> Result<(), H264Error> {
        let data = self.buf.split_to(at).freeze();
        self.shift(at);
        let au = std::mem::take(&mut self.au);
        if self.discarding {
            self.discarding = false;
            return Ok(());
        }
        if data.len() > MAX_ACCESS_UNIT {
            return Err(H264Error::AccessUnitTooLarge);
        }
        if !data.is_empty() {
            self.ready.push_back(Self::access_unit(data, au));
        }
        Ok(())
    }

    /// Drops the first `n` buffered bytes.
    fn drop_front(&mut self, n: usize) {
        self.buf.advance(n);
        self.shift(n);
    }

    /// Adjusts indexes after `n` bytes were removed from the front of `buf`.
    fn shift(&mut self, n: usize) {
        self.scan = self.scan.saturating_sub(n).max(2);
        if let Some(p) = &mut self.pending {
            p.start = p.start.saturating_sub(n);
            p.header = p.header.saturating_sub(n);
        }
    }
}

/// Index of the `01` byte of the first `00 00 01` whose `01` is at or after `from`
/// (`from >= 2`).
fn find_start_code(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let one = i + buf[i..].iter().position(|&b| b == 1)?;
        if one >= 2 && buf[one - 1] == 0 && buf[one - 2] == 0 {
            return Some(one);
        }
        i = one + 1;
    }
    None
}

/// Byte ranges of the NAL units of an Annex B buffer: `(start, end)` of each payload
/// (header byte included, start code and trailing zero bytes excluded). Empty NAL units
/// and bytes before the first start code are skipped.
fn nal_ranges(data: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut next = find_start_code(data, 2).map(|one| one + 1);
    std::iter::from_fn(move || loop {
        let start = next?;
        let (end, following) = match find_start_code(data, start + 2) {
            Some(one) => (one - 2, Some(one + 1)),
            None => (data.len(), None),
        };
        next = following;
        // Zero bytes before the next start code (or the end) are not part of the NAL unit;
        // a NAL unit never ends in 0x00.
        let end = data[start..end]
            .iter()
            .rposition(|&b| b != 0)
            .map_or(start, |i| start + i + 1);
        if end > start {
            return Some((start, end));
        }
    })
}

/// The NAL units of an Annex B buffer, without start codes (each begins with its NAL unit
/// header byte). Bytes before the first start code, trailing zero bytes and empty NAL
/// units are skipped. Emulation prevention bytes are left in place.
pub fn nal_units(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    nal_ranges(data).map(move |(start, end)| &data[start..end])
}

/// The `nal_unit_type` (0–31) of a NAL unit given without start code, or `None` if it is
/// empty.
pub fn nal_type(nal: &[u8]) -> Option<u8> {
    nal.first().map(|h| h & 0x1f)
}

/// Splits a whole Annex B buffer into access units (see [`AnnexBReader`]).
///
/// # Errors
///
/// [`H264Error::AccessUnitTooLarge`] if any access unit exceeds [`MAX_ACCESS_UNIT`].
pub fn split_access_units(data: &[u8]) -> Result<Vec<AccessUnit>, H264Error> {
    let mut reader = AnnexBReader::new();
    reader.push(data)?;
    let mut out = Vec::new();
    while let Some(au) = reader.finish() {
        out.push(au);
    }
    Ok(out)
}

/// Stream parameters taken from an access unit's SPS and PPS.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamParams {
    /// The first SPS NAL unit, without start code (header byte included).
    pub sps: Bytes,
    /// The first PPS NAL unit, without start code (header byte included).
    pub pps: Bytes,
    /// Displayed picture width in pixels (after cropping).
    pub width: u32,
    /// Displayed picture height in pixels (after cropping).
    pub height: u32,
    /// Frames per second from the SPS VUI timing info (`time_scale / (2 *
    /// num_units_in_tick)`), if present and sensible.
    pub fps: Option<f64>,
}

/// Reads the stream parameters from an access unit that carries an SPS and a PPS.
///
/// # Errors
///
/// [`H264Error::NoParameterSets`] if the access unit lacks an SPS or a PPS, and
/// [`H264Error::BadSps`] if the first SPS cannot be parsed.
pub fn stream_params(au: &AccessUnit) -> Result<StreamParams, H264Error> {
    let mut sps = None;
    let mut pps = None;
    for nal in nal_units(&au.data) {
        match nal_type(nal) {
            Some(NAL_SPS) if sps.is_none() => sps = Some(nal),
            Some(NAL_PPS) if pps.is_none() => pps = Some(nal),
            _ => {}
        }
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err(H264Error::NoParameterSets);
    };
    let rbsp = decode_nal(sps).map_err(|e| H264Error::BadSps(e.to_string()))?;
    let parsed = SeqParameterSet::from_bits(BitReader::new(&rbsp[..]))
        .map_err(|e| H264Error::BadSps(format!("{e:?}")))?;
    let (width, height) = parsed
        .pixel_dimensions()
        .map_err(|e| H264Error::BadSps(format!("{e:?}")))?;
    if width == 0 || height == 0 {
        return Err(H264Error::BadSps(format!("picture size {width}x{height}")));
    }
    let fps = parsed.fps().filter(|f| f.is_finite() && *f > 0.0);
    Ok(StreamParams {
        sps: au.data.slice_ref(sps),
        pps: au.data.slice_ref(pps),
        width,
        height,
        fps,
    })
}

/// Strips a leading 3- or 4-byte start code, if any.
fn strip_start_code(nal: &[u8]) -> &[u8] {
    nal.strip_prefix(&START_CODE[..])
        .or_else(|| nal.strip_prefix(&START_CODE[1..]))
        .unwrap_or(nal)
}

/// Returns `au` with the given SPS and PPS NAL units (without start codes; a leading start
/// code is tolerated) in front, so that a decoder can start from it. They are placed
/// after an access unit delimiter if the access unit begins with one.
///
/// Access units that already have parameter sets, and non-IDR access units (a decoder
/// cannot start from them anyway), are returned unchanged.
pub fn with_parameter_sets(au: &AccessUnit, sps: &[u8], pps: &[u8]) -> AccessUnit {
    if !au.is_idr || au.has_parameter_sets {
        return au.clone();
    }
    let (sps, pps) = (strip_start_code(sps), strip_start_code(pps));
    // Insert after a leading AUD, which must stay the first NAL unit.
    let at = match nal_ranges(&au.data).next() {
        Some((start, end)) if au.data.get(start).map(|h| h & 0x1f) == Some(NAL_AUD) => end,
        _ => 0,
    };
    let mut data = BytesMut::with_capacity(au.data.len() + sps.len() + pps.len() + 8);
    data.extend_from_slice(&au.data[..at]);
    data.extend_from_slice(&START_CODE);
    data.extend_from_slice(sps);
    data.extend_from_slice(&START_CODE);
    data.extend_from_slice(pps);
    data.extend_from_slice(&au.data[at..]);
    AccessUnit {
        data: data.freeze(),
        is_idr: true,
        has_parameter_sets: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../assets/sample.h264"
    ));

    /// Tiny xorshift64 PRNG, so the tests need no `rand`.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn concat(aus: &[AccessUnit]) -> Vec<u8> {
        aus.iter().flat_map(|au| au.data.iter().copied()).collect()
    }

    /// Pushes `data` in chunks whose sizes come from `sizes`, collecting every AU.
    fn read_chunked(data: &[u8], mut sizes: impl FnMut() -> usize) -> Vec<AccessUnit> {
        let mut reader = AnnexBReader::new();
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = sizes().clamp(1, rest.len());
            reader.push(&rest[..n]).expect("push");
            rest = &rest[n..];
            while let Some(au) = reader.next_access_unit() {
                out.push(au);
            }
        }
        while let Some(au) = reader.finish() {
            out.push(au);
        }
        out
    }

    fn types(au: &AccessUnit) -> Vec<u8> {
        nal_units(&au.data).filter_map(nal_type).collect()
    }

    #[test]
    fn sample_clip_splits_into_100_frames() {
        let aus = split_access_units(SAMPLE).expect("split sample");
        assert_eq!(aus.len(), 100);
        assert_eq!(concat(&aus), SAMPLE);
        let idrs: Vec<usize> = (0..aus.len()).filter(|&i| aus[i].is_idr).collect();
        assert_eq!(idrs, [0, 25, 50, 75]);
        for (i, au) in aus.iter().enumerate() {
            assert_eq!(au.has_parameter_sets, au.is_idr, "AU {i}");
            let slices = types(au).iter().filter(|t| matches!(t, 1 | 5)).count();
            assert_eq!(slices, 1, "AU {i}: {:?}", types(au));
        }
        for &i in &idrs {
            let p = stream_params(&aus[i]).expect("params of an IDR");
            assert_eq!((p.width, p.height), (640, 360));
            let fps = p.fps.expect("VUI timing");
            assert!((fps - 25.0).abs() < 1e-9, "fps {fps}");
            assert_eq!(nal_type(&p.sps), Some(7));
            assert_eq!(nal_type(&p.pps), Some(8));
        }
        assert!(matches!(
            stream_params(&aus[1]),
            Err(H264Error::NoParameterSets)
        ));
    }

    #[test]
    fn byte_at_a_time_matches_whole_buffer() {
        let whole = split_access_units(SAMPLE).expect("split sample");
        assert_eq!(read_chunked(SAMPLE, || 1), whole);
    }

    #[test]
    fn random_chunks_match_whole_buffer() {
        let whole = split_access_units(SAMPLE).expect("split sample");
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for max in [2, 7, 100, 5000, 200_000] {
            assert_eq!(read_chunked(SAMPLE, || 1 + rng.below(max)), whole);
        }
    }

    #[test]
    fn garbage_never_panics_and_round_trips() {
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        for round in 0..300 {
            let len = rng.below(if round % 10 == 0 { 100_000 } else { 2_000 });
            // Mostly random bytes, with plenty of zeros, start codes and NAL headers.
            let mut data = Vec::with_capacity(len + 8);
            while data.len() < len {
                match rng.below(10) {
                    0 => data.extend_from_slice(&[0, 0, 1]),
                    1 => data.extend_from_slice(&[0, 0, 0, 1]),
                    2 | 3 => data.push(0),
                    4 => data.push([0x09, 0x67, 0x68, 0x06, 0x65, 0x41, 0x0e][rng.below(7)]),
                    _ => data.push(rng.next() as u8),
                }
            }
            let whole = split_access_units(&data).expect("split");
            assert_eq!(concat(&whole), data);
            assert!(whole.iter().all(|au| !au.data.is_empty()));
            let chunked = read_chunked(&data, || 1 + rng.below(64));
            assert_eq!(chunked, whole);
            for au in &whole {
                let _ = stream_params(au);
                let fixed = with_parameter_sets(au, &[0x67, 1, 2], &[0x68, 3]);
                assert!(fixed.data.len() >= au.data.len());
                for nal in nal_units(&au.data) {
                    assert!(!nal.is_empty());
                    assert_ne!(nal.last(), Some(&0));
                }
            }
        }
    }

    #[test]
    fn corrupted_parameter_sets_never_panic() {
        let mut rng = XorShift(0xdead_beef_cafe_f00d);
        let aus = split_access_units(SAMPLE).expect("split sample");
        // SPS, PPS and the start of the IDR slice of the first picture.
        let head = &aus[0].data[..aus[0].data.len().min(200)];
        for _ in 0..2000 {
            let mut data = head.to_vec();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            if let Ok(aus) = split_access_units(&data) {
                for au in &aus {
                    let _ = stream_params(au);
                }
            }
        }
    }

    #[test]
    fn garbage_without_start_codes_is_bounded() {
        for fill in [0xffu8, 0x00] {
            let mut reader = AnnexBReader::new();
            let chunk = vec![fill; 1 << 20];
            let mut errors = 0;
            for _ in 0..(MAX_ACCESS_UNIT >> 20) + 4 {
                if reader.push(&chunk).is_err() {
                    errors += 1;
                }
                assert!(reader.buf.len() <= MAX_ACCESS_UNIT + PIECE + 3);
                assert!(reader.next_access_unit().is_none());
            }
            assert_eq!(errors, 1, "fill {fill:#x}");
            // It resynchronises on the next access unit boundary.
            reader.push(SAMPLE).expect("push sample");
            let mut aus = Vec::new();
            while let Some(au) = reader.next_access_unit() {
                aus.push(au);
            }
            while let Some(au) = reader.finish() {
                aus.push(au);
            }
            assert_eq!(aus.len(), 100);
            assert!(aus[0].is_idr && aus[0].has_parameter_sets);
            assert!(reader.buf.is_empty());
        }
    }

    #[test]
    fn oversized_access_unit_is_dropped() {
        let mut data = vec![0, 0, 0, 1, 0x65, 0x88];
        data.resize(MAX_ACCESS_UNIT + 10, 0x55);
        let next = [0, 0, 0, 1, 0x41, 0x9a, 0x01];
        data.extend_from_slice(&next);
        assert!(matches!(
            split_access_units(&data),
            Err(H264Error::AccessUnitTooLarge)
        ));
        let mut reader = AnnexBReader::new();
        assert!(reader.push(&data).is_err());
        assert!(reader.next_access_unit().is_none());
        assert_eq!(reader.finish().expect("last AU").data, &next[..]);
        assert!(reader.finish().is_none());

        // Exactly the limit is fine.
        let mut data = vec![0, 0, 0, 1, 0x65, 0x88];
        data.resize(MAX_ACCESS_UNIT, 0x55);
        data.extend_from_slice(&next);
        let aus = split_access_units(&data).expect("split");
        assert_eq!(aus.len(), 2);
        assert_eq!(aus[0].data.len(), MAX_ACCESS_UNIT);
    }

    #[test]
    fn boundaries_and_start_codes() {
        let data: &[u8] = &[
            0xaa, // junk before the first start code stays in the first AU
            0, 0, 0, 1, 0x09, 0xf0, // AUD
            0, 0, 0, 1, 0x67, 0x42, // SPS
            0, 0, 1, 0x68, 0xce, // PPS, 3-byte start code
            0, 0, 1, 0x65, 0x88, 0x11, // IDR, first_mb 0
            0, 0, 1, 0x65, 0x20, 0x22, 0, // IDR, first_mb != 0: same picture; trailing zero
            0, 0, 0, 1, 0x41, 0x9a, // P, first_mb 0: new AU
            0, 0, 1, 0x41, 0x40, // P, first_mb != 0
            0, 0, 0, 1, 0x06, 0x05, // SEI: new AU
            0, 0, 0, 1, 0x41, 0x9b, // P
            0, 0, 0, 1, 0x09, 0x30, // AUD: new AU
            0, 0, 0, 1, 0x41, 0x9c, 0, 0, // P, trailing zeros
        ];
        let aus = split_access_units(data).expect("split");
        assert_eq!(concat(&aus), data);
        let got: Vec<_> = aus
            .iter()
            .map(|au| (types(au), au.is_idr, au.has_parameter_sets))
            .collect();
        assert_eq!(
            got,
            [
                (vec![9, 7, 8, 5, 5], true, true),
                (vec![1, 1], false, false),
                (vec![6, 1], false, false),
                (vec![9, 1], false, false),
            ]
        );
        assert_eq!(&aus[0].data[..5], &[0xaa, 0, 0, 0, 1]);
        // Zero bytes before a start code go with the NAL unit that follows.
        assert_eq!(&aus[1].data[..5], &[0, 0, 0, 0, 1]);
        for size in 1..8 {
            assert_eq!(read_chunked(data, || size), aus);
        }
    }

    #[test]
    fn nal_iteration() {
        let data: &[u8] = &[7, 0, 0, 1, 0x67, 1, 0, 0, 0, 0, 1, 0, 0, 1, 0x68, 2, 0, 0];
        let nals: Vec<&[u8]> = nal_units(data).collect();
        assert_eq!(nals, [&[0x67, 1][..], &[0x68, 2][..]]);
        assert_eq!(nal_type(&[0x65]), Some(5));
        assert_eq!(nal_type(&[]), None);
        assert_eq!(nal_units(&[]).count(), 0);
        assert_eq!(nal_units(&[0, 0, 1]).count(), 0);
        assert_eq!(nal_units(&[1, 2, 3, 0, 0]).count(), 0);
    }

    #[test]
    fn parameter_sets_are_prepended() {
        let aus = split_access_units(SAMPLE).expect("split sample");
        let params = stream_params(&aus[0]).expect("params");
        // Strip the parameter sets from the second IDR to get a bare IDR AU.
        let bare_data: Vec<u8> = nal_units(&aus[25].data)
            .filter(|n| nal_type(n) == Some(5))
            .flat_map(|n| START_CODE.iter().chain(n).copied())
            .collect();
        let bare = split_access_units(&bare_data).expect("split").remove(0);
        assert!(bare.is_idr && !bare.has_parameter_sets);
        let fixed = with_parameter_sets(&bare, &params.sps, &params.pps);
        assert!(fixed.is_idr && fixed.has_parameter_sets);
        assert_eq!(types(&fixed), [7, 8, 5]);
        assert_eq!(
            split_access_units(&fixed.data).expect("split"),
            std::slice::from_ref(&fixed)
        );
        assert_eq!(stream_params(&fixed).expect("params").width, 640);

        // With start codes given, and after an AUD.
        let mut sc_sps = vec![0, 0, 1];
        sc_sps.extend_from_slice(&params.sps);
        let mut aud = vec![0, 0, 0, 1, 0x09, 0x10];
        aud.extend_from_slice(&bare_data);
        let bare = split_access_units(&aud).expect("split").remove(0);
        let fixed = with_parameter_sets(&bare, &sc_sps, &params.pps);
        assert_eq!(types(&fixed), [9, 7, 8, 5]);

        // Unchanged: already has them, or not an IDR.
        assert_eq!(with_parameter_sets(&aus[0], &[0x67], &[0x68]), aus[0]);
        assert_eq!(
            with_parameter_sets(&aus[1], &params.sps, &params.pps),
            aus[1]
        );
    }

    #[test]
    fn bad_sps_is_an_error() {
        let au = AccessUnit {
            data: Bytes::from_static(&[0, 0, 0, 1, 0x67, 0xff, 0, 0, 0, 1, 0x68, 0xce]),
            is_idr: false,
            has_parameter_sets: true,
        };
        assert!(matches!(stream_params(&au), Err(H264Error::BadSps(_))));
        let au = AccessUnit {
            data: Bytes::from_static(&[0, 0, 0, 1, 0x68, 0xce]),
            is_idr: false,
            has_parameter_sets: false,
        };
        assert!(matches!(
            stream_params(&au),
            Err(H264Error::NoParameterSets)
        ));
    }
}
