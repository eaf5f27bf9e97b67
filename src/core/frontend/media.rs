//! Images in chat requests: OpenAI's `image_url` parts read (inline `data:` URLs, `http(s)` URLs fetched
//! before the request is preprocessed, local files under an allowed directory), decoded within limits so a
//! bad or oversized picture is a 400 here rather than a failure on a worker, hashed for prefix caching, and
//! placed at the placeholders the chat template wrote, expanded as the checkpoint's processor does.
use super::error::ApiError;
use crate::core::model::ImageTokens;
use crate::core::multimodal::{DecodeLimits, content_hash, decode, expand_placeholders};
use crate::core::protocol::MediaInput;
use base64::Engine as _;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What images a request may bring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSettings {
    /// Images one prompt may carry (`--limit-images-per-prompt`).
    pub max_images: usize,
    /// A directory whose files requests may name as `file://` URLs (`--allowed-local-media-path`), resolved
    /// (symlinks followed) when the server starts; `None` refuses every local file.
    pub local_root: Option<PathBuf>,
    /// The hosts `http(s)` image URLs may name (`--allowed-media-domains`), redirects included; `None`
    /// fetches from any.
    pub allowed_domains: Option<Vec<String>>,
    /// How long fetching one image may take, redirects included (`--media-fetch-timeout`).
    pub fetch_timeout: Duration,
}

impl MediaSettings {
    /// vLLM's `--limit-mm-per-prompt` defaults higher, but each image costs a tower pass and hundreds of
    /// positions.
    pub const DEFAULT_MAX_IMAGES: usize = 8;
    /// vLLM's default (`VLLM_IMAGE_FETCH_TIMEOUT`).
    pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

    /// Whether an image URL may be fetched from `url`'s host.
    fn allows(&self, url: &reqwest::Url) -> Result<(), String> {
        let Some(allowed) = &self.allowed_domains else { return Ok(()) };
        let host = url.host_str().unwrap_or_default();
        match allowed.iter().any(|domain| domain.eq_ignore_ascii_case(host)) {
            true => Ok(()),
            false => Err(format!("{host} is not one of --allowed-media-domains")),
        }
    }

    /// The client that fetches images: redirects followed only to allowed hosts, a few at most.
    pub fn client(&self) -> Result<reqwest::Client, String> {
        let settings = self.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match settings.allows(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(why) => {
                    let to = attempt.url().to_string();
                    attempt.error(format!("redirected to {to}: {why}"))
                }
            }
        });
        reqwest::Client::builder()
            .redirect(redirects)
            .user_agent(concat!("dynamo/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("no HTTP client: {e}"))
    }
}

const MAX_REDIRECTS: usize = 5;

impl Default for MediaSettings {
    fn default() -> Self {
        Self {
            max_images: Self::DEFAULT_MAX_IMAGES,
            local_root: None,
            allowed_domains: None,
            fetch_timeout: Self::DEFAULT_FETCH_TIMEOUT,
        }
    }
}

/// One request's images fetched from `http(s)` URLs before it is preprocessed, by URL: the file, or why not.
#[derive(Debug, Default)]
pub struct Fetched(HashMap<String, Result<bytes::Bytes, String>>);

/// Fetches `urls` (a chat request's, from `remote_images`) all at once, each within the size limit and the
/// timeout.
pub async fn fetch_images(
    urls: Vec<String>,
    settings: &MediaSettings,
    client: &Result<reqwest::Client, String>,
) -> Fetched {
    let fetches = urls.into_iter().map(|url| async move {
        let fetched = match client {
            Ok(client) => fetch(&url, settings, client).await,
            Err(why) => Err(why.clone()),
        };
        (url, fetched)
    });
    Fetched(futures::future::join_all(fetches).await.into_iter().collect())
}

/// Whether a request body may name a URL at all: a byte search (SIMD), cheap enough for every request.
pub fn names_urls(body: &[u8]) -> bool {
    memchr::memmem::find(body, b"://").is_some()
}

