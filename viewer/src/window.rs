//! The live window (`viewer CAMERA --window`, cargo feature `window`, on by default):
//! decodes the H.264 the viewer receives and shows it in a desktop window whose title says
//! how the camera is reached (`lan`, `direct`, `relay`) and the current latency.
//!
//! Owns three things, none of which may stall the network side:
//! - [`WindowHandle`], called from the receive task through a [`FrameHook`]: it only
//!   `try_send`s into a bounded queue ([`DECODE_QUEUE`]). When the queue is full the frame
//!   is dropped and so is every frame after it until the next IDR, so the decoder never
//!   sees a picture whose references it lost.
//! - a decoder thread (OpenH264) that decodes every frame it is given and converts each
//!   picture to RGB; only the latest picture is kept for display (a one-slot mailbox), so
//!   drawing is the lossy part. A decoding error is logged and the decoder is reset; it
//!   resumes at the next IDR.
//! - [`run_window`], the winit event loop with a softbuffer surface, which must run on the
//!   process' main thread. Closing the window cancels the watch; [`WindowHandle::close`]
//!   (called when the watch ends) closes the window.
//!
//! It does not own the session, the sink or the statistics: `receive` does, and hands each
//! frame written to the sink to the hook.
//!
//! # Patents and how to leave the window out
//!
//! H.264 is covered by patents licensed through a pool (formerly MPEG LA, now Via LA).
//! The decoder is Cisco's OpenH264, which Cisco releases under the BSD licence and for
//! which Cisco pays the pool's royalties, but only for the binaries Cisco itself
//! distributes. The `openh264` crate compiles OpenH264 from source into this binary, and
//! that build is not covered by Cisco's licence. Whoever distributes a viewer built with
//! this feature may need their own patent licence where such patents apply; to avoid the
//! question, build without the window (`cargo build -p peercam-viewer
//! --no-default-features`: `--window` then says it was left out, and everything else works
//! the same, since the rest of peercam only moves H.264 without decoding it), or load
//! Cisco's binary at run time instead (the crate's `libloading` feature; not wired up
//! here).

use std::num::NonZeroU32;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use peercam_common::h264::{nal_type, nal_units};
use peercam_common::CameraId;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use winit::application::ApplicationHandler;
use winit::dpi::PhysicalSize;
use winit::event::{StartCause, WindowEvent};
use winit::event_loop::{ActiveEventLoop, ControlFlow, EventLoop, EventLoopProxy};
use winit::window::{Window, WindowId};

use crate::{FrameHook, FrameSeen, Path};

/// Frames queued for the decoder. Deeper than a few frames because a camera sends its
/// cached GOP (up to a whole GOP) in one burst when a viewer joins; a shallow queue would
/// throw that burst away every time and show nothing until the next IDR.
pub const DECODE_QUEUE: usize = 32;
/// How often the title's latency is refreshed.
const TITLE_EVERY: Duration = Duration::from_secs(1);
/// No new picture for this long: the title says the video stalled.
const STALL_AFTER: Duration = Duration::from_secs(2);
/// How often the decoder thread looks whether the window has closed.
const DECODER_POLL: Duration = Duration::from_millis(200);
/// Window size before the first picture says the stream's size.
const INITIAL_SIZE: (u32, u32) = (640, 360);
/// H.264 `nal_unit_type` of an IDR slice.
const NAL_IDR: u8 = 5;

/// Why the window could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    /// No display to open a window on.
    #[error("cannot open a window: {0}. Run the viewer in a desktop session (DISPLAY set), or drop --window and use -o - | ffplay -f h264 -")]
    NoDisplay(String),
    /// The window or its drawing surface could not be created.
    #[error("cannot create the video window: {0}")]
    Create(String),
    /// The event loop or the decoder thread failed.
    #[error("the video window failed: {0}")]
    Run(String),
}

/// A decoded picture, `0x00RRGGBB` per pixel, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Picture {
    width: usize,
    height: usize,
    /// Exactly `width * height` pixels.
    pixels: Vec<u32>,
}

