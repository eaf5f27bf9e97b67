//! Images in chat requests: OpenAI's `image_url` parts read (inline `data:` URLs), decoded within limits
//! so a bad or oversized picture is a 400 here rather than a failure on a worker, hashed for prefix caching,
//! and placed at the placeholders the chat template wrote, expanded as the checkpoint's processor does.
use super::error::ApiError;
use crate::core::model::ImageTokens;
use crate::core::multimodal::{DecodeLimits, content_hash, decode, expand_placeholders};
use crate::core::protocol::MediaInput;
use base64::Engine as _;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// What images a request may bring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSettings {
    /// Images one prompt may carry (`--limit-images-per-prompt`).
    pub max_images: usize,
    /// A directory whose files requests may name as `file://` URLs (`--allowed-local-media-path`), resolved
    /// (symlinks followed) when the server starts; `None` refuses every local file.
    pub local_root: Option<PathBuf>,
}

impl MediaSettings {
    /// vLLM's `--limit-mm-per-prompt` defaults higher, but each image costs a tower pass and hundreds of
    /// positions.
    pub const DEFAULT_MAX_IMAGES: usize = 8;
}

impl Default for MediaSettings {
    fn default() -> Self {
        Self { max_images: Self::DEFAULT_MAX_IMAGES, local_root: None }
    }
}
/// Bytes of one image file, after base64 decoding.
pub const MAX_IMAGE_BYTES: usize = 20 << 20;
/// Bytes of a prompt's image files together: each request to a worker carries them, within the request
/// plane's frame limit (`protocol::request::MAX_FRAME_BYTES`) with room for the tokens.
pub const MAX_PROMPT_IMAGE_BYTES: usize = 32 << 20;

/// One image of a request, checked.
pub struct ImagePart {
    data: bytes::Bytes,
    hash: u64,
}

impl ImagePart {
    /// Bytes of its file.
    pub fn size(&self) -> usize {
        self.data.len()
    }
}

/// Reads an `image_url` part (`{"type": "image_url", "image_url": {"url": …}}`, or the url as a string).
pub fn read_image(field: &str, part: &Value, settings: &MediaSettings) -> Result<ImagePart, ApiError> {
    let url = match part.get("image_url") {
        Some(Value::String(url)) => url.as_str(),
        Some(Value::Object(inner)) => inner.get("url").and_then(Value::as_str).unwrap_or_default(),
        _ => "",
    };
    if url.is_empty() {
        return Err(ApiError::invalid(field, "is an image_url part without a `url` string"));
    }
    if let Some(path) = url.strip_prefix("file://") {
        let data = read_local(field, path, settings.local_root.as_deref())?;
        return checked(field, data);
    }
    let Some(inline) = url.strip_prefix("data:") else {
        let scheme = url.split(':').next().unwrap_or_default();
        return Err(ApiError::invalid(
            field,
            format!(
                "has a `{scheme}:` URL; images are taken inline (`data:image/png;base64,…`, or JPEG, WebP) or \
                 as files under --allowed-local-media-path (`file:///…`), not fetched from the network yet"
            ),
        ));
    };
    let Some((header, payload)) = inline.split_once(',') else {
        return Err(ApiError::invalid(field, "is a data: URL without a `,` before its data"));
    };
    if !header.ends_with(";base64") {
        return Err(ApiError::invalid(field, "is a data: URL that is not base64 (`data:image/png;base64,…`)"));
    }
    // Base64 takes 4 characters for 3 bytes: the limit is checked before anything is decoded.
    if payload.len() / 4 * 3 > MAX_IMAGE_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("holds an image of over {} MiB; send a smaller one", MAX_IMAGE_BYTES >> 20),
        ));
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(payload.trim_end())
        .map_err(|e| ApiError::invalid(field, format!("is not valid base64: {e}")))?;
    checked(field, data)
}

/// An image file's bytes, decoded once to check it and to hash its pixels.
fn checked(field: &str, data: Vec<u8>) -> Result<ImagePart, ApiError> {
    let image = decode(&data, &DecodeLimits::default()).map_err(|e| ApiError::invalid(field, e))?;
    Ok(ImagePart { hash: content_hash(&image), data: data.into() })
}