/// What a chat body asks to be fetched: the model it names, and the distinct `http(s)` URLs of its
/// `image_url` parts, in order, at most `limit`. `None` for a body that names no URL or does not parse
/// (preprocessing then says what is wrong with it).
#[derive(Debug, PartialEq)]
pub struct RemoteImages {
    pub model: Option<String>,
    pub urls: Vec<String>,
}

pub fn remote_images(body: &[u8], limit: usize) -> Option<RemoteImages> {
    if !names_urls(body) {
        return None;
    }
    let value = serde_json::from_slice::<Value>(body).ok()?;
    let parts = value["messages"].as_array().into_iter().flatten().flat_map(|m| m["content"].as_array()).flatten();
    let mut urls: Vec<String> = Vec::new();
    for part in parts.filter(|part| part["type"] == "image_url") {
        let url = image_url(part);
        if is_remote(url) && !urls.iter().any(|u| u == url) && urls.len() < limit {
            urls.push(url.to_string());
        }
    }
    Some(RemoteImages { model: value["model"].as_str().map(String::from), urls })
}

fn is_remote(url: &str) -> bool {
    let scheme = url.split_once(':').map_or("", |(scheme, _)| scheme);
    scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https")
}

async fn fetch(url: &str, settings: &MediaSettings, client: &reqwest::Client) -> Result<bytes::Bytes, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("is not a valid URL ({e})"))?;
    settings.allows(&parsed)?;
    let too_big = || format!("is an image of over {} MiB", MAX_IMAGE_BYTES >> 20);
    let download = async {
        let mut response = client.get(parsed).send().await.map_err(|e| error_chain(&e))?;
        if !response.status().is_success() {
            return Err(format!("was answered {}", response.status()));
        }
        if response.content_length().is_some_and(|len| len > MAX_IMAGE_BYTES as u64) {
            return Err(too_big());
        }
        let mut data = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| error_chain(&e))? {
            if data.len() + chunk.len() > MAX_IMAGE_BYTES {
                return Err(too_big());
            }
            data.extend_from_slice(&chunk);
        }
        Ok(bytes::Bytes::from(data))
    };
    let timeout = settings.fetch_timeout;
    tokio::time::timeout(timeout, download)
        .await
        .map_err(|_| format!("took longer than {timeout:?} to fetch (--media-fetch-timeout)"))?
}