/// A one-slot mailbox: the newest value replaces an untaken one, and the producer is told
/// whether the consumer needs waking (so at most one wake-up is ever in flight).
#[derive(Debug)]
struct Mailbox<T> {
    slot: Mutex<Option<T>>,
    pending: AtomicBool,
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox {
            slot: Mutex::new(None),
            pending: AtomicBool::new(false),
        }
    }
}

impl<T> Mailbox<T> {
    /// Stores `value`; true when the consumer must be woken.
    fn put(&self, value: T) -> bool {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
        !self.pending.swap(true, Ordering::AcqRel)
    }

    fn take(&self) -> Option<T> {
        self.pending.store(false, Ordering::Release);
        self.slot.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What the decoder thread and the handles share with the event loop.
#[derive(Debug, Default)]
struct Shared {
    picture: Mailbox<Picture>,
    title: Mailbox<String>,
    /// Set when the event loop has ended: the decoder thread stops.
    closed: AtomicBool,
}

/// Wake-ups for the event loop; the data itself waits in [`Shared`].
#[derive(Debug, Clone, Copy)]
enum Wake {
    Picture,
    Title,
    Close,
}

/// One access unit for the decoder.
struct Job {
    idr: bool,
    data: Bytes,
}

/// Feeds the window from any thread without ever blocking. Cheap to clone.
#[derive(Clone)]
pub struct WindowHandle {
    queue: SyncSender<Job>,
    /// A frame was dropped: drop the rest until the next IDR.
    skipping: Arc<AtomicBool>,
    shared: Arc<Shared>,
    proxy: EventLoopProxy<Wake>,
}

impl std::fmt::Debug for WindowHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowHandle")
            .field("skipping", &self.skipping.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl WindowHandle {
    /// Queues one access unit (Annex B) for decoding. Never blocks: when the decoder is
    /// behind, this frame and the rest of its GOP are dropped.
    pub fn frame(&self, annexb: Bytes) {
        let idr = is_idr(&annexb);
        if self.skipping.load(Ordering::Relaxed) && !idr {
            return;
        }
        match self.queue.try_send(Job { idr, data: annexb }) {
            Ok(()) => self.skipping.store(false, Ordering::Relaxed),
            Err(TrySendError::Full(_)) => {
                if !self.skipping.swap(true, Ordering::Relaxed) {
                    debug!("decoder behind: skipping to the next keyframe");
                }
            }
            Err(TrySendError::Disconnected(_)) => {} // the window has closed
        }
    }

    /// Sets the window's title (the newest one wins).
    pub fn set_title(&self, title: String) {
        if self.shared.title.put(title) {
            let _ = self.proxy.send_event(Wake::Title);
        }
    }

    /// Closes the window, ending [`run_window`]. Harmless once it has closed.
    pub fn close(&self) {
        let _ = self.proxy.send_event(Wake::Close);
    }

    /// A hook for [`crate::Config::frame_hook`]: every frame goes to the window, and about
    /// once a second the title shows the camera, the path and the latency.
    pub fn frame_hook(&self, camera: &CameraId) -> FrameHook {
        let handle = self.clone();
        let camera = camera.to_string();
        // When the title was last set, and whether it had a latency then.
        let last: Mutex<Option<(Instant, bool)>> = Mutex::new(None);
        FrameHook(Arc::new(move |seen: &FrameSeen<'_>| {
            handle.frame(seen.data.clone());
            let now = Instant::now();
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            let due = match *last {
                None => true,
                Some((at, had_latency)) => {
                    now.duration_since(at) >= TITLE_EVERY
                        || (!had_latency && seen.latency.is_some())
                }
            };
            if due {
                *last = Some((now, seen.latency.is_some()));
                handle.set_title(title(&camera, seen.path, seen.latency));
            }
        }))
    }
}

/// The window title: `peercam: cam-7 | direct | latency 42 ms`.
fn title(camera: &str, path: Path, latency: Option<Duration>) -> String {
    let latency = latency
        .map(|l| format!("{} ms", l.as_millis()))
        .unwrap_or_else(|| "-".into());
    format!("peercam: {camera} | {path} | latency {latency}")
}

/// Whether an access unit holds an IDR slice (looks no further than its first slice).
fn is_idr(annexb: &[u8]) -> bool {
    nal_units(annexb)
        .filter_map(nal_type)
        .find(|t| (1..=5).contains(t))
        == Some(NAL_IDR)
}

/// A window opened but not yet shown: create it on the main thread with
/// [`VideoWindow::open`], take [`handle`](Self::handle)s, then call [`run_window`].
pub struct VideoWindow {
    event_loop: EventLoop<Wake>,
    handle: WindowHandle,
    decoder: JoinHandle<()>,
    title: String,
}

impl std::fmt::Debug for VideoWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoWindow")
            .field("title", &self.title)
            .finish_non_exhaustive()
    }
}

