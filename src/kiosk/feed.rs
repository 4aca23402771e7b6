//! What watchers of a kiosk see live: the latest camera frame (JPEG-encoded once, however many
//! viewers) and a stream of events — each classification's smoothed label, and a note after
//! every change to the examples or head, whichever front end made it.
//!
//! The request queue ([`super::hub`]) publishes; viewers (the web page's preview and its event
//! stream) wait on a condition variable for something newer than what they have. Nothing is
//! captured or classified for the feed while nobody watches.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backbone::RgbFrame;

/// Events kept for watchers that fall behind.
const KEEP_EVENTS: usize = 64;

/// The live feed of one kiosk.
#[derive(Debug)]
pub struct Feed {
    state: Mutex<State>,
    changed: Condvar,
    watchers: AtomicUsize,
    viewers: AtomicUsize,
    /// Preview frames at most this often.
    pub period: Duration,
    /// Longest side of a preview frame, in pixels.
    pub max_side: u32,
    /// JPEG quality of preview frames.
    pub quality: u8,
}

#[derive(Debug, Default)]
struct State {
    frame_seq: u64,
    frame: Option<Arc<RgbFrame>>,
    published: Option<Instant>,
    jpeg: Option<(u64, Arc<Vec<u8>>)>,
    event_seq: u64,
    events: VecDeque<(u64, Arc<str>)>,
    /// Frames classified for the feed, and when the count started.
    classified: u64,
    frames: u64,
}

