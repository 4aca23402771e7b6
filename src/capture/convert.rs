//! Camera pixel formats to packed RGB, exact to the pixel.
//!
//! YUYV and NV12 use ITU-R BT.601 limited range ("video range", what UVC webcams and the
//! Raspberry Pi camera stack deliver) in the same 20-bit fixed point as OpenCV's `cvtColor`, so
//! the results are bit-identical to OpenCV's; `tests/fixtures/frames/make_frames.py` makes the
//! reference buffers with OpenCV and the tests compare every byte. MJPEG frames are decoded by the
//! backbone's JPEG decoder, which fills in the standard Huffman tables that webcams leave out.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::backbone::{preprocess, RgbFrame};

use super::CaptureError;

/// How a camera lays out a frame's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// Motion JPEG: each frame a JPEG (often without Huffman tables).
    Mjpeg,
    /// YUYV 4:2:2, packed `Y0 U Y1 V`.
    Yuyv,
    /// NV12 4:2:0: the Y plane, then interleaved `U V` at half resolution.
    Nv12,
    /// Packed 8-bit RGB.
    Rgb24,
    /// Packed 8-bit BGR.
    Bgr24,
    /// 8-bit grey.
    Gray,
}

impl PixelFormat {
    /// All formats graft converts, in the order a camera is asked for them.
    pub const ALL: [PixelFormat; 6] = [
        PixelFormat::Mjpeg,
        PixelFormat::Yuyv,
        PixelFormat::Nv12,
        PixelFormat::Rgb24,
        PixelFormat::Bgr24,
        PixelFormat::Gray,
    ];

    /// The V4L2 four-character code.
    pub fn fourcc(self) -> &'static str {
        match self {
            PixelFormat::Mjpeg => "MJPG",
            PixelFormat::Yuyv => "YUYV",
            PixelFormat::Nv12 => "NV12",
            PixelFormat::Rgb24 => "RGB3",
            PixelFormat::Bgr24 => "BGR3",
            PixelFormat::Gray => "GREY",
        }
    }

    /// Bytes of an uncompressed `width x height` frame (`None` for MJPEG).
    pub fn frame_len(self, width: u32, height: u32) -> Option<usize> {
        let px = width as usize * height as usize;
        match self {
            PixelFormat::Mjpeg => None,
            PixelFormat::Yuyv => Some(px * 2),
            PixelFormat::Nv12 => {
                Some(px + 2 * (width.div_ceil(2) as usize) * (height.div_ceil(2) as usize))
            }
            PixelFormat::Rgb24 | PixelFormat::Bgr24 => Some(px * 3),
            PixelFormat::Gray => Some(px),
        }
    }
}

impl fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PixelFormat::Mjpeg => "mjpeg",
            PixelFormat::Yuyv => "yuyv",
            PixelFormat::Nv12 => "nv12",
            PixelFormat::Rgb24 => "rgb",
            PixelFormat::Bgr24 => "bgr",
            PixelFormat::Gray => "gray",
        })
    }
}

impl FromStr for PixelFormat {
    type Err = CaptureError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "mjpeg" | "mjpg" | "jpeg" => PixelFormat::Mjpeg,
            "yuyv" | "yuy2" | "yuv422" => PixelFormat::Yuyv,
            "nv12" => PixelFormat::Nv12,
            "rgb" | "rgb24" | "rgb3" => PixelFormat::Rgb24,
            "bgr" | "bgr24" | "bgr3" => PixelFormat::Bgr24,
            "gray" | "grey" | "y8" => PixelFormat::Gray,
            _ => {
                return Err(CaptureError::UnknownFormat {
                    format: s,
                    known: PixelFormat::ALL.iter().map(|f| f.to_string()).collect(),
                })
            }
        })
    }
}

// OpenCV's BT.601 limited-range coefficients, 20-bit fixed point (imgproc/src/color_yuv.simd.hpp).
const SHIFT: i32 = 20;
const CY: i32 = 1_220_542; // 255/219
const CUB: i32 = 2_116_026; // 2.018
const CUG: i32 = -409_993; // -0.391
const CVG: i32 = -852_492; // -0.813
const CVR: i32 = 1_673_527; // 1.596
const HALF: i32 = 1 << (SHIFT - 1);