/// A file under `root`, after resolving the path (so neither `..` nor a symlink leads out of it), read
/// only up to the size limit.
fn read_local(field: &str, path: &str, root: Option<&Path>) -> Result<Vec<u8>, ApiError> {
    use std::io::Read as _;
    let Some(root) = root else {
        return Err(ApiError::invalid(
            field,
            "names a local file, and this server reads none: start it with --allowed-local-media-path DIR",
        ));
    };
    let outside = || ApiError::invalid(field, format!("names a file that is not under {}", root.display()));
    let resolved = std::fs::canonicalize(path)
        .map_err(|e| ApiError::invalid(field, format!("names a file that cannot be read: {e}")))?;
    if !resolved.starts_with(root) {
        return Err(outside());
    }
    let file = std::fs::File::open(&resolved).map_err(|e| ApiError::invalid(field, format!("cannot be read: {e}")))?;
    let mut data = Vec::new();
    file.take(MAX_IMAGE_BYTES as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| ApiError::invalid(field, format!("cannot be read: {e}")))?;
    if data.len() > MAX_IMAGE_BYTES {
        return Err(ApiError::invalid(field, format!("is a file of over {} MiB", MAX_IMAGE_BYTES >> 20)));
    }
    Ok(data)
}

/// The prompt with each image's placeholder expanded, and the images where their placeholders are.
pub fn place(
    token_ids: &[u32],
    images: Vec<ImagePart>,
    placeholder: ImageTokens,
) -> Result<(Vec<u32>, Vec<MediaInput>), ApiError> {
    let (ids, runs) = expand_placeholders(token_ids, placeholder.token_id, placeholder.per_image as usize);
    if runs.len() != images.len() {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "hold {} image(s) but the prompt has {} image placeholder(s); an image placeholder in text is \
                 not an image",
                images.len(),
                runs.len()
            ),
        ));
    }
    let media = runs
        .into_iter()
        .zip(images)
        .map(|(run, image)| MediaInput {
            start: run.start as u32,
            end: run.end as u32,
            hash: image.hash,
            data: image.data,
            encoded: None,
        })
        .collect();
    Ok((ids, media))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn png_url() -> String {
        let mut png = Vec::new();
        image::RgbImage::from_pixel(4, 3, image::Rgb([9, 8, 7]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png))
    }

    #[test]
    fn an_inline_image_is_read_and_placed_at_its_placeholder() {
        let part = json!({"type": "image_url", "image_url": {"url": png_url()}});
        let image = read_image("messages[0].content[1]", &part, &MediaSettings::default()).unwrap();
        let hash = image.hash;
        let (ids, media) = place(&[5, 99, 6], vec![image], ImageTokens { token_id: 99, per_image: 3 }).unwrap();
        assert_eq!(ids, vec![5, 99, 99, 99, 6]);
        assert_eq!((media[0].start, media[0].end, media[0].hash), (1, 4, hash));
    }

    #[test]
    fn bad_images_are_refused_naming_the_part() {
        let field = "messages[0].content[1]";
        for (part, says) in [
            (json!({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}), "`https:` URL"),
            (json!({"type": "image_url", "image_url": {}}), "without a `url`"),
            (json!({"type": "image_url", "image_url": "data:image/png,abc"}), "not base64"),
            (json!({"type": "image_url", "image_url": "data:image/png;base64,@@@"}), "not valid base64"),
            (json!({"type": "image_url", "image_url": "data:image/png;base64,aGVsbG8="}), "send PNG, JPEG or WebP"),
        ] {
            let error = read_image(field, &part, &MediaSettings::default()).err().unwrap();
            assert!(error.message.contains(says) && error.message.contains(field), "{part}: {}", error.message);
        }
        let huge = format!("data:image/png;base64,{}", "A".repeat(MAX_IMAGE_BYTES / 3 * 4 + 8));
        let error = read_image(field, &json!({"image_url": huge}), &MediaSettings::default()).err().unwrap();
        assert!(error.message.contains("MiB"), "{}", error.message);
        let image = read_image(field, &json!({"image_url": png_url()}), &MediaSettings::default()).unwrap();
        let error = place(&[99, 99], vec![image], ImageTokens { token_id: 99, per_image: 2 }).err().unwrap();
        assert!(error.message.contains("1 image(s) but the prompt has 2"), "{}", error.message);
    }
}