/// A watcher's presence: while one is alive the kiosk captures and classifies for the feed;
/// while a viewer is, it also publishes every frame it captures, and more frames while it
/// classifies.
#[derive(Debug)]
pub struct Watching<'a> {
    feed: &'a Feed,
    viewer: bool,
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.feed.watchers.fetch_sub(1, Ordering::SeqCst);
        if self.viewer {
            self.feed.viewers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Feed {
    /// A feed publishing at most `fps` preview frames a second, scaled to `max_side`.
    pub fn new(fps: f64, max_side: u32, quality: u8) -> Feed {
        Feed {
            state: Mutex::default(),
            changed: Condvar::new(),
            watchers: AtomicUsize::new(0),
            viewers: AtomicUsize::new(0),
            period: Duration::from_secs_f64(1.0 / fps.clamp(0.1, 120.0)),
            max_side,
            quality,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: go on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a watcher of the events until the guard is dropped.
    pub fn watch(&self) -> Watching<'_> {
        self.watchers.fetch_add(1, Ordering::SeqCst);
        Watching {
            feed: self,
            viewer: false,
        }
    }

    /// Registers a viewer of the preview frames (a watcher too) until the guard is dropped.
    pub fn view(&self) -> Watching<'_> {
        self.viewers.fetch_add(1, Ordering::SeqCst);
        self.watchers.fetch_add(1, Ordering::SeqCst);
        Watching {
            feed: self,
            viewer: true,
        }
    }

    /// Whether anyone watches (events or frames).
    pub fn watched(&self) -> bool {
        self.watchers.load(Ordering::SeqCst) > 0
    }

    /// Whether anyone views the preview frames.
    pub fn viewed(&self) -> bool {
        self.viewers.load(Ordering::SeqCst) > 0
    }

    /// A new frame (the kiosk's camera, whatever it was captured for); dropped when the last
    /// one is younger than the preview period (viewers get at most `1 / period` frames a
    /// second, however often the camera is read).
    pub fn publish_frame(&self, frame: &RgbFrame) {
        {
            let mut s = self.lock();
            let now = Instant::now();
            if s.published
                .is_some_and(|t| now.duration_since(t) < self.period.mul_f64(0.9))
            {
                return;
            }
            s.published = Some(now);
        }
        let small = frame.thumbnail(self.max_side);
        let mut s = self.lock();
        s.frame_seq += 1;
        s.frames += 1;
        s.frame = Some(Arc::new(small));
        drop(s);
        self.changed.notify_all();
    }

    /// A new event (one JSON object).
    pub fn publish_event(&self, json: String) {
        let mut s = self.lock();
        s.event_seq += 1;
        let seq = s.event_seq;
        s.events.push_back((seq, json.into()));
        while s.events.len() > KEEP_EVENTS {
            s.events.pop_front();
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Watchers and viewers now.
    pub fn watching(&self) -> (usize, usize) {
        (
            self.watchers.load(Ordering::SeqCst),
            self.viewers.load(Ordering::SeqCst),
        )
    }

    /// Counts a frame classified for the feed.
    pub(super) fn count_classified(&self) {
        self.lock().classified += 1;
    }

    /// Frames published and classified so far (a benchmark reads them).
    pub fn counters(&self) -> (u64, u64) {
        let s = self.lock();
        (s.frames, s.classified)
    }

    /// The first frame newer than `after`, JPEG-encoded (once for every viewer), with its
    /// sequence number; `None` after `wait` without one.
    pub fn next_jpeg(&self, after: u64, wait: Duration) -> Option<(u64, Arc<Vec<u8>>)> {
        let deadline = Instant::now() + wait;
        let mut s = self.lock();
        while s.frame_seq <= after || s.frame.is_none() {
            let left = deadline.checked_duration_since(Instant::now())?;
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if let Some((seq, jpeg)) = &s.jpeg {
            if *seq == s.frame_seq {
                return Some((*seq, Arc::clone(jpeg)));
            }
        }
        let (seq, frame) = (s.frame_seq, Arc::clone(s.frame.as_ref()?));
        drop(s);
        let jpeg = Arc::new(frame.to_jpeg(self.quality, "a preview frame").ok()?);
        let mut s = self.lock();
        if s.jpeg.as_ref().is_none_or(|(have, _)| *have < seq) {
            s.jpeg = Some((seq, Arc::clone(&jpeg)));
        }
        Some((seq, jpeg))
    }

    /// The events after `after` (all that are kept), waiting up to `wait` for one; with the
    /// sequence number to ask after next time.
    pub fn next_events(&self, after: u64, wait: Duration) -> (u64, Vec<Arc<str>>) {
        let deadline = Instant::now() + wait;
        let mut s = self.lock();
        while s.event_seq <= after {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return (after, Vec::new());
            };
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let events = s
            .events
            .iter()
            .filter(|(seq, _)| *seq > after)
            .map(|(_, e)| Arc::clone(e))
            .collect();
        (s.event_seq, events)
    }

    /// The sequence number of the latest event (a new watcher starts after it).
    pub fn last_event(&self) -> u64 {
        self.lock().event_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: `view` built its guard from a `watch` guard whose drop ran at once, so a
    /// viewer left the watcher count one short and it wrapped below zero when two left; the
    /// next watcher then saw no frame classified for seconds.
    #[test]
    fn watchers_and_viewers_count_back_to_zero() {
        let f = Feed::new(15.0, 64, 70);
        {
            let _w = f.watch();
            let _v = f.view();
            assert_eq!(f.watching(), (2, 1));
            assert!(f.watched() && f.viewed());
        }
        assert_eq!(f.watching(), (0, 0));
        let _w = f.watch();
        assert_eq!(f.watching(), (1, 0));
        assert!(f.watched() && !f.viewed());
    }

    #[test]
    fn one_jpeg_per_frame_and_events_after_a_sequence_number() {
        let f = Feed::new(15.0, 64, 70);
        assert!(f.next_jpeg(0, Duration::from_millis(10)).is_none());
        let frame = RgbFrame::from_raw(128, 96, vec![90; 128 * 96 * 3]).unwrap();
        f.publish_frame(&frame);
        let (seq, a) = f.next_jpeg(0, Duration::from_millis(10)).unwrap();
        let (again, b) = f.next_jpeg(0, Duration::from_millis(10)).unwrap();
        assert_eq!((seq, again), (1, 1));
        assert!(Arc::ptr_eq(&a, &b), "encoded once");
        assert!(f.next_jpeg(seq, Duration::from_millis(10)).is_none());
        let start = f.last_event();
        f.publish_event("{\"type\":\"changed\"}".into());
        let (next, events) = f.next_events(start, Duration::from_millis(10));
        assert_eq!(events.len(), 1);
        assert!(f.next_events(next, Duration::from_millis(10)).1.is_empty());
    }
}
