//! Image decoding and the exact resize / crop / normalise the backbone was trained with.
//!
//! The recipe is the manifest's `[input]` table; for the bundled EfficientNet-Lite0 it is: decode
//! to RGB honouring EXIF orientation, resize the shorter side to 256 (bilinear, antialiased like
//! PIL), centre-crop 224 (offsets rounded down), `(x - 127) / 128`, NCHW. The golden test checks
//! this against PIL + onnxruntime (`tests/fixtures/reference.py`).
//!
//! Memory per picture is bounded: a header claiming more than [`MAX_SIDE`] px a side or
//! [`MAX_DECODED_BYTES`] decoded is refused before the pixels are allocated (the image crate's
//! `Limits`), and the resize computes only the pixels the centre crop keeps, so an extreme
//! aspect ratio costs no more than a square picture.

use std::collections::HashSet;
use std::io::{BufRead, Cursor, Seek};
use std::ops::Range;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};

use super::BackboneError;

/// File extensions `graft` treats as images when it walks folders.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "webp", "gif", "tif", "tiff"];

/// True if the path has one of [`IMAGE_EXTENSIONS`] (case-insensitive).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
        .unwrap_or(false)
}

/// The input tensor and the preprocessing that produces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Name of the graph input.
    pub name: String,
    /// Only `NCHW` for now.
    pub layout: String,
    /// Only `RGB` for now.
    pub channels: String,
    /// Side of the square input, in pixels.
    pub size: u32,
    /// The shorter side is resized to this before the centre crop.
    pub resize_shorter: u32,
    /// Only `bilinear` for now.
    pub resize_filter: String,
    /// Per-channel value subtracted from the 0..255 pixel.
    pub mean: [f32; 3],
    /// Per-channel divisor applied after the mean.
    pub std: [f32; 3],
}

/// The largest `resize_shorter` (and so `size`) graft accepts: 16 times the bundled models'
/// 256. Every picture is resized to it before the crop, so it bounds the memory one picture
/// takes (an export claiming 4e9 asked for 64 GB and aborted).
pub const MAX_RESIZE_SHORTER: u32 = 4096;

impl InputSpec {
    /// The one check of a preprocessing recipe, wherever it comes from: a manifest's `[input]`
    /// table or an export's `graft.preprocess` metadata (the caller prefixes the field names).
    /// What it refuses is what [`prepare`] cannot do or would do wrong: another layout, channel
    /// order or filter; a crop larger than the resize (or none); a resize beyond
    /// [`MAX_RESIZE_SHORTER`]; a non-finite mean, or a standard deviation that is not finite
    /// and positive.
    pub fn validate(&self) -> Result<(), super::FieldError> {
        use super::FieldError;
        let only = |field: &str, value: &str, want: &str| {
            if value == want {
                Ok(())
            } else {
                Err(FieldError::new(
                    field,
                    value,
                    format!("only {want} is supported"),
                ))
            }
        };
        only("layout", &self.layout, "NCHW")?;
        only("channels", &self.channels, "RGB")?;
        only("resize_filter", &self.resize_filter, "bilinear")?;
        if !(1..=MAX_RESIZE_SHORTER).contains(&self.resize_shorter) {
            return Err(FieldError::new(
                "resize_shorter",
                self.resize_shorter,
                format!("must be in 1..={MAX_RESIZE_SHORTER}"),
            ));
        }
        if self.size == 0 || self.size > self.resize_shorter {
            return Err(FieldError::new(
                "size",
                self.size,
                format!(
                    "must satisfy 0 < size <= resize_shorter ({})",
                    self.resize_shorter
                ),
            ));
        }
        if !self.mean.iter().all(|m| m.is_finite()) {
            return Err(FieldError::new("mean", self.mean, "must be finite"));
        }
        if !self.std.iter().all(|s| s.is_finite() && *s > 0.0) {
            return Err(FieldError::new(
                "std",
                self.std,
                "must be finite and positive",
            ));
        }
        Ok(())
    }
}

/// The image files under `dir`, recursively, sorted (so every run and every board sees the same
/// files in the same order), skipping hidden files and folders (names starting with `.`). The
/// one folder walk: `train`'s class folders, `embed` / `predict` / `add` folders and `--source`
/// folders all see the same files. An error names the folder that could not be read.
///
/// Links are followed, and each folder is walked once: a link back to a folder that contains it
/// (`fish/self -> .`, `tool/up -> ..`) would repeat the pictures without end, and a second link
/// to a folder already walked would count its pictures twice. Those links, broken links and
/// image-named entries that are not regular files (a FIFO would block the reader) are skipped
/// with a warning naming them.
pub fn image_files_in(dir: &Path) -> Result<Vec<PathBuf>, BackboneError> {
    let real = std::fs::canonicalize(dir).map_err(|e| BackboneError::io(dir, e))?;
    let mut walk = Walk {
        out: Vec::new(),
        walked: HashSet::from([real.clone()]),
    };
    walk.folder(dir, &real)?;
    Ok(walk.out)
}

