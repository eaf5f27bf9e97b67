//! Images in: decoding what clients send (PNG, JPEG, WebP, within limits a decompression bomb cannot pass)
//! and turning it into the pixel values a checkpoint's vision tower reads, exactly as its image processor
//! does (`preprocess`, with PIL's resampling in `resample`); and an image's identity for prefix caching
//! (`content_hash`, what `tokens::MediaSpan` folds into the blocks that hold its placeholders); and a worker's
//! cache of images' embeddings (`EmbeddingCache`).
mod embeddings;
mod preprocess;
mod resample;

pub use embeddings::{EMBEDDINGS_CACHE_BYTES, EmbeddingCache};
pub use preprocess::{DecodeLimits, ImageError, ImageProcessor, PixelValues, decode};
pub use resample::Filter;
use std::ops::Range;

/// An image's identity: xxh3-64 of its width, height and 8-bit RGB pixels (after decoding, so the same
/// picture sent as PNG or WebP is one image, and before preprocessing, which a model may change).
pub fn content_hash(image: &image::DynamicImage) -> u64 {
    let rgb = image.to_rgb8();
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&rgb.width().to_le_bytes());
    hasher.update(&rgb.height().to_le_bytes());
    hasher.update(rgb.as_raw());
    hasher.digest()
}

/// The prompt with each image's placeholder token repeated `per_image` times, as transformers' processors
/// expand it (one `<image>` in the text, one embedding per position in the model), and where each image's
/// run of placeholders lies.
pub fn expand_placeholders(ids: &[u32], image_token: u32, per_image: usize) -> (Vec<u32>, Vec<Range<usize>>) {
    let images = ids.iter().filter(|&&id| id == image_token).count();
    let mut expanded = Vec::with_capacity(ids.len() + images * per_image.saturating_sub(1));
    let mut runs = Vec::with_capacity(images);
    for &id in ids {
        if id == image_token {
            runs.push(expanded.len()..expanded.len() + per_image);
            expanded.extend(std::iter::repeat_n(image_token, per_image));
        } else {
            expanded.push(id);
        }
    }
    (expanded, runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tokens::{MediaSpan, block_hashes_with_media};
    use image::{DynamicImage, ImageFormat, RgbImage};

    #[test]
    fn an_images_hash_is_its_pixels_and_shape_whatever_its_encoding_and_it_keeps_prefixes_apart() {
        let pixels = RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let image = DynamicImage::ImageRgb8(pixels.clone());
        let encoded = |format| {
            let mut bytes = Vec::new();
            image.write_to(&mut std::io::Cursor::new(&mut bytes), format).unwrap();
            decode(&bytes, &DecodeLimits::default()).unwrap()
        };
        let hash = content_hash(&image);
        assert_eq!(content_hash(&encoded(ImageFormat::Png)), hash, "decoded from PNG, the same image");
        assert_eq!(content_hash(&encoded(ImageFormat::WebP)), hash, "and from lossless WebP");
        let mut other = pixels.clone();
        other.put_pixel(5, 3, image::Rgb([0, 0, 0]));
        assert_ne!(content_hash(&DynamicImage::ImageRgb8(other)), hash, "one pixel differs");
        let transposed = RgbImage::from_raw(4, 6, pixels.into_raw()).unwrap();
        assert_ne!(content_hash(&DynamicImage::ImageRgb8(transposed)), hash, "the same bytes in another shape");
        // Two prompts with the same placeholder tokens: the blocks before the image are shared, the ones that
        // hold its placeholders (and everything after) are not.
        let prompt: Vec<u32> = (0..64).map(|i| if (20..40).contains(&i) { 9 } else { i }).collect();
        let with = |hash| block_hashes_with_media(&prompt, 16, &[MediaSpan { start: 20, end: 40, hash }]);
        let (a, b) = (with(hash), with(hash ^ 1));
        assert_eq!(a[0], b[0]);
        assert!(a[1..].iter().zip(&b[1..]).all(|(x, y)| x.sequence != y.sequence));
        assert_eq!(with(hash), a, "the same image, the same blocks");
    }

    #[test]
    fn each_placeholder_becomes_a_run_of_them() {
        let (ids, runs) = expand_placeholders(&[1, 9, 2, 9], 9, 3);
        assert_eq!(ids, vec![1, 9, 9, 9, 2, 9, 9, 9]);
        assert_eq!(runs, vec![1..4, 5..8]);
        assert_eq!(expand_placeholders(&[1, 2], 9, 3), (vec![1, 2], vec![]));
    }
}
