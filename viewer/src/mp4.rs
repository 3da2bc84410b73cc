//! Crash-safe recording: fragmented MP4 (ISO BMFF) with one H.264 track.
//!
//! The file starts with `ftyp` + `moov` (no samples), then one `moof` + `mdat` fragment
//! per GOP, each written whole and flushed before the next begins. A process killed at any
//! moment leaves a file that players read up to its last complete fragment. Pure byte
//! building (`init_segment`, `fragment`) is kept apart from file handling ([`Recorder`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use peercam_common::h264::{nal_type, nal_units};
use peercam_common::media::StreamInfo;

/// Timescale of the video track: the 90 kHz of the stream's timestamps.
const TIMESCALE: u32 = 90_000;

/// One sample (frame) of a fragment.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Presentation time, 90 kHz.
    pub pts: u64,
    /// Whether it is a keyframe.
    pub keyframe: bool,
    /// The frame as AVCC: 4-byte length + NAL, no parameter sets or delimiters.
    pub data: Vec<u8>,
}

/// Converts an Annex B access unit to AVCC sample data, dropping SPS, PPS and AUD (the
/// parameter sets live in `avcC`).
pub fn annexb_to_avcc(au: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(au.len() + 16);
    for nal in nal_units(au) {
        if matches!(nal_type(nal), Some(7..=9)) || nal.is_empty() {
            continue;
        }
        out.extend_from_slice(&(nal.len() as u32).to_be_bytes());
        out.extend_from_slice(nal);
    }
    out
}