struct Walk {
    out: Vec<PathBuf>,
    /// Canonical paths of the folders walked so far.
    walked: HashSet<PathBuf>,
}

impl Walk {
    /// Walks `dir`, whose canonical path is `real`.
    fn folder(&mut self, dir: &Path, real: &Path) -> Result<(), BackboneError> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| BackboneError::io(dir, e))?
            .map(|e| {
                e.map(|e| e.path())
                    .map_err(|err| BackboneError::io(dir, err))
            })
            .collect::<Result<_, _>>()?;
        entries.sort();
        for p in entries {
            let Some(name) = p.file_name() else { continue };
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let link = std::fs::symlink_metadata(&p)
                .map_err(|e| BackboneError::io(&p, e))?
                .file_type()
                .is_symlink();
            let meta = match std::fs::metadata(&p) {
                Ok(m) => m,
                Err(e) if link => {
                    log::warn!("skipping {}: a link to nothing usable ({e})", p.display());
                    continue;
                }
                Err(e) => return Err(BackboneError::io(&p, e)),
            };
            if meta.is_dir() {
                let sub = if link {
                    std::fs::canonicalize(&p).map_err(|e| BackboneError::io(&p, e))?
                } else {
                    real.join(name)
                };
                if real.starts_with(&sub) {
                    log::warn!(
                        "skipping {}: a link back to {}, which contains it (a loop)",
                        p.display(),
                        sub.display()
                    );
                } else if !self.walked.insert(sub.clone()) {
                    log::warn!(
                        "skipping {}: a link to {}, already walked",
                        p.display(),
                        sub.display()
                    );
                } else {
                    self.folder(&p, &sub)?;
                }
            } else if has_image_extension(&p) {
                if meta.is_file() {
                    self.out.push(p);
                } else {
                    log::warn!(
                        "skipping {}: not a regular file but {}",
                        p.display(),
                        crate::userfile::describe(&meta.file_type())
                    );
                }
            }
        }
        Ok(())
    }
}

/// One image made ready for the backbone: `3 * size * size` floats, planar RGB.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub(crate) data: Vec<f32>,
}

impl Prepared {
    /// Wraps an already preprocessed planar RGB tensor of `3 * size * size` values (e.g. from
    /// another runtime's preprocessing, to compare runtimes on the very same input).
    pub fn from_planar(data: Vec<f32>, size: u32) -> Option<Prepared> {
        (data.len() == 3 * (size as usize) * (size as usize)).then_some(Prepared { data })
    }

    /// The planar (CHW) values.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }
}

/// A decoded RGB picture (8 bits per channel), independent of the decoder library.
#[derive(Debug, Clone)]
pub struct RgbFrame {
    inner: RgbImage,
}

impl RgbFrame {
    /// Wraps packed RGB bytes (`width * height * 3`). Returns `None` if the length is wrong.
    pub fn from_raw(width: u32, height: u32, rgb: Vec<u8>) -> Option<RgbFrame> {
        RgbImage::from_raw(width, height, rgb).map(|inner| RgbFrame { inner })
    }
    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.inner.width()
    }
    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.inner.height()
    }
    /// Packed RGB bytes, row-major.
    pub fn as_raw(&self) -> &[u8] {
        self.inner.as_raw()
    }
    /// Encodes as a baseline JPEG (`quality` 1–100), e.g. to save a camera frame.
    /// `what` names the picture in the error (JPEG is limited to 65535 pixels a side).
    pub fn to_jpeg(&self, quality: u8, what: &str) -> Result<Vec<u8>, BackboneError> {
        let mut out = Vec::with_capacity(self.inner.len() / 8);
        let mut enc =
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
        enc.encode_image(&self.inner)
            .map_err(|e| BackboneError::Encode {
                what: what.to_string(),
                format: "JPEG",
                reason: e.to_string(),
            })?;
        Ok(out)
    }

    /// Scales down (keeping the aspect ratio) so that the longer side is at most `max_side`.
    pub fn thumbnail(&self, max_side: u32) -> RgbFrame {
        let (w, h) = (self.width(), self.height());
        let long = w.max(h);
        if long <= max_side {
            return self.clone();
        }
        let nw = ((w as u64 * max_side as u64) / long as u64).max(1) as u32;
        let nh = ((h as u64 * max_side as u64) / long as u64).max(1) as u32;
        RgbFrame {
            inner: image::imageops::resize(&self.inner, nw, nh, FilterType::Triangle),
        }
    }
}