impl VideoWindow {
    /// Connects to the display and starts the decoder thread. Must be called on the main
    /// thread (winit's rule; it panics elsewhere), at most once per process.
    pub fn open(title: impl Into<String>) -> Result<Self, WindowError> {
        let event_loop = EventLoop::<Wake>::with_user_event()
            .build()
            .map_err(|e| WindowError::NoDisplay(e.to_string()))?;
        let proxy = event_loop.create_proxy();
        let shared = Arc::new(Shared::default());
        let (queue, jobs) = mpsc::sync_channel(DECODE_QUEUE);
        let decoder = {
            let (shared, proxy) = (shared.clone(), proxy.clone());
            std::thread::Builder::new()
                .name("h264-decoder".into())
                .spawn(move || decode_loop(jobs, &shared, &proxy))
                .map_err(|e| WindowError::Run(format!("cannot start the decoder thread: {e}")))?
        };
        let handle = WindowHandle {
            queue,
            skipping: Arc::new(AtomicBool::new(false)),
            shared,
            proxy,
        };
        Ok(VideoWindow {
            event_loop,
            handle,
            decoder,
            title: title.into(),
        })
    }

    /// A handle that feeds this window from any thread.
    pub fn handle(&self) -> WindowHandle {
        self.handle.clone()
    }
}

/// Shows the window until it is closed by the user (which cancels `cancel`) or by
/// [`WindowHandle::close`]. Runs on the calling (main) thread; stops the decoder thread
/// before returning.
pub fn run_window(window: VideoWindow, cancel: CancellationToken) -> Result<(), WindowError> {
    let VideoWindow {
        event_loop,
        handle,
        decoder,
        title,
    } = window;
    let shared = handle.shared.clone();
    drop(handle);
    let mut app = App {
        shared: shared.clone(),
        cancel,
        title,
        view: None,
        picture: None,
        last_picture: None,
        stalled: false,
        sized: false,
        failed: None,
    };
    let ran = event_loop.run_app(&mut app);
    shared.closed.store(true, Ordering::Release);
    if decoder.join().is_err() {
        return Err(WindowError::Run("the decoder thread panicked".into()));
    }
    ran.map_err(|e| WindowError::Run(e.to_string()))?;
    app.failed.map_or(Ok(()), Err)
}

/// Decodes jobs until every handle is gone or the window has closed.
fn decode_loop(jobs: Receiver<Job>, shared: &Shared, proxy: &EventLoopProxy<Wake>) {
    let mut decoder = Decoding::default();
    while !shared.closed.load(Ordering::Acquire) {
        let job = match jobs.recv_timeout(DECODER_POLL) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if let Some(picture) = decoder.push(job.idr, &job.data) {
            if shared.picture.put(picture) && proxy.send_event(Wake::Picture).is_err() {
                return; // the event loop is gone
            }
        }
    }
}

/// The decoder's state: OpenH264 once an IDR has been seen, nothing while waiting for one.
#[derive(Default)]
struct Decoding {
    decoder: Option<openh264::decoder::Decoder>,
    rgb: Vec<u8>,
}