/// Writes an MP4 box: size, type, body.
fn boxed(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&((body.len() + 8) as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(body);
    out
}

/// A full box: version and flags before the body.
fn full(kind: &[u8; 4], version: u8, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(body.len() + 4);
    b.push(version);
    b.extend_from_slice(&flags.to_be_bytes()[1..]);
    b.extend_from_slice(body);
    boxed(kind, &b)
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

const MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];

fn matrix() -> Vec<u8> {
    MATRIX.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// `ftyp` + `moov` for one H.264 track described by `info`.
pub fn init_segment(info: &StreamInfo) -> Vec<u8> {
    let ftyp = boxed(
        b"ftyp",
        &cat(&[
            b"isom".to_vec(),
            0x200u32.to_be_bytes().to_vec(),
            b"isomiso6avc1mp41".to_vec(),
        ]),
    );
    let mut mvhd = vec![0u8; 8]; // creation, modification
    mvhd.extend_from_slice(&TIMESCALE.to_be_bytes());
    mvhd.extend_from_slice(&0u32.to_be_bytes()); // duration: fragments say
    mvhd.extend_from_slice(&0x0001_0000u32.to_be_bytes()); // rate 1.0
    mvhd.extend_from_slice(&0x0100u16.to_be_bytes()); // volume
    mvhd.extend_from_slice(&[0u8; 10]);
    mvhd.extend_from_slice(&matrix());
    mvhd.extend_from_slice(&[0u8; 24]);
    mvhd.extend_from_slice(&2u32.to_be_bytes()); // next track id
    let mvhd = full(b"mvhd", 0, 0, &mvhd);

    let mut tkhd = vec![0u8; 8];
    tkhd.extend_from_slice(&1u32.to_be_bytes()); // track id
    tkhd.extend_from_slice(&[0u8; 4]);
    tkhd.extend_from_slice(&0u32.to_be_bytes()); // duration
    tkhd.extend_from_slice(&[0u8; 8]);
    tkhd.extend_from_slice(&[0u8; 4]); // layer, alternate group
    tkhd.extend_from_slice(&[0u8; 4]); // volume, reserved
    tkhd.extend_from_slice(&matrix());
    tkhd.extend_from_slice(&(info.width << 16).to_be_bytes());
    tkhd.extend_from_slice(&(info.height << 16).to_be_bytes());
    let tkhd = full(b"tkhd", 0, 3, &tkhd); // enabled, in movie

    let mut mdhd = vec![0u8; 8];
    mdhd.extend_from_slice(&TIMESCALE.to_be_bytes());
    mdhd.extend_from_slice(&0u32.to_be_bytes());
    mdhd.extend_from_slice(&0x55c4u16.to_be_bytes()); // language "und"
    mdhd.extend_from_slice(&[0u8; 2]);
    let mdhd = full(b"mdhd", 0, 0, &mdhd);
    let hdlr = full(
        b"hdlr",
        0,
        0,
        &cat(&[
            vec![0u8; 4],
            b"vide".to_vec(),
            vec![0u8; 12],
            b"peercam video\0".to_vec(),
        ]),
    );

    let vmhd = full(b"vmhd", 0, 1, &[0u8; 8]);
    let dref = full(
        b"dref",
        0,
        0,
        &cat(&[1u32.to_be_bytes().to_vec(), full(b"url ", 0, 1, &[])]),
    );
    let dinf = boxed(b"dinf", &dref);
    let stbl = boxed(
        b"stbl",
        &cat(&[
            full(
                b"stsd",
                0,
                0,
                &cat(&[1u32.to_be_bytes().to_vec(), avc1(info)]),
            ),
            full(b"stts", 0, 0, &0u32.to_be_bytes()),
            full(b"stsc", 0, 0, &0u32.to_be_bytes()),
            full(b"stsz", 0, 0, &[0u8; 8]),
            full(b"stco", 0, 0, &0u32.to_be_bytes()),
        ]),
    );
    let minf = boxed(b"minf", &cat(&[vmhd, dinf, stbl]));
    let mdia = boxed(b"mdia", &cat(&[mdhd, hdlr, minf]));
    let trak = boxed(b"trak", &cat(&[tkhd, mdia]));
    let mut trex = Vec::new();
    for v in [1u32, 1, 0, 0, 0] {
        trex.extend_from_slice(&v.to_be_bytes()); // track, description index, defaults
    }
    let mvex = boxed(b"mvex", &full(b"trex", 0, 0, &trex));
    let moov = boxed(b"moov", &cat(&[mvhd, trak, mvex]));
    cat(&[ftyp, moov])
}

fn avc1(info: &StreamInfo) -> Vec<u8> {
    let mut b = vec![0u8; 6];
    b.extend_from_slice(&1u16.to_be_bytes()); // data reference index
    b.extend_from_slice(&[0u8; 16]);
    b.extend_from_slice(&(info.width as u16).to_be_bytes());
    b.extend_from_slice(&(info.height as u16).to_be_bytes());
    b.extend_from_slice(&0x0048_0000u32.to_be_bytes()); // 72 dpi
    b.extend_from_slice(&0x0048_0000u32.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes()); // frame count
    b.extend_from_slice(&[0u8; 32]); // compressor name
    b.extend_from_slice(&0x0018u16.to_be_bytes()); // depth
    b.extend_from_slice(&(-1i16).to_be_bytes());
    b.extend_from_slice(&avcc(info));
    boxed(b"avc1", &b)
}

fn avcc(info: &StreamInfo) -> Vec<u8> {
    let sps = &info.sps;
    let profile = |i: usize| sps.get(i).copied().unwrap_or(0);
    let mut b = vec![1, profile(1), profile(2), profile(3), 0xff, 0xe1];
    b.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    b.extend_from_slice(sps);
    b.push(1);
    b.extend_from_slice(&(info.pps.len() as u16).to_be_bytes());
    b.extend_from_slice(&info.pps);
    boxed(b"avcC", &b)
}

/// One `moof` + `mdat` fragment holding `samples` (the last one lasts `last_duration`).
pub fn fragment(sequence: u32, samples: &[Sample], last_duration: u32) -> Vec<u8> {
    let first_pts = samples.first().map_or(0, |s| s.pts);
    let mut trun = Vec::new();
    trun.extend_from_slice(&(samples.len() as u32).to_be_bytes());
    let offset_at = trun.len();
    trun.extend_from_slice(&0u32.to_be_bytes()); // data offset, patched below
    for (i, s) in samples.iter().enumerate() {
        let duration = samples
            .get(i + 1)
            .map(|n| n.pts.saturating_sub(s.pts) as u32)
            .unwrap_or(last_duration);
        let flags: u32 = if s.keyframe { 0x0200_0000 } else { 0x0101_0000 };
        trun.extend_from_slice(&duration.to_be_bytes());
        trun.extend_from_slice(&(s.data.len() as u32).to_be_bytes());
        trun.extend_from_slice(&flags.to_be_bytes());
    }
    // data-offset, sample duration, size and flags present
    let trun_box_len = 12 + trun.len();
    let tfhd = full(b"tfhd", 0, 0x02_0000, &1u32.to_be_bytes()); // default-base-is-moof
    let tfdt = full(b"tfdt", 1, 0, &first_pts.to_be_bytes());
    let mfhd = full(b"mfhd", 0, 0, &sequence.to_be_bytes());
    let traf_len = 8 + tfhd.len() + tfdt.len() + trun_box_len;
    let moof_len = 8 + mfhd.len() + traf_len;
    let data_offset = (moof_len + 8) as u32; // from moof start to the first sample
    trun[offset_at..offset_at + 4].copy_from_slice(&data_offset.to_be_bytes());
    let trun = full(b"trun", 0, 0x000701, &trun);
    let traf = boxed(b"traf", &cat(&[tfhd, tfdt, trun]));
    let moof = boxed(b"moof", &cat(&[mfhd, traf]));
    let payload: Vec<u8> = samples
        .iter()
        .flat_map(|s| s.data.iter().copied())
        .collect();
    cat(&[moof, boxed(b"mdat", &payload)])
}

/// Records frames into fragmented MP4 files, one fragment per GOP, optionally rotating to
/// a new file every `segment` seconds (at a keyframe).
#[derive(Debug)]
pub struct Recorder {
    base: PathBuf,
    segment: Option<u64>,
    info: StreamInfo,
    frame_duration: u32,
    file: Option<std::fs::File>,
    file_index: u32,
    file_start_pts: u64,
    sequence: u32,
    pending: Vec<Sample>,
}

impl Recorder {
    /// A recorder writing to `path` (or `path` with `-000`, `-001`... before the extension
    /// when rotating every `segment_secs`).
    pub fn new(path: &Path, info: StreamInfo, segment_secs: Option<u64>) -> Self {
        let fps = (info.fps_milli.max(1) as f64) / 1000.0;
        Recorder {
            base: path.to_path_buf(),
            segment: segment_secs.filter(|s| *s > 0),
            frame_duration: (TIMESCALE as f64 / fps).round() as u32,
            info,
            file: None,
            file_index: 0,
            file_start_pts: 0,
            sequence: 0,
            pending: Vec::new(),
        }
    }

    fn file_name(&self) -> PathBuf {
        match self.segment {
            None => self.base.clone(),
            Some(_) => {
                let stem = self
                    .base
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("record");
                let ext = self
                    .base
                    .extension()
                    .and_then(|s| s.to_str())
                    .unwrap_or("mp4");
                self.base
                    .with_file_name(format!("{stem}-{:03}.{ext}", self.file_index))
            }
        }
    }

    /// Adds a frame (Annex B). A keyframe closes and writes the previous GOP's fragment.
    pub fn push(&mut self, pts: u64, keyframe: bool, annexb: &[u8]) -> std::io::Result<()> {
        if keyframe {
            self.flush()?;
            let rotate = self.segment.is_some_and(|s| {
                self.file.is_some()
                    && pts.saturating_sub(self.file_start_pts) >= s * TIMESCALE as u64
            });
            if rotate {
                self.file = None;
                self.file_index += 1;
            }
            if self.file.is_none() {
                let mut f = std::fs::File::create(self.file_name())?;
                f.write_all(&init_segment(&self.info))?;
                f.sync_data()?;
                self.file = Some(f);
                self.file_start_pts = pts;
            }
        }
        if self.file.is_none() {
            return Ok(()); // nothing decodable before the first keyframe
        }
        self.pending.push(Sample {
            pts,
            keyframe,
            data: annexb_to_avcc(annexb),
        });
        Ok(())
    }

    /// Writes the pending GOP as one fragment and makes it durable.
    pub fn flush(&mut self) -> std::io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        self.sequence += 1;
        let bytes = fragment(self.sequence, &self.pending, self.frame_duration);
        file.write_all(&bytes)?;
        file.sync_data()?;
        self.pending.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> StreamInfo {
        StreamInfo {
            codec: "h264".into(),
            width: 640,
            height: 360,
            timescale: 90_000,
            fps_milli: 25_000,
            sps: vec![0x67, 0x4d, 0x00, 0x1e, 0xab],
            pps: vec![0x68, 0xee, 0x3c, 0x80],
        }
    }

    /// Walks top-level boxes: (type, size).
    fn boxes(mut b: &[u8]) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        while b.len() >= 8 {
            let size = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            out.push((String::from_utf8_lossy(&b[4..8]).into_owned(), size));
            if size < 8 || size > b.len() {
                break;
            }
            b = &b[size..];
        }
        out
    }

    #[test]
    fn init_segment_is_ftyp_then_moov_with_sizes_that_add_up() {
        let init = init_segment(&info());
        let top = boxes(&init);
        assert_eq!(
            top.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
            ["ftyp", "moov"]
        );
        assert_eq!(top.iter().map(|(_, s)| s).sum::<usize>(), init.len());
    }

    #[test]
    fn fragment_data_offset_points_at_the_first_sample() {
        let samples = vec![
            Sample {
                pts: 0,
                keyframe: true,
                data: vec![0, 0, 0, 2, 0x65, 1],
            },
            Sample {
                pts: 3600,
                keyframe: false,
                data: vec![0, 0, 0, 2, 0x41, 2],
            },
        ];
        let frag = fragment(1, &samples, 3600);
        let top = boxes(&frag);
        assert_eq!(
            top.iter().map(|(t, _)| t.as_str()).collect::<Vec<_>>(),
            ["moof", "mdat"]
        );
        let moof_len = top[0].1;
        // data offset is the trun's first field after sample count
        let pos = frag.windows(4).position(|w| w == b"trun").expect("trun") + 4 + 4 + 4;
        let offset = u32::from_be_bytes(frag[pos..pos + 4].try_into().unwrap()) as usize;
        assert_eq!(offset, moof_len + 8);
        assert_eq!(&frag[offset..offset + 6], &samples[0].data[..]);
    }

    #[test]
    fn avcc_conversion_drops_parameter_sets() {
        let au = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 0, 1, 0x68, 3, 0, 0, 1, 0x65, 9, 9,
        ];
        assert_eq!(annexb_to_avcc(&au), vec![0, 0, 0, 3, 0x65, 9, 9]);
    }
}