/// The longest side graft decodes, in pixels. The largest phone sensors (200 MP) write
/// 16320 x 12240 photos and WebP stops at 16383, so no camera picture is refused; a header
/// claiming more (65535 x 65535 fits in a 69-byte PNG) is refused before any pixel is allocated.
pub const MAX_SIDE: u32 = 16384;

/// The most memory one picture may take while it is decoded: the decoder's output buffer plus
/// what it allocates on the way (the image crate's [`Limits`]). 1 GiB holds a 200 MP photo as
/// 8-bit RGB (600 MB) or a 16384 x 16384 one (768 MiB), not a 16-bit RGBA one of that size.
/// Turning the picture into 8-bit RGB (grey or RGBA sources) or rotating it by its EXIF
/// orientation copies it once more, so a picture at the limit peaks near twice this.
pub const MAX_DECODED_BYTES: u64 = 1 << 30;

/// The largest image file graft reads into memory: a picture within the limits above is
/// smaller than this encoded.
pub const MAX_FILE_BYTES: u64 = MAX_DECODED_BYTES;

fn limits_text() -> String {
    format!(
        "graft decodes pictures up to {MAX_SIDE} px a side and {} MiB decoded",
        MAX_DECODED_BYTES >> 20
    )
}

/// Whether a decoder's refusal is of the picture's size: the image crate says so only in
/// words (`GenericFeature("Image dimensions (WxH ...) are too large")`, BMP, GIF, PNM, HDR,
/// DDS and farbfeld).
fn claims_too_much(e: &image::error::UnsupportedError) -> bool {
    matches!(e.kind(), image::error::UnsupportedErrorKind::GenericFeature(f)
        if f.starts_with("Image dimensions") && f.ends_with("are too large"))
}

/// Decodes an image file to RGB, applying its EXIF orientation. Only a regular file is opened
/// ([`crate::userfile`]), and only one within [`MAX_FILE_BYTES`].
pub fn decode_file(path: &Path) -> Result<RgbFrame, BackboneError> {
    let meta = crate::userfile::check(path).map_err(|e| BackboneError::io(path, e))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(BackboneError::TooLarge {
            path: path.to_path_buf(),
            reason: format!(
                "the file is {} MiB; graft reads image files up to {} MiB",
                meta.len() >> 20,
                MAX_FILE_BYTES >> 20
            ),
        });
    }
    let bytes = crate::userfile::read(path).map_err(|e| BackboneError::io(path, e))?;
    decode_bytes(&bytes, path)
}

/// Decodes in-memory image bytes (any supported format); `path` is only used in messages.
/// Pictures larger than [`MAX_SIDE`] or [`MAX_DECODED_BYTES`] are refused from their header.
///
/// The image crate's decoders read untrusted bytes; a panic inside one (a decoder bug) is
/// caught here and becomes [`BackboneError::Decode`] for this file, so one bad picture never
/// takes a kiosk or a whole `predict` down.
pub fn decode_bytes(bytes: &[u8], path: &Path) -> Result<RgbFrame, BackboneError> {
    std::panic::catch_unwind(|| decode_reader(Cursor::new(bytes), bytes, path)).unwrap_or_else(
        |_| {
            Err(BackboneError::Decode {
                path: path.to_path_buf(),
                reason: "the image decoder failed on this file (a decoder bug: a panic)".into(),
            })
        },
    )
}