impl Decoding {
    /// Decodes one access unit; a picture when one is ready. Frames before the first IDR,
    /// and after an error until the next IDR, are ignored.
    fn push(&mut self, idr: bool, data: &[u8]) -> Option<Picture> {
        if idr && self.decoder.is_none() {
            match openh264::decoder::Decoder::new() {
                Ok(d) => self.decoder = Some(d),
                Err(e) => {
                    warn!(error = %e, "cannot start the H.264 decoder");
                    return None;
                }
            }
        }
        let decoder = self.decoder.as_mut()?;
        match decoder.decode(data) {
            Ok(Some(yuv)) => Some(to_picture(&yuv, &mut self.rgb)),
            Ok(None) => None,
            Err(e) => {
                warn!(error = %e, "H.264 decoding failed: waiting for the next keyframe");
                self.decoder = None;
                None
            }
        }
    }
}

fn to_picture(yuv: &openh264::decoder::DecodedYUV<'_>, rgb: &mut Vec<u8>) -> Picture {
    use openh264::formats::YUVSource;
    let (width, height) = yuv.dimensions();
    rgb.resize(width * height * 3, 0);
    yuv.write_rgb8(rgb);
    let pixels = rgb
        .chunks_exact(3)
        .map(|p| u32::from(p[0]) << 16 | u32::from(p[1]) << 8 | u32::from(p[2]))
        .collect();
    Picture {
        width,
        height,
        pixels,
    }
}

/// Scales `picture` into an `out_w` x `out_h` buffer, keeping its aspect ratio (nearest
/// neighbour, black borders).
fn fit(picture: &Picture, out: &mut [u32], out_w: usize, out_h: usize) {
    out.fill(0);
    let (pw, ph) = (picture.width, picture.height);
    if pw == 0 || ph == 0 || out_w == 0 || out_h == 0 || out.len() < out_w * out_h {
        return;
    }
    let (w, h) = if out_w * ph <= out_h * pw {
        (out_w, (ph * out_w / pw).max(1))
    } else {
        ((pw * out_h / ph).max(1), out_h)
    };
    let (x0, y0) = ((out_w - w) / 2, (out_h - h) / 2);
    for y in 0..h {
        let src = &picture.pixels[(y * ph / h) * pw..][..pw];
        let dst = &mut out[(y0 + y) * out_w + x0..][..w];
        for (x, d) in dst.iter_mut().enumerate() {
            *d = src[x * pw / w];
        }
    }
}

/// The window and its surface, created once the event loop runs.
struct View {
    window: Rc<Window>,
    surface: softbuffer::Surface<Rc<Window>, Rc<Window>>,
}

struct App {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    title: String,
    view: Option<View>,
    picture: Option<Picture>,
    last_picture: Option<Instant>,
    stalled: bool,
    /// The window has been sized to the stream.
    sized: bool,
    failed: Option<WindowError>,
}

impl App {
    fn create(&mut self, event_loop: &ActiveEventLoop) -> Result<View, WindowError> {
        let create = |e: &dyn std::fmt::Display| WindowError::Create(e.to_string());
        let attributes = Window::default_attributes()
            .with_title(self.title.clone())
            .with_inner_size(PhysicalSize::new(INITIAL_SIZE.0, INITIAL_SIZE.1));
        let window = Rc::new(
            event_loop
                .create_window(attributes)
                .map_err(|e| create(&e))?,
        );
        let context = softbuffer::Context::new(window.clone()).map_err(|e| create(&e))?;
        let surface = softbuffer::Surface::new(&context, window.clone()).map_err(|e| create(&e))?;
        Ok(View { window, surface })
    }

    fn fail(&mut self, event_loop: &ActiveEventLoop, error: WindowError) {
        self.failed = Some(error);
        self.cancel.cancel();
        event_loop.exit();
    }

