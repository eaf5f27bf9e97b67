//! Images in: decoding what clients send (PNG, JPEG, WebP, within limits a decompression bomb cannot pass)
//! and turning it into the pixel values a checkpoint's vision tower reads, exactly as its image processor
//! does (`preprocess`, with PIL's resampling in `resample`).
mod preprocess;
mod resample;

pub use preprocess::{DecodeLimits, ImageError, ImageProcessor, PixelValues, decode};
pub use resample::Filter;