#[inline]
fn chroma(u: u8, v: u8) -> (i32, i32, i32) {
    let (u, v) = (i32::from(u) - 128, i32::from(v) - 128);
    (HALF + CVR * v, HALF + CVG * v + CUG * u, HALF + CUB * u)
}

#[inline]
fn clamp8(x: i32) -> u8 {
    x.clamp(0, 255) as u8
}

#[inline]
fn put(out: &mut [u8], y: u8, (ruv, guv, buv): (i32, i32, i32)) {
    let y = (i32::from(y) - 16).max(0) * CY;
    out[0] = clamp8((y + ruv) >> SHIFT);
    out[1] = clamp8((y + guv) >> SHIFT);
    out[2] = clamp8((y + buv) >> SHIFT);
}

/// Row stride of a frame whose rows may be padded: `len / rows` when that is at least `min`.
fn stride(
    format: PixelFormat,
    len: usize,
    rows: usize,
    min: usize,
    w: u32,
    h: u32,
) -> Result<usize, CaptureError> {
    if rows > 0 && len >= rows * min && len.is_multiple_of(rows) {
        Ok(len / rows)
    } else if len >= rows * min {
        Ok(min)
    } else {
        Err(CaptureError::FrameSize {
            format,
            width: w,
            height: h,
            expected: rows * min,
            got: len,
        })
    }
}

/// UVC cameras send MJPEG frames without Huffman tables (DHT): the decoder is to use the
/// standard ones (JPEG Annex K.3, as the OpenDML AVI spec says). The JPEG decoder does that for
/// frames marked with an `AVI1` APP0 segment, so a frame without DHT and without that mark gets
/// the mark inserted after its start-of-image marker.
fn with_default_huffman_tables(data: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    use std::borrow::Cow;
    if data.len() < 4 || data[..2] != [0xFF, 0xD8] {
        return Cow::Borrowed(data);
    }
    let mut i = 2;
    while i + 4 <= data.len() && data[i] == 0xFF {
        let marker = data[i + 1];
        let len = usize::from(u16::from_be_bytes([data[i + 2], data[i + 3]]));
        match marker {
            0xC4 => return Cow::Borrowed(data),
            0xE0 if data.get(i + 4..i + 9) == Some(b"AVI1\0") => return Cow::Borrowed(data),
            0xDA => break,
            _ => i += 2 + len,
        }
    }
    let mut out = Vec::with_capacity(data.len() + 9);
    out.extend_from_slice(&data[..2]);
    out.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x07]);
    out.extend_from_slice(b"AVI1\0");
    out.extend_from_slice(&data[2..]);
    Cow::Owned(out)
}