    fn draw(&mut self) -> Result<(), softbuffer::SoftBufferError> {
        let Some(view) = self.view.as_mut() else {
            return Ok(());
        };
        let size = view.window.inner_size();
        let (Some(w), Some(h)) = (NonZeroU32::new(size.width), NonZeroU32::new(size.height)) else {
            return Ok(()); // minimised
        };
        view.surface.resize(w, h)?;
        let mut buffer = view.surface.buffer_mut()?;
        match &self.picture {
            Some(p) => fit(p, &mut buffer, w.get() as usize, h.get() as usize),
            None => buffer.fill(0),
        }
        buffer.present()
    }

    fn show_title(&self) {
        if let Some(view) = &self.view {
            let suffix = match self.last_picture {
                Some(at) if self.stalled => {
                    format!(" | no video for {} s", at.elapsed().as_secs())
                }
                _ => String::new(),
            };
            view.window.set_title(&format!("{}{suffix}", self.title));
        }
    }

    fn new_picture(&mut self) {
        let Some(picture) = self.shared.picture.take() else {
            return;
        };
        if let Some(view) = self.view.as_ref() {
            if !self.sized {
                self.sized = true;
                let size = PhysicalSize::new(picture.width as u32, picture.height as u32);
                let _ = view.window.request_inner_size(size);
            }
            view.window.request_redraw();
        }
        self.picture = Some(picture);
        self.last_picture = Some(Instant::now());
        if self.stalled {
            self.stalled = false;
            self.show_title();
        }
    }
}

impl ApplicationHandler<Wake> for App {
    fn resumed(&mut self, event_loop: &ActiveEventLoop) {
        if self.view.is_some() {
            return;
        }
        match self.create(event_loop) {
            Ok(view) => self.view = Some(view),
            Err(e) => self.fail(event_loop, e),
        }
    }

    fn new_events(&mut self, event_loop: &ActiveEventLoop, cause: StartCause) {
        if let StartCause::ResumeTimeReached { .. } = cause {
            let stalled = self
                .last_picture
                .is_some_and(|t| t.elapsed() >= STALL_AFTER);
            if stalled || self.stalled {
                self.stalled = stalled;
                self.show_title();
            }
        }
        if matches!(
            cause,
            StartCause::ResumeTimeReached { .. } | StartCause::Init
        ) {
            event_loop.set_control_flow(ControlFlow::WaitUntil(Instant::now() + TITLE_EVERY));
        }
    }

    fn user_event(&mut self, event_loop: &ActiveEventLoop, event: Wake) {
        match event {
            Wake::Picture => self.new_picture(),
            Wake::Title => {
                if let Some(title) = self.shared.title.take() {
                    self.title = title;
                    self.show_title();
                }
            }
            Wake::Close => event_loop.exit(),
        }
    }

