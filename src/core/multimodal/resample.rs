//! Resizing as PIL's `Image.resize` does it for 8-bit RGB (its `Resample.c`), which is what a Hugging Face
//! image processor calls: a separable convolution, horizontal pass then vertical, whose kernel widens with
//! the downscale factor (so shrinking averages instead of skipping), with 22-bit fixed-point weights and each
//! pass rounded and clipped to 8 bits. Matching it exactly is what makes the vision tower see the pixels it
//! saw in training; a generic bicubic (Catmull-Rom, no antialiasing) moves them by several levels.
use image::RgbImage;

/// Fractional bits of the fixed-point weights: 32 bits less 8 for the pixel and 2 of headroom.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The filters a processor's `resample` names (PIL's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `resample: 2`.
    Bilinear,
    /// `resample: 3`, CLIP's and most vision towers'.
    Bicubic,
    /// `resample: 1`.
    Lanczos,
}

impl Filter {
    /// PIL's number for it, or `None` for one this does not resize with (nearest, box, hamming).
    pub fn from_pil(number: u64) -> Option<Self> {
        match number {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                // Keys' cubic with a = -0.5, as PIL uses.
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                let sinc =
                    |x: f64| if x == 0.0 { 1.0 } else { (x * std::f64::consts::PI).sin() / (x * std::f64::consts::PI) };
                if x < 3.0 { sinc(x) * sinc(x / 3.0) } else { 0.0 }
            }
        }
    }
}

/// For each output position: the first input position it reads, and its fixed-point weights.
struct Coefficients {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    let (mut first, mut weights) = (Vec::with_capacity(out_size), Vec::with_capacity(out_size));
    for out in 0..out_size {
        let center = (out as f64 + 0.5) * scale;
        // C's casts truncate toward zero; the clamps keep the window inside the input.
        let min = ((center - support + 0.5) as i64).max(0) as usize;
        let max = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
        // Times the reciprocal, not divided by the scale: PIL's rounding, which a weight's last bit can show in.
        let reciprocal = 1.0 / filter_scale;
        let raw: Vec<f64> =
            (min..max.max(min)).map(|at| filter.weight((at as f64 - center + 0.5) * reciprocal)).collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                (if w < 0.0 { scaled - 0.5 } else { scaled + 0.5 }) as i32
            })
            .collect();
        first.push(min);
        weights.push(fixed);
    }
    Coefficients { first, weights }
}

fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `image` resized to `width` × `height` with `filter`, as Pillow (13) does it: horizontal pass first, over
/// only the rows the vertical pass reads, unless the height shrinks by more than twice as many pixels as the
/// width does, then vertical first (earlier Pillows always went horizontal first, which rounds differently
/// for such images).
pub fn resize(image: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if out_w == 0 || out_h == 0 {
        return RgbImage::new(width, height);
    }
    let (need_horizontal, need_vertical) = (in_w != out_w, in_h != out_h);
    let shrink = |from: usize, to: usize| from as i64 - to as i64;
    let horizontal_first = !(shrink(in_h, out_h) > 0 && shrink(in_h, out_h) > shrink(in_w, out_w) * 2);
    let source = image.as_raw();
    let pixels = match (need_horizontal, need_vertical) {
        (false, false) => return image.clone(),
        (true, false) => horizontal(source, in_w, 0..in_h, &coefficients(in_w, out_w, filter)),
        (false, true) => vertical(source, in_w, 0, &coefficients(in_h, out_h, filter)),
        (true, true) if horizontal_first => {
            let down = coefficients(in_h, out_h, filter);
            // Only the rows the vertical pass reads.
            let first = down.first.first().copied().unwrap_or(0);
            let end = (down.first.last().copied().unwrap_or(0) + down.weights.last().map_or(0, Vec::len)).min(in_h);
            let across = horizontal(source, in_w, first..end, &coefficients(in_w, out_w, filter));
            vertical(&across, out_w, first, &down)
        }
        (true, true) => {
            let down = vertical(source, in_w, 0, &coefficients(in_h, out_h, filter));
            horizontal(&down, in_w, 0..out_h, &coefficients(in_w, out_w, filter))
        }
    };
    RgbImage::from_raw(width, height, pixels).unwrap_or_else(|| RgbImage::new(width, height))
}

/// Rows `rows` of an RGB image `width` pixels wide, each resampled to `across.first.len()` pixels.
fn horizontal(source: &[u8], width: usize, rows: std::ops::Range<usize>, across: &Coefficients) -> Vec<u8> {
    let out_w = across.first.len();
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; rows.len() * out_w * 3];
    for (row, source_row) in rows.enumerate() {
        let line = &source[source_row * width * 3..][..width * 3];
        for x in 0..out_w {
            let (start, weights) = (across.first[x], &across.weights[x]);
            for channel in 0..3 {
                let sum = weights
                    .iter()
                    .enumerate()
                    .fold(half, |sum, (i, &w)| sum + i64::from(line[(start + i) * 3 + channel]) * i64::from(w));
                out[(row * out_w + x) * 3 + channel] = clip8(sum);
            }
        }
    }
    out
}

/// An RGB image `width` pixels wide whose row 0 is the source's row `offset`, resampled to `down.first.len()`
/// rows.
fn vertical(source: &[u8], width: usize, offset: usize, down: &Coefficients) -> Vec<u8> {
    let out_h = down.first.len();
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; out_h * width * 3];
    for row in 0..out_h {
        let (start, weights) = (down.first[row] - offset, &down.weights[row]);
        for x in 0..width {
            for channel in 0..3 {
                let sum = weights.iter().enumerate().fold(half, |sum, (i, &w)| {
                    sum + i64::from(source[((start + i) * width + x) * 3 + channel]) * i64::from(w)
                });
                out[(row * width + x) * 3 + channel] = clip8(sum);
            }
        }
    }
    out
}