fn decode_reader<R: BufRead + Seek>(
    reader: R,
    reader_bytes: &[u8],
    path: &Path,
) -> Result<RgbFrame, BackboneError> {
    let bad = |reason: String| BackboneError::Decode {
        path: path.to_path_buf(),
        reason,
    };
    let too_large = |reason: String| BackboneError::TooLarge {
        path: path.to_path_buf(),
        reason: format!("{reason} ({})", limits_text()),
    };
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|e| BackboneError::io(path, e))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits.clone());
    match reader.format() {
        None => return Err(bad("unknown or unsupported image format".into())),
        // The JPEG decoder fills a cut-off picture with grey instead of failing; a camera
        // frame cut by a full disk or a half-copied file must not be learned from.
        Some(image::ImageFormat::Jpeg) if jpeg_is_truncated(reader_bytes) => {
            return Err(bad(
                "truncated JPEG (no end-of-image marker after the image data)".into(),
            ))
        }
        Some(image::ImageFormat::Png) => {
            if let Some(len) = png_bad_palette(reader_bytes) {
                return Err(bad(format!(
                    "PNG palette (PLTE) of {len} bytes, not whole RGB entries"
                )));
            }
        }
        Some(_) => {}
    }
    let limit_error = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => too_large(match l.kind() {
            image::error::LimitErrorKind::DimensionError => {
                format!("its header claims more than {MAX_SIDE} px a side")
            }
            image::error::LimitErrorKind::InsufficientMemory => format!(
                "decoding it needs more than {} MiB",
                MAX_DECODED_BYTES >> 20
            ),
            _ => l.to_string(),
        }),
        // A decoder whose buffer for the claimed size would not fit this platform's address
        // space refuses it before the limits are checked (on 32-bit ARM, a 65535² BMP).
        image::ImageError::Unsupported(u) if claims_too_much(&u) => {
            too_large(format!("the decoder refused its size: {u}"))
        }
        e => bad(e.to_string()),
    };
    // Each decoder checks the sides against the limits as it reads the header.
    let mut decoder = reader.into_decoder().map_err(limit_error)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(BackboneError::EmptyImage {
            path: path.to_path_buf(),
            width: w,
            height: h,
        });
    }
    // The output buffer counts against the allowance before it is allocated, and the decoder
    // gets what is left for its own buffers: what `ImageReader::decode` does, which graft
    // cannot call because it needs the EXIF orientation from the decoder.
    let needed = decoder.total_bytes();
    limits
        .reserve(needed)
        .and_then(|()| decoder.set_limits(limits))
        .map_err(|_| {
            too_large(format!(
                "{w}x{h} {:?} needs {} MiB decoded",
                decoder.color_type(),
                needed.div_ceil(1 << 20)
            ))
        })?;
    // A broken EXIF block should not make a good picture unreadable: fall back to upright.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(limit_error)?;
    img.apply_orientation(orientation);
    // Grey, grey+alpha, RGBA and 16-bit pictures all become 8-bit RGB; alpha is dropped (as
    // PIL's convert("RGB") does), not composited.
    Ok(RgbFrame {
        inner: img.into_rgb8(),
    })
}

/// True when a JPEG's entropy-coded data is not followed by an EOI marker (`FF D9`). Segments
/// before the first start-of-scan are skipped by their lengths (an EXIF thumbnail carries an EOI
/// of its own); inside scan data `FF` is always stuffed, so `FF D9` there can only be the end.
fn jpeg_is_truncated(b: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return true;
        }
        let marker = b[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if marker == 0xDA {
            return !b[i..].windows(2).any(|w| w == [0xFF, 0xD9]);
        }
        let len = u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize;
        i += 2 + len;
    }
    true
}

/// The length of a PNG's first palette chunk when it is not a multiple of 3 (the PNG spec,
/// 11.2.3). png 0.18.1 accepts such a chunk and then panics expanding it
/// (image-rs/image-png#694, fixed upstream after that release); found by `fuzz/run.sh image`.
fn png_bad_palette(b: &[u8]) -> Option<usize> {
    let mut i = 8; // after the signature
    while i + 8 <= b.len() {
        let len = u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        match &b[i + 4..i + 8] {
            b"PLTE" => return (!len.is_multiple_of(3)).then_some(len),
            b"IDAT" | b"IEND" => return None, // a palette comes before the image data
            _ => i = i.saturating_add(12).saturating_add(len),
        }
    }
    None
}

/// Resize-shorter, centre-crop and normalise a decoded frame as the manifest says.
pub fn prepare(frame: &RgbFrame, spec: &InputSpec) -> Prepared {
    let img = &frame.inner;
    let (w, h) = img.dimensions();
    let (nw, nh) = resized_dims(w, h, spec.resize_shorter);
    let size = spec.size;
    let crop = Window {
        x: (nw - size) / 2,
        y: (nh - size) / 2,
        w: size,
        h: size,
    };
    // Only the pixels the crop keeps are resized: the same values as resizing the whole picture
    // and cropping (each output pixel depends on its own filter window only), without the
    // whole resized picture, which for a 100000 x 1 one is 25600000 x 256 (19.6 GB).
    let src = resize_bilinear_window(img, nw, nh, crop);
    let plane = (size * size) as usize;
    let mut data = vec![0f32; 3 * plane];
    let scale = spec.std.map(|s| 1.0 / s);
    for (o, px) in src.as_raw().chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * plane + o] = (px[c] as f32 - spec.mean[c]) * scale[c];
        }
    }
    Prepared { data }
}

/// A rectangle of a resized picture: first column and row, width and height.
#[derive(Debug, Clone, Copy)]
struct Window {
    x: u32,
    y: u32,
    w: u32,
    h: u32,
}

