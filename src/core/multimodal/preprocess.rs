//! A checkpoint's image processor, as Hugging Face's `CLIPImageProcessor` (its PIL backend) runs it:
//! convert to RGB (an image with alpha composited over white, as transformers' `convert_to_rgb` does), resize the shortest edge (or to a fixed size) with the `resample` filter, center-crop,
//! rescale and normalize, into channel-first f32 pixel values. Read from `preprocessor_config.json` as hub
//! checkpoints ship it, or from `processor_config.json`'s `image_processor` as transformers 5 writes it.
use super::resample::{Filter, resize};
use image::{DynamicImage, RgbImage};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{file}: {reason}")]
    Config { file: String, reason: String },
    #[error("the image cannot be decoded ({0}); send PNG, JPEG or WebP")]
    Decode(String),
    #[error("the image is {width}x{height}, past the {max}-pixel limit on either side; send a smaller one")]
    TooLarge { width: u32, height: u32, max: u32 },
}

/// How big an image a client may send: checked from its header, before its pixels are allocated.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_side: u32,
    /// Bytes the decoder may allocate in all.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_side: 8192, max_alloc: 512 << 20 }
    }
}

/// An image's bytes (PNG, JPEG, WebP), decoded within `limits`.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<DynamicImage, ImageError> {
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let (width, height) = reader.into_dimensions().map_err(|e| ImageError::Decode(e.to_string()))?;
    if width > limits.max_side || height > limits.max_side {
        return Err(ImageError::TooLarge { width, height, max: limits.max_side });
    }
    reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(e.to_string()))?;
    let mut bounds = image::Limits::default();
    bounds.max_image_width = Some(limits.max_side);
    bounds.max_image_height = Some(limits.max_side);
    bounds.max_alloc = Some(limits.max_alloc);
    reader.limits(bounds);
    reader.decode().map_err(|e| ImageError::Decode(e.to_string()))
}

/// 8-bit RGB as transformers' `convert_to_rgb` makes it: an image with alpha is composited over opaque white
/// (PIL's `alpha_composite`, in its 7-bit fixed point), grey is spread to three channels.
fn to_rgb(image: &DynamicImage, composite: bool) -> RgbImage {
    if !(composite && image.color().has_alpha()) {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (pixel, target) in rgba.pixels().zip(out.pixels_mut()) {
        let alpha = u32::from(pixel.0[3]);
        let (over, under) = (alpha * 128, (255 - alpha) * 128);
        for channel in 0..3 {
            let sum = u32::from(pixel.0[channel]) * over + 255 * under + (0x80 << 7);
            target.0[channel] = ((((sum >> 8) + sum) >> 8) >> 7) as u8;
        }
    }
    out
}

/// Pixel values in channel-first order: `data[c * height * width + y * width + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelValues {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Size {
    /// The shorter side to this, the other in proportion (truncated, as Python's `int`).
    ShortestEdge(u32),
    Exact {
        height: u32,
        width: u32,
    },
}

/// The steps and their parameters, as the checkpoint's processor config gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    resize: Option<(Size, Filter)>,
    crop: Option<(u32, u32)>,
    rescale: Option<f64>,
    normalize: Option<([f32; 3], [f32; 3])>,
    convert_rgb: bool,
}