/// An error and its causes, as one line (reqwest's own message names only the outermost).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// The URL of an `image_url` part (`{"image_url": {"url": …}}`, or the url as a string); empty if none.
fn image_url(part: &Value) -> &str {
    match part.get("image_url") {
        Some(Value::String(url)) => url.as_str(),
        Some(Value::Object(inner)) => inner.get("url").and_then(Value::as_str).unwrap_or_default(),
        _ => "",
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

/// Reads an `image_url` part (`{"type": "image_url", "image_url": {"url": …}}`, or the url as a string);
/// an `http(s)` one from what `fetch_images` fetched for the request.
pub fn read_image(
    field: &str,
    part: &Value,
    settings: &MediaSettings,
    fetched: &Fetched,
) -> Result<ImagePart, ApiError> {
    let url = image_url(part);
    if url.is_empty() {
        return Err(ApiError::invalid(field, "is an image_url part without a `url` string"));
    }
    if let Some(path) = url.strip_prefix("file://") {
        let data = read_local(field, path, settings.local_root.as_deref())?;
        return checked(field, data.into());
    }
    if is_remote(url) {
        return match fetched.0.get(url) {
            Some(Ok(data)) => checked(field, data.clone()),
            Some(Err(why)) => Err(ApiError::invalid(field, format!("has a URL that could not be used: {url} {why}"))),
            None => Err(ApiError::invalid(field, format!("has a URL that was not fetched: {url}"))),
        };
    }
    let Some(inline) = url.strip_prefix("data:") else {
        let scheme = url.split(':').next().unwrap_or_default();
        return Err(ApiError::invalid(
            field,
            format!(
                "has a `{scheme}:` URL; images are taken inline (`data:image/png;base64,…`, or JPEG, WebP), \
                 from http(s) URLs, or as files under --allowed-local-media-path (`file:///…`)"
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
    checked(field, data.into())
}

/// An image file's bytes, decoded once to check it and to hash its pixels.
fn checked(field: &str, data: bytes::Bytes) -> Result<ImagePart, ApiError> {
    let image = decode(&data, &DecodeLimits::default()).map_err(|e| ApiError::invalid(field, e))?;
    Ok(ImagePart { hash: content_hash(&image), data })
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

    fn png() -> Vec<u8> {
        let mut png = Vec::new();
        image::RgbImage::from_pixel(4, 3, image::Rgb([9, 8, 7]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png
    }

    fn png_url() -> String {
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png()))
    }

    /// A web server on loopback: a picture, a redirect to it (and one to `localhost`), a 404, a file past
    /// the size limit, and a picture that takes a second. Its base URL.
    async fn image_server() -> String {
        use axum::response::{IntoResponse, Redirect};
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/a.png", get(|| async { png() }))
            .route("/moved", get(|| async { Redirect::temporary("/a.png") }))
            .route(
                "/elsewhere",
                get(move || async move { Redirect::temporary(&format!("http://localhost:{port}/a.png")) }),
            )
            .route("/huge", get(|| async { vec![0u8; MAX_IMAGE_BYTES + 1] }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    png().into_response()
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://127.0.0.1:{port}")
    }

    /// A chat body with these image URLs.
    fn body(urls: &[String]) -> Vec<u8> {
        let parts: Vec<Value> =
            urls.iter().map(|url| json!({"type": "image_url", "image_url": {"url": url}})).collect();
        serde_json::to_vec(&json!({"model": "m", "messages": [{"role": "user", "content": parts}]})).unwrap()
    }

    #[tokio::test]
    async fn image_urls_are_fetched_within_the_limits_and_only_from_allowed_hosts() {
        let base = image_server().await;
        let url = |path: &str| format!("{base}{path}");
        let settings = MediaSettings { fetch_timeout: Duration::from_millis(300), ..MediaSettings::default() };
        let fetch = |urls: &[String], settings: &MediaSettings| {
            let urls = remote_images(&body(urls), 8).expect("a body with URLs").urls;
            let (settings, client) = (settings.clone(), settings.client());
            async move { fetch_images(urls, &settings, &client).await }
        };
        let fetched = fetch(&[url("/a.png"), url("/moved")], &settings).await;
        let field = "messages[0].content[0]";
        let read = |fetched: &Fetched, path: &str| {
            let part = json!({"type": "image_url", "image_url": {"url": url(path)}});
            read_image(field, &part, &MediaSettings::default(), fetched).map(|image| image.hash).map_err(|e| e.message)
        };
        let inline = read_image(field, &json!({"image_url": png_url()}), &settings, &Fetched::default()).unwrap();
        assert_eq!(read(&fetched, "/a.png"), Ok(inline.hash), "the same picture as sent inline");
        assert_eq!(read(&fetched, "/moved"), Ok(inline.hash), "redirects are followed");

        let failing = [url("/missing"), url("/huge"), url("/slow"), "http://[::1".to_string()];
        let fetched = fetch(&failing, &settings).await;
        for (path, says) in [("/missing", "404"), ("/huge", "over 20 MiB"), ("/slow", "took longer than 300ms")] {
            let error = read(&fetched, path).unwrap_err();
            assert!(error.contains(says) && error.contains(field) && error.contains(path), "{path}: {error}");
        }

        // Restricted to 127.0.0.1: a URL on another host, or redirected to one, is not fetched.
        let settings = MediaSettings { allowed_domains: Some(vec!["127.0.0.1".into()]), ..settings };
        let urls = [url("/a.png"), url("/elsewhere"), "http://example.invalid/a.png".to_string()];
        let fetched = fetch(&urls, &settings).await;
        assert_eq!(read(&fetched, "/a.png"), Ok(inline.hash));
        let error = read(&fetched, "/elsewhere").unwrap_err();
        assert!(
            error.contains("redirected to http://localhost") && error.contains("--allowed-media-domains"),
            "{error}"
        );
        let part = json!({"type": "image_url", "image_url": {"url": "http://example.invalid/a.png"}});
        let error = read_image(field, &part, &settings, &fetched).err().unwrap().message;
        assert!(error.contains("example.invalid is not one of --allowed-media-domains"), "{error}");
    }

    #[test]
    fn only_the_image_urls_a_prompt_may_carry_are_fetched_once_each() {
        let urls: Vec<String> = ["http://a/1", "https://a/2", "http://a/1", "data:image/png;base64,AA", "HTTP://a/3"]
            .map(String::from)
            .to_vec();
        let found = remote_images(&body(&urls), 8).unwrap();
        assert_eq!(found.urls, ["http://a/1", "https://a/2", "HTTP://a/3"]);
        assert_eq!(found.model.as_deref(), Some("m"));
        assert_eq!(
            remote_images(&body(&urls), 2).unwrap().urls,
            ["http://a/1", "https://a/2"],
            "no more than the limit"
        );
        assert_eq!(remote_images(b"{not json but http://a/1", 8), None);
        assert_eq!(remote_images(&body(&["data:image/png;base64,AA".into()]), 8), None, "no URL: not even parsed");
    }

    #[test]
    fn an_inline_image_is_read_and_placed_at_its_placeholder() {
        let part = json!({"type": "image_url", "image_url": {"url": png_url()}});
        let image =
            read_image("messages[0].content[1]", &part, &MediaSettings::default(), &Fetched::default()).unwrap();
        let hash = image.hash;
        let (ids, media) = place(&[5, 99, 6], vec![image], ImageTokens { token_id: 99, per_image: 3 }).unwrap();
        assert_eq!(ids, vec![5, 99, 99, 99, 6]);
        assert_eq!((media[0].start, media[0].end, media[0].hash), (1, 4, hash));
    }

    #[test]
    fn bad_images_are_refused_naming_the_part() {
        let field = "messages[0].content[1]";
        for (part, says) in [
            (json!({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}), "was not fetched"),
            (json!({"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}), "`ftp:` URL"),
            (json!({"type": "image_url", "image_url": {}}), "without a `url`"),
            (json!({"type": "image_url", "image_url": "data:image/png,abc"}), "not base64"),
            (json!({"type": "image_url", "image_url": "data:image/png;base64,@@@"}), "not valid base64"),
            (json!({"type": "image_url", "image_url": "data:image/png;base64,aGVsbG8="}), "send PNG, JPEG or WebP"),
        ] {
            let error = read_image(field, &part, &MediaSettings::default(), &Fetched::default()).err().unwrap();
            assert!(error.message.contains(says) && error.message.contains(field), "{part}: {}", error.message);
        }
        let huge = format!("data:image/png;base64,{}", "A".repeat(MAX_IMAGE_BYTES / 3 * 4 + 8));
        let error = read_image(field, &json!({"image_url": huge}), &MediaSettings::default(), &Fetched::default())
            .err()
            .unwrap();
        assert!(error.message.contains("MiB"), "{}", error.message);
        let image = read_image(field, &json!({"image_url": png_url()}), &MediaSettings::default(), &Fetched::default())
            .unwrap();
        let error = place(&[99, 99], vec![image], ImageTokens { token_id: 99, per_image: 2 }).err().unwrap();
        assert!(error.message.contains("1 image(s) but the prompt has 2"), "{}", error.message);
    }
}