/// Fixed-point precision of the resampling weights (as in Pillow's Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The whole picture resized: the reference the window is tested against.
#[cfg(test)]
pub(crate) fn resize_bilinear(src: &RgbImage, nw: u32, nh: u32) -> RgbImage {
    resize_bilinear_window(
        src,
        nw,
        nh,
        Window {
            x: 0,
            y: 0,
            w: nw,
            h: nh,
        },
    )
}

/// Pillow's antialiased bilinear resample, bit for bit: per output pixel a triangle filter
/// widened by the downscale factor, weights normalised and rounded to 22-bit fixed point, a
/// horizontal pass then a vertical one, each rounding to 8 bits. Matching the reference
/// preprocessing exactly matters for int8 models, where a ±1 difference in a pixel can flip a
/// quantisation step (measured: embedding cosine to onnxruntime 0.997 with the `image` crate's
/// float resize, >= 0.999 with this one).
///
/// Only the pixels inside `win` (which must lie within `nw x nh`) are computed: the horizontal
/// pass runs on the source rows the window's vertical filters read, for the window's columns
/// only. Every computed pixel is the one resizing the whole picture gives.
fn resize_bilinear_window(src: &RgbImage, nw: u32, nh: u32, win: Window) -> RgbImage {
    let (w, h) = src.dimensions();
    let raw = src.as_raw();
    let (ww, wh) = (win.w as usize, win.h as usize);
    let cols = win.x as usize..win.x as usize + ww;
    let vertical = (nh != h).then(|| coefficients(h, nh, win.y as usize..win.y as usize + wh));
    // The source rows the vertical pass reads (or, without one, the window's own rows).
    let rows = match &vertical {
        Some((bounds, _, _)) => {
            let first = bounds.iter().map(|b| b.0).min().unwrap_or(0);
            let end = bounds.iter().map(|b| b.0 + b.1).max().unwrap_or(first);
            first..end
        }
        None => win.y as usize..win.y as usize + wh,
    };
    let row_bytes = w as usize * 3;
    let horizontal: Vec<u8> = if nw != w {
        let (bounds, k, ks) = coefficients(w, nw, cols);
        let mut out = vec![0u8; ww * rows.len() * 3];
        for (ry, y) in rows.clone().enumerate() {
            let row = &raw[y * row_bytes..(y + 1) * row_bytes];
            for (x, &(min, len)) in bounds.iter().enumerate() {
                let kx = &k[x * ks..x * ks + len];
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (i, kw) in kx.iter().enumerate() {
                    let px = &row[(min + i) * 3..(min + i) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += px[c] as i32 * kw;
                    }
                }
                for c in 0..3 {
                    out[(ry * ww + x) * 3 + c] = clip8(acc[c]);
                }
            }
        }
        out
    } else {
        let mut out = Vec::with_capacity(ww * rows.len() * 3);
        for y in rows.clone() {
            out.extend_from_slice(&raw[y * row_bytes + cols.start * 3..][..ww * 3]);
        }
        out
    };
    let out = match vertical {
        Some((bounds, k, ks)) => {
            let stride = ww * 3;
            let mut out = vec![0u8; stride * wh];
            for (y, &(min, len)) in bounds.iter().enumerate() {
                let ky = &k[y * ks..y * ks + len];
                let first = min - rows.start;
                for x in 0..stride {
                    let mut acc = 1i32 << (PRECISION_BITS - 1);
                    for (i, kw) in ky.iter().enumerate() {
                        acc += horizontal[(first + i) * stride + x] as i32 * kw;
                    }
                    out[y * stride + x] = clip8(acc);
                }
            }
            out
        }
        None => horizontal,
    };
    RgbImage::from_raw(win.w, win.h, out).expect("buffer sized for the window")
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// For each output index in `range` (of `0..out_size`): (first input index, count), and `ks`
/// fixed-point weights per output, `ks` apart.
fn coefficients(
    in_size: u32,
    out_size: u32,
    range: Range<usize>,
) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the triangle filter's support is 1
    let ks = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(range.len());
    let mut k = vec![0i32; range.len() * ks];
    let mut w = vec![0f64; ks];
    for (j, xx) in range.enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut total = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(xmax) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            *wx = (1.0 - t.abs()).max(0.0);
            total += *wx;
        }
        for x in 0..xmax {
            let v = if total != 0.0 { w[x] / total } else { w[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            k[j * ks + x] = if v < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    (bounds, k, ks)
}

/// Size after scaling the shorter side to `shorter`, the longer one rounded half up (at most
/// `u32::MAX`: only frames made in memory, millions of pixels long, come near).
fn resized_dims(w: u32, h: u32, shorter: u32) -> (u32, u32) {
    let scale = |long: u32, short: u32| -> u32 {
        ((long as u64 * shorter as u64 * 2 + short as u64) / (2 * short as u64))
            .min(u32::MAX as u64) as u32
    };
    if w <= h {
        (shorter, scale(h, w).max(shorter))
    } else {
        (scale(w, h).max(shorter), shorter)
    }
}

/// Decode + prepare in one step.
pub fn prepare_file(path: &Path, spec: &InputSpec) -> Result<Prepared, BackboneError> {
    Ok(prepare(&decode_file(path)?, spec))
}

/// The "from scratch" baseline's features: the picture squashed to `side × side` RGB, centred
/// (mean removed) and scaled to unit length. What a head on raw pixels sees.
pub fn pixel_features(frame: &RgbFrame, side: u32) -> Vec<f32> {
    let small = image::imageops::resize(&frame.inner, side, side, FilterType::Triangle);
    let v: Vec<f32> = small.as_raw().iter().map(|b| *b as f32 / 255.0).collect();
    let mean = v.iter().sum::<f32>() / v.len().max(1) as f32;
    let centred: Vec<f32> = v.iter().map(|x| x - mean).collect();
    let n = centred.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        centred.iter().map(|x| x / n).collect()
    } else {
        centred
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InputSpec {
        InputSpec {
            name: "input".into(),
            layout: "NCHW".into(),
            channels: "RGB".into(),
            size: 224,
            resize_shorter: 256,
            resize_filter: "bilinear".into(),
            mean: [127.0; 3],
            std: [128.0; 3],
        }
    }

    #[test]
    fn resized_dims_round_half_up_like_the_reference() {
        let cases = [
            ((640, 480), (341, 256)), // 341.33
            ((480, 640), (256, 341)),
            ((451, 300), (385, 256)), // 384.85
            ((300, 300), (256, 256)),
            ((1000, 10), (25600, 256)),
            ((3, 5), (256, 427)), // 426.67
        ];
        for ((w, h), want) in cases {
            assert_eq!(resized_dims(w, h, 256), want, "{w}x{h}");
        }
    }

    #[test]
    fn uniform_colour_normalises_exactly() {
        let frame = RgbFrame::from_raw(300, 260, [255u8, 127, 0].repeat(300 * 260)).unwrap();
        let p = prepare(&frame, &spec());
        let plane = 224 * 224;
        assert_eq!(p.data.len(), 3 * plane);
        assert!(p.data[..plane].iter().all(|v| (*v - 1.0).abs() < 1e-6));
        assert!(p.data[plane..2 * plane].iter().all(|v| v.abs() < 1e-6));
        assert!(p.data[2 * plane..]
            .iter()
            .all(|v| (*v + 127.0 / 128.0).abs() < 1e-6));
    }

    #[test]
    fn crop_is_centred() {
        // 256x300 image: no horizontal resize, rows 0..37 red and the rest blue; the crop
        // starts at row (300-224)/2 = 38, so no red survives.
        let mut raw = Vec::new();
        for y in 0..300 {
            for _ in 0..256 {
                raw.extend_from_slice(if y < 38 { &[255, 0, 0] } else { &[0, 0, 255] });
            }
        }
        let p = prepare(&RgbFrame::from_raw(256, 300, raw).unwrap(), &spec());
        assert!(p.data[..224 * 224].iter().all(|v| *v < 0.0));
    }

    #[test]
    fn truncation_detection_on_a_real_jpeg() {
        let bytes = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/images/dog.jpg"
        ))
        .unwrap();
        assert!(!jpeg_is_truncated(&bytes));
        for cut in [bytes.len() - 2, bytes.len() / 2, 200, 3] {
            assert!(jpeg_is_truncated(&bytes[..cut]), "cut at {cut}");
        }
    }

    #[test]
    fn a_png_palette_of_partial_entries_is_refused_not_a_panic() {
        // `fuzz/run.sh image` found, after 796 825 inputs, a paletted PNG whose PLTE chunk is
        // 40 bytes (13 entries and a third): png 0.18.1 panics in create_rgba_palette ("range
        // end index 3 out of range for slice of length 1"). The fuzzer's file has CRCs that
        // only a fuzzing build ignores; this is the same defect with valid CRCs: a 1x1 picture
        // with a palette of 4 bytes (tests/fixtures-style bytes, written out by zlib.crc32).
        let file: &[u8] = &[
            0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48,
            0x44, 0x52, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x03, 0x00, 0x00,
            0x00, 0x28, 0xcb, 0x34, 0xbb, 0x00, 0x00, 0x00, 0x04, 0x50, 0x4c, 0x54, 0x45, 0xc8,
            0x64, 0x32, 0x07, 0x3b, 0x90, 0xca, 0xbd, 0x00, 0x00, 0x00, 0x0a, 0x49, 0x44, 0x41,
            0x54, 0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01, 0x48, 0xaf, 0xa4,
            0x71, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
        ];
        match decode_bytes(file, Path::new("palette.png")) {
            Err(BackboneError::Decode { path, reason }) => {
                assert_eq!(path, Path::new("palette.png"));
                assert!(
                    reason.contains("PLTE") && reason.contains("4 bytes"),
                    "{reason}"
                );
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
        // The same file with whole entries (PLTE of 3 bytes) passes the check.
        let mut whole = file.to_vec();
        whole[36] = 3;
        assert_eq!(png_bad_palette(&whole), None);
        assert_eq!(png_bad_palette(&file[..36]), None); // cut before the palette's header
    }

    #[test]
    fn resize_matches_pillow_on_a_gradient() {
        // Expected values from Pillow 13.0: src = [(i*37+11) % 256 for i in range(105)];
        // Image.frombytes("RGB", (7, 5), bytes(src)).resize((3, 2), Image.BILINEAR).tobytes()
        let src: Vec<u8> = (0..105u32).map(|i| ((i * 37 + 11) % 256) as u8).collect();
        let frame = RgbFrame::from_raw(7, 5, src).unwrap();
        let out = resize_bilinear(&frame.inner, 3, 2);
        let pillow = [
            113, 97, 134, 154, 131, 111, 134, 169, 128, 93, 115, 152, 131, 108, 129, 152, 149, 83,
        ];
        assert_eq!(out.as_raw().as_slice(), &pillow);
    }

    /// Deterministic pseudo-random pixels.
    fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
        let mut x = seed.wrapping_mul(2654435761) | 1;
        let raw = (0..w * h * 3)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect();
        RgbImage::from_raw(w, h, raw).unwrap()
    }

    #[test]
    fn a_window_of_the_resize_is_that_part_of_the_whole_resize() {
        // (source, resized, window): downscales, upscales, one side unchanged, odd edges.
        let cases = [
            ((7, 5), (3, 2), (1, 0, 2, 2)),
            ((640, 480), (341, 256), (58, 16, 224, 224)),
            ((480, 640), (256, 341), (16, 58, 224, 224)),
            ((451, 300), (385, 256), (80, 16, 224, 224)),
            ((3, 5), (256, 427), (16, 101, 224, 224)),
            ((256, 300), (256, 300), (16, 38, 224, 224)),
            ((1000, 10), (25600, 256), (12688, 16, 224, 224)),
            ((10, 1000), (256, 25600), (16, 12688, 224, 224)),
            ((300, 256), (300, 256), (0, 0, 300, 256)),
            ((97, 13), (40, 60), (39, 59, 1, 1)),
        ];
        for (i, ((w, h), (nw, nh), (x, y, cw, ch))) in cases.into_iter().enumerate() {
            let src = noise(w, h, i as u32);
            let whole = resize_bilinear(&src, nw, nh);
            let win = resize_bilinear_window(&src, nw, nh, Window { x, y, w: cw, h: ch });
            let want = image::imageops::crop_imm(&whole, x, y, cw, ch).to_image();
            assert_eq!(win, want, "{w}x{h} -> {nw}x{nh} at {x},{y}");
        }
    }

    #[test]
    fn extreme_aspect_ratios_prepare_in_small_memory() {
        // Resized whole, 100000 x 1 would be 25600000 x 256 (19.6 GB); the window is 224 x 224.
        for (w, h) in [(100_000, 1), (1, 100_000), (16384, 1)] {
            let frame = RgbFrame {
                inner: noise(w, h, 7),
            };
            let p = prepare(&frame, &spec());
            assert_eq!(p.data.len(), 3 * 224 * 224, "{w}x{h}");
        }
    }

    /// The image crate's own refusals of a size (the words its BMP decoder uses on a 32-bit
    /// target for the 65535² fixture) count as too large; other unsupported features do not.
    #[test]
    fn a_decoders_size_refusal_is_too_large() {
        use image::error::{ImageFormatHint, UnsupportedError, UnsupportedErrorKind};
        let said = |f: &str| {
            UnsupportedError::from_format_and_kind(
                ImageFormatHint::Exact(image::ImageFormat::Bmp),
                UnsupportedErrorKind::GenericFeature(f.into()),
            )
        };
        assert!(claims_too_much(&said(
            "Image dimensions (65535x65535 w/3 channels) are too large"
        )));
        assert!(claims_too_much(&said(
            "Image dimensions (65535, 65535) are too large"
        )));
        assert!(!claims_too_much(&said("RLE4 bitfields")));
    }

    #[test]
    fn pictures_beyond_the_limits_are_refused_from_their_header() {
        let dir = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/hostile"
        ));
        for name in [
            "claims_65535.png",
            "claims_65535.gif",
            "claims_65535.jpg",
            "claims_65535.bmp",
            "claims_65535.tif",
            "huge_20000.png",
            "wide_100000x1.png",
        ] {
            match decode_file(&dir.join(name)) {
                Err(BackboneError::TooLarge { path, reason }) => {
                    assert!(path.ends_with(name), "{path:?}");
                    assert!(reason.contains("16384 px"), "{name}: {reason}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        let wide = decode_file(&dir.join("wide_16384x1.png")).unwrap();
        assert_eq!((wide.width(), wide.height()), (16384, 1));
    }

    #[test]
    fn the_output_buffer_counts_against_the_memory_limit() {
        // 16384 x 16384 is within the side limit; as 16-bit RGBA it needs 2 GiB.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let ihdr = [
            &b"IHDR"[..],
            &16384u32.to_be_bytes(),
            &16384u32.to_be_bytes(),
            &[16, 6, 0, 0, 0],
        ]
        .concat();
        // IHDR, then an IDAT (the decoder reads the header up to the first one) and IEND.
        for (len, chunk) in [
            (13u32, ihdr),
            (2, b"IDAT\x78\x01".to_vec()),
            (0, b"IEND".to_vec()),
        ] {
            png.extend_from_slice(&len.to_be_bytes());
            png.extend_from_slice(&chunk);
            png.extend_from_slice(&crc32(&chunk).to_be_bytes());
        }
        let err = decode_bytes(&png, Path::new("deep.png")).unwrap_err();
        // On a 32-bit target the PNG decoder itself cannot size a 2 GiB buffer and refuses
        // before graft sees the dimensions.
        let named = cfg!(target_pointer_width = "32") || err.to_string().contains("16384x16384");
        assert!(
            matches!(&err, BackboneError::TooLarge { .. }) && named,
            "{err}"
        );
    }

    /// CRC-32 (IEEE), for hand-made PNG chunks.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for b in bytes {
            c ^= *b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    fn touch(root: &Path, files: &[&str]) {
        for f in files {
            let p = root.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
    }

    fn relative(root: &Path, files: Vec<PathBuf>) -> Vec<String> {
        files
            .iter()
            .map(|p| p.strip_prefix(root).unwrap().display().to_string())
            .collect()
    }

    #[test]
    fn the_walk_follows_links_once_and_never_loops() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        touch(
            root,
            &["fish/a.jpg", "fish/b.jpg", "tool/c.jpg", "elsewhere/d.jpg"],
        );
        symlink(".", root.join("fish/self")).unwrap();
        symlink("..", root.join("tool/up")).unwrap();
        symlink("../fish", root.join("tool/fish-again")).unwrap();
        symlink("../elsewhere", root.join("tool/more")).unwrap();
        symlink("nowhere", root.join("tool/broken.jpg")).unwrap();
        symlink("loop", root.join("tool/loop")).unwrap();
        // Each class folder walked on its own, as `train` does: a link up out of it is a loop.
        assert_eq!(
            relative(root, image_files_in(&root.join("fish")).unwrap()),
            ["fish/a.jpg", "fish/b.jpg"]
        );
        assert_eq!(
            relative(root, image_files_in(&root.join("tool")).unwrap()),
            [
                "tool/c.jpg",
                "tool/fish-again/a.jpg",
                "tool/fish-again/b.jpg",
                "tool/more/d.jpg"
            ]
        );
        // From the top, the second way into fish is not walked again.
        assert_eq!(
            relative(root, image_files_in(root).unwrap()),
            ["elsewhere/d.jpg", "fish/a.jpg", "fish/b.jpg", "tool/c.jpg"]
        );
    }

    #[test]
    fn the_walk_skips_what_is_not_a_regular_file() {
        let d = tempfile::tempdir().unwrap();
        touch(d.path(), &["a.jpg"]);
        let fifo = d.path().join("b.jpg");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        assert_eq!(
            relative(d.path(), image_files_in(d.path()).unwrap()),
            ["a.jpg"]
        );
    }

    #[test]
    fn garbage_and_empty_inputs_are_errors_not_panics() {
        let path = Path::new("x.jpg");
        let cases: &[&[u8]] = &[b"", b"not an image", &[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10]];
        for bytes in cases {
            assert!(decode_bytes(bytes, path).is_err());
        }
    }
}