impl ImageProcessor {
    /// The processor a model directory ships, `None` where it has none (a text-only model).
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, ImageError> {
        for (file, key) in [("preprocessor_config.json", None), ("processor_config.json", Some("image_processor"))] {
            let path = dir.join(file);
            if !path.exists() {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .map_err(|source| ImageError::Read { path: path.display().to_string(), source })?;
            let bad = |reason: String| ImageError::Config { file: path.display().to_string(), reason };
            let value: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let config = match key {
                Some(key) => match value.get(key) {
                    Some(config) => config.clone(),
                    None => continue,
                },
                None => value,
            };
            return Self::from_config(&config).map(Some).map_err(bad);
        }
        Ok(None)
    }

    /// From the processor's JSON object; every field it uses is checked, and a value it cannot follow is an
    /// error naming the field rather than pixels the model never saw in training.
    pub fn from_config(config: &Value) -> Result<Self, String> {
        if let Some(kind) = config.get("image_processor_type").and_then(Value::as_str) {
            let known = [
                "CLIPImageProcessor",
                "CLIPImageProcessorFast",
                "CLIPImageProcessorPil",
                "SiglipImageProcessor",
                "SiglipImageProcessorFast",
            ];
            if !known.contains(&kind) {
                return Err(format!(
                    "image_processor_type {kind:?} is not one this server runs (CLIP and SigLIP ones are)"
                ));
            }
        }
        let flag = |name: &str, default: bool| -> Result<bool, String> {
            match config.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(format!("{name} must be true or false, not {other}")),
            }
        };
        let number = |name: &str| config.get(name).and_then(Value::as_f64);
        let triple = |name: &str, default: [f32; 3]| -> Result<[f32; 3], String> {
            match config.get(name) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Array(values)) if values.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (slot, v) in out.iter_mut().zip(values) {
                        *slot = v.as_f64().ok_or_else(|| format!("{name} must hold numbers, not {v}"))? as f32;
                    }
                    Ok(out)
                }
                Some(Value::Number(n)) => Ok([n.as_f64().unwrap_or(0.0) as f32; 3]),
                Some(other) => Err(format!("{name} must be three numbers (one per channel), not {other}")),
            }
        };
        let side = |v: &Value, name: &str| -> Result<u32, String> {
            v.as_u64()
                .filter(|&n| (1..=8192).contains(&n))
                .map(|n| n as u32)
                .ok_or_else(|| format!("{name} must be a size from 1 to 8192, not {v}"))
        };
        let resize = if flag("do_resize", true)? {
            let size = match config.get("size") {
                Some(Value::Object(size)) => match (size.get("shortest_edge"), size.get("height"), size.get("width")) {
                    (Some(edge), _, _) => Size::ShortestEdge(side(edge, "size.shortest_edge")?),
                    (None, Some(h), Some(w)) => {
                        Size::Exact { height: side(h, "size.height")?, width: side(w, "size.width")? }
                    }
                    _ => return Err("size must give shortest_edge, or height and width".into()),
                },
                Some(Value::Number(n)) => Size::ShortestEdge(side(&Value::Number(n.clone()), "size")?),
                None => Size::ShortestEdge(224),
                Some(other) => return Err(format!("size must be an object, not {other}")),
            };
            let resample = config.get("resample").and_then(Value::as_u64).unwrap_or(3);
            let filter = Filter::from_pil(resample).ok_or_else(|| {
                format!(
                    "resample {resample} is not a filter this server resizes with (1 lanczos, 2 bilinear, 3 bicubic)"
                )
            })?;
            Some((size, filter))
        } else {
            None
        };
        let crop = if flag("do_center_crop", true)? {
            match config.get("crop_size") {
                Some(Value::Object(crop)) => match (crop.get("height"), crop.get("width")) {
                    (Some(h), Some(w)) => Some((side(h, "crop_size.height")?, side(w, "crop_size.width")?)),
                    _ => return Err("crop_size must give height and width".into()),
                },
                Some(Value::Number(n)) => {
                    let n = side(&Value::Number(n.clone()), "crop_size")?;
                    Some((n, n))
                }
                None => Some((224, 224)),
                Some(other) => return Err(format!("crop_size must be an object, not {other}")),
            }
        } else {
            None
        };
        let rescale = flag("do_rescale", true)?.then(|| number("rescale_factor").unwrap_or(1.0 / 255.0));
        let normalize = if flag("do_normalize", true)? {
            let mean = triple("image_mean", [0.481_454_66, 0.457_827_5, 0.408_210_73])?;
            let std = triple("image_std", [0.268_629_54, 0.261_302_6, 0.275_777_1])?;
            if std.contains(&0.0) {
                return Err("image_std must not hold 0".into());
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Self { resize, crop, rescale, normalize, convert_rgb: flag("do_convert_rgb", true)? })
    }

    /// The pixel values of `image`.
    pub fn preprocess(&self, image: &DynamicImage) -> PixelValues {
        let mut image = to_rgb(image, self.convert_rgb);
        if let Some((size, filter)) = self.resize {
            let (height, width) = output_size(image.height(), image.width(), size);
            image = resize(&image, width, height, filter);
        }
        if let Some((height, width)) = self.crop {
            image = center_crop(&image, height, width);
        }
        let (height, width) = (image.height() as usize, image.width() as usize);
        let mut data = vec![0f32; 3 * height * width];
        for (at, pixel) in image.pixels().enumerate() {
            for channel in 0..3 {
                let mut value = f32::from(pixel.0[channel]);
                if let Some(factor) = self.rescale {
                    // numpy: the uint8 image times the factor in float64, then cast to float32.
                    value = (f64::from(pixel.0[channel]) * factor) as f32;
                }
                if let Some((mean, std)) = self.normalize {
                    value = (value - mean[channel]) / std[channel];
                }
                data[channel * height * width + at] = value;
            }
        }
        PixelValues { height, width, data }
    }
}