/// Converts one camera frame to packed RGB.
pub fn to_rgb(
    format: PixelFormat,
    width: u32,
    height: u32,
    data: &[u8],
) -> Result<RgbFrame, CaptureError> {
    let (w, h) = (width as usize, height as usize);
    if format != PixelFormat::Mjpeg && (w == 0 || h == 0) {
        return Err(CaptureError::FrameSize {
            format,
            width,
            height,
            expected: 0,
            got: data.len(),
        });
    }
    let mut rgb = vec![0u8; w * h * 3];
    match format {
        PixelFormat::Mjpeg => {
            let data = with_default_huffman_tables(data);
            return preprocess::decode_bytes(&data, Path::new("camera frame")).map_err(|e| {
                CaptureError::Decode {
                    format,
                    reason: e.to_string(),
                }
            });
        }
        PixelFormat::Yuyv => {
            if w % 2 != 0 {
                return Err(CaptureError::FrameSize {
                    format,
                    width,
                    height,
                    expected: (w + 1) * 2 * h,
                    got: data.len(),
                });
            }
            let s = stride(format, data.len(), h, w * 2, width, height)?;
            for (row, out) in data.chunks(s).take(h).zip(rgb.chunks_exact_mut(w * 3)) {
                for (px, o) in row[..w * 2].chunks_exact(4).zip(out.chunks_exact_mut(6)) {
                    let uv = chroma(px[1], px[3]);
                    put(&mut o[..3], px[0], uv);
                    put(&mut o[3..], px[2], uv);
                }
            }
        }
        PixelFormat::Nv12 => {
            let cw = w.div_ceil(2) * 2;
            let rows = h + h.div_ceil(2);
            if w % 2 != 0 || h % 2 != 0 {
                return Err(CaptureError::FrameSize {
                    format,
                    width,
                    height,
                    expected: cw * rows,
                    got: data.len(),
                });
            }
            let s = stride(format, data.len(), rows, w, width, height)?;
            let (ys, uvs) = data.split_at(s * h);
            for (r, out) in rgb.chunks_exact_mut(w * 3).enumerate() {
                let yrow = &ys[r * s..r * s + w];
                let uvrow = &uvs[(r / 2) * s..(r / 2) * s + w];
                for (x, o) in out.chunks_exact_mut(3).enumerate() {
                    let c = x & !1;
                    put(o, yrow[x], chroma(uvrow[c], uvrow[c + 1]));
                }
            }
        }
        PixelFormat::Rgb24 | PixelFormat::Bgr24 => {
            let s = stride(format, data.len(), h, w * 3, width, height)?;
            for (row, out) in data.chunks(s).take(h).zip(rgb.chunks_exact_mut(w * 3)) {
                out.copy_from_slice(&row[..w * 3]);
                if format == PixelFormat::Bgr24 {
                    for px in out.chunks_exact_mut(3) {
                        px.swap(0, 2);
                    }
                }
            }
        }
        PixelFormat::Gray => {
            let s = stride(format, data.len(), h, w, width, height)?;
            for (row, out) in data.chunks(s).take(h).zip(rgb.chunks_exact_mut(w * 3)) {
                for (g, o) in row[..w].iter().zip(out.chunks_exact_mut(3)) {
                    o.fill(*g);
                }
            }
        }
    }
    RgbFrame::from_raw(width, height, rgb).ok_or(CaptureError::FrameSize {
        format,
        width,
        height,
        expected: w * h * 3,
        got: data.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limited_range_black_white_and_primaries() {
        type Yuv = (u8, u8, u8);
        let cases: &[(Yuv, [u8; 3])] = &[
            ((16, 128, 128), [0, 0, 0]),
            ((235, 128, 128), [255, 255, 255]),
            ((0, 128, 128), [0, 0, 0]), // below black clamps
            ((126, 128, 128), [128, 128, 128]),
        ];
        for &((y, u, v), want) in cases {
            let frame = to_rgb(PixelFormat::Yuyv, 2, 1, &[y, u, y, v]).unwrap();
            assert_eq!(&frame.as_raw()[..3], &want, "Y={y} U={u} V={v}");
            assert_eq!(&frame.as_raw()[3..], &want);
        }
    }

    #[test]
    fn short_and_odd_frames_are_errors_not_panics() {
        assert!(to_rgb(PixelFormat::Yuyv, 4, 2, &[0; 15]).is_err());
        assert!(to_rgb(PixelFormat::Yuyv, 3, 2, &[0; 12]).is_err());
        assert!(to_rgb(PixelFormat::Nv12, 4, 2, &[0; 11]).is_err());
        assert!(to_rgb(PixelFormat::Rgb24, 0, 2, &[]).is_err());
        assert!(to_rgb(PixelFormat::Mjpeg, 4, 2, &[0xFF, 0xD8, 0]).is_err());
        assert!(to_rgb(PixelFormat::Gray, 4, 2, &[9; 8]).is_ok());
    }

    #[test]
    fn padded_rows_use_the_stride() {
        // 2x2 grey frame with rows padded to 4 bytes.
        let f = to_rgb(PixelFormat::Gray, 2, 2, &[1, 2, 0, 0, 3, 4, 0, 0]).unwrap();
        assert_eq!(f.as_raw(), &[1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]);
        let f = to_rgb(PixelFormat::Bgr24, 1, 1, &[1, 2, 3]).unwrap();
        assert_eq!(f.as_raw(), &[3, 2, 1]);
    }

    #[test]
    fn format_names_parse() {
        for f in PixelFormat::ALL {
            assert_eq!(f.to_string().parse::<PixelFormat>().unwrap(), f);
            assert_eq!(f.fourcc().parse::<PixelFormat>().unwrap(), f);
        }
        assert!("h264".parse::<PixelFormat>().is_err());
    }
}