    fn window_event(&mut self, event_loop: &ActiveEventLoop, _id: WindowId, event: WindowEvent) {
        match event {
            WindowEvent::CloseRequested | WindowEvent::Destroyed => {
                self.cancel.cancel();
                event_loop.exit();
            }
            WindowEvent::RedrawRequested => {
                if let Err(e) = self.draw() {
                    warn!(error = %e, "cannot draw the video");
                }
            }
            WindowEvent::Resized(_) => {
                if let Some(view) = &self.view {
                    view.window.request_redraw();
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peercam_common::h264::split_access_units;

    const SAMPLE: &[u8] = include_bytes!("../../assets/sample.h264");

    fn count(p: &Picture, keep: impl Fn(u32, u32, u32) -> bool) -> usize {
        p.pixels
            .iter()
            .filter(|&&px| keep(px >> 16 & 0xff, px >> 8 & 0xff, px & 0xff))
            .count()
    }

    #[test]
    fn decodes_the_sample_into_its_colour_bars() {
        let aus = split_access_units(SAMPLE).unwrap();
        let mut d = Decoding::default();
        let pictures: Vec<Picture> = aus
            .iter()
            .filter_map(|au| d.push(is_idr(&au.data), &au.data))
            .collect();
        assert_eq!(pictures.len(), aus.len(), "one picture per access unit");
        let p = &pictures[10];
        assert_eq!((p.width, p.height), (640, 360));
        assert_eq!(p.pixels.len(), 640 * 360);
        let n = p.pixels.len();
        let red = count(p, |r, g, b| r > 180 && g < 80 && b < 80);
        let green = count(p, |r, g, b| r < 80 && g > 180 && b < 80);
        let blue = count(p, |r, g, b| r < 80 && g < 80 && b > 180);
        let yellow = count(p, |r, g, b| r > 180 && g > 180 && b < 80);
        for (name, c) in [
            ("red", red),
            ("green", green),
            ("blue", blue),
            ("yellow", yellow),
        ] {
            assert!(c > n / 20, "{name}: {c} of {n} pixels");
        }
    }

    #[test]
    fn frames_before_the_first_idr_and_garbage_are_ignored_without_panicking() {
        let aus = split_access_units(SAMPLE).unwrap();
        let mut d = Decoding::default();
        // Start mid-GOP: nothing until the IDR at frame 25.
        for au in &aus[5..25] {
            assert!(d.push(is_idr(&au.data), &au.data).is_none());
        }
        assert!(d.push(true, &aus[25].data).is_some());
        // Garbage, then a truncated frame: no panic; the next IDR decodes again.
        let _ = d.push(false, &[0, 0, 0, 1, 0x41, 0xff, 0x00, 0x13, 0x37]);
        let cut = &aus[30].data[..aus[30].data.len() / 3];
        let _ = d.push(false, cut);
        let _ = d.push(true, &[0, 0, 0, 1, 0x65, 0xde, 0xad]);
        assert!(
            d.push(true, &aus[50].data).is_some(),
            "recovers at the next IDR"
        );
        assert!(d.push(false, &aus[51].data).is_some());
    }

    #[test]
    fn idr_detection_looks_at_the_first_slice() {
        let aus = split_access_units(SAMPLE).unwrap();
        let idrs: Vec<usize> = (0..aus.len()).filter(|&i| is_idr(&aus[i].data)).collect();
        assert_eq!(idrs, vec![0, 25, 50, 75]);
        assert!(!is_idr(&[]));
        assert!(!is_idr(&[0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x41, 9]));
    }

    #[test]
    fn fit_keeps_the_aspect_ratio_with_black_borders() {
        let p = Picture {
            width: 2,
            height: 1,
            pixels: vec![0xff0000, 0x00ff00],
        };
        let mut out = vec![7; 4 * 4];
        fit(&p, &mut out, 4, 4);
        // 4x2 picture centred vertically: rows 1 and 2.
        assert_eq!(&out[..4], &[0; 4]);
        assert_eq!(&out[4..8], &[0xff0000, 0xff0000, 0x00ff00, 0x00ff00]);
        assert_eq!(&out[8..12], &[0xff0000, 0xff0000, 0x00ff00, 0x00ff00]);
        assert_eq!(&out[12..], &[0; 4]);
        let mut tall = vec![7; 2 * 3];
        fit(&p, &mut tall, 1, 6);
        assert_eq!(tall, vec![0, 0, 0xff0000, 0, 0, 0]);
        fit(&p, &mut [], 0, 0);
    }

    #[test]
    fn mailbox_keeps_the_newest_and_wakes_once() {
        let m = Mailbox::default();
        assert!(m.put(1));
        assert!(!m.put(2), "a wake-up is already pending");
        assert_eq!(m.take(), Some(2));
        assert_eq!(m.take(), None);
        assert!(m.put(3));
    }

    #[test]
    fn title_names_camera_path_and_latency() {
        let t = title("cam-7", Path::Relay, Some(Duration::from_micros(41_700)));
        assert_eq!(t, "peercam: cam-7 | relay | latency 41 ms");
        assert_eq!(
            title("cam-7", Path::Lan, None),
            "peercam: cam-7 | lan | latency -"
        );
    }
}