/// transformers' `get_resize_output_image_size` with `default_to_square=False` for a shortest edge.
fn output_size(height: u32, width: u32, size: Size) -> (u32, u32) {
    match size {
        Size::Exact { height, width } => (height, width),
        Size::ShortestEdge(edge) => {
            let (short, long) = (height.min(width), height.max(width));
            let long = (u64::from(edge) * u64::from(long) / u64::from(short.max(1))) as u32;
            if height <= width { (edge, long) } else { (long, edge) }
        }
    }
}

/// transformers' `center_crop`: the middle `height` × `width`, the image first padded with zeros (centered)
/// where it is smaller.
fn center_crop(image: &RgbImage, height: u32, width: u32) -> RgbImage {
    let (h, w) = (i64::from(image.height()), i64::from(image.width()));
    let (ch, cw) = (i64::from(height), i64::from(width));
    // Python's floor division, for an image smaller than the crop.
    let top = (h - ch).div_euclid(2);
    let left = (w - cw).div_euclid(2);
    let mut out = RgbImage::new(width, height);
    for y in 0..ch {
        for x in 0..cw {
            let (sy, sx) = (top + y, left + x);
            if (0..h).contains(&sy) && (0..w).contains(&sx) {
                out.put_pixel(x as u32, y as u32, *image.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_config_field_it_cannot_follow_is_an_error_naming_it() {
        let refused = |config: Value| ImageProcessor::from_config(&config).unwrap_err();
        assert!(refused(json!({"resample": 0})).contains("resample 0"));
        assert!(refused(json!({"size": {"longest_edge": 10}})).contains("shortest_edge, or height and width"));
        assert!(refused(json!({"size": {"shortest_edge": 0}})).contains("size.shortest_edge"));
        assert!(refused(json!({"crop_size": {"height": 8}})).contains("crop_size"));
        assert!(refused(json!({"image_mean": [0.5, 0.5]})).contains("image_mean"));
        assert!(refused(json!({"image_std": [0.5, 0.0, 0.5]})).contains("image_std"));
        assert!(refused(json!({"do_resize": "yes"})).contains("do_resize"));
        assert!(
            refused(json!({"image_processor_type": "LlavaNextImageProcessor"})).contains("LlavaNextImageProcessor")
        );
    }

    #[test]
    fn the_config_is_found_where_hub_checkpoints_and_transformers_5_put_it() {
        let dir = std::env::temp_dir().join(format!("dynamo-image-processor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(ImageProcessor::from_dir(&dir).unwrap(), None, "a text-only model has none");
        let config = json!({"size": {"shortest_edge": 4}, "crop_size": {"height": 2, "width": 2}});
        std::fs::write(dir.join("processor_config.json"), json!({"image_processor": config}).to_string()).unwrap();
        let nested = ImageProcessor::from_dir(&dir).unwrap().expect("transformers 5's processor_config.json");
        std::fs::write(dir.join("preprocessor_config.json"), config.to_string()).unwrap();
        assert_eq!(ImageProcessor::from_dir(&dir).unwrap(), Some(nested.clone()), "the hub's file, the same");
        std::fs::write(dir.join("preprocessor_config.json"), "{").unwrap();
        let error = ImageProcessor::from_dir(&dir).unwrap_err().to_string();
        assert!(error.contains("preprocessor_config.json"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
        // 6x4 grey ramp → shortest edge 4 (already) → the middle 2x2, normalized by CLIP's mean and std.
        let image = DynamicImage::ImageLuma8(image::GrayImage::from_fn(6, 4, |x, y| image::Luma([(x * 40 + y) as u8])));
        let pixels = nested.preprocess(&image);
        assert_eq!((pixels.height, pixels.width, pixels.data.len()), (2, 2, 12));
        let expected = ((f64::from(2 * 40 + 1) / 255.0) as f32 - 0.481_454_66) / 0.268_629_54;
        assert_eq!(pixels.data[0], expected, "row 1, column 2 of the red channel");
    }
}
