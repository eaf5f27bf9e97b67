//! Image preprocessing against Hugging Face's own image processors: `testdata/vision_reference.py` runs
//! transformers' CLIPImageProcessor (its PIL backend: transformers, pillow and numpy in a venv under target/,
//! no torch) over images of every kind, and ours must give the same pixel values. SKIPPED without PyPI.
use crate::util::python_venv;
use dynamo::core::multimodal::{DecodeLimits, ImageProcessor, decode};
use serde_json::Value;
use std::path::Path;

#[test]
fn preprocessing_gives_the_pixel_values_of_transformers_image_processor() {
    let venv = match python_venv("vision-venv", &["transformers>=5", "pillow>=13,<14", "numpy"]) {
        Ok(venv) => venv,
        Err(why) => {
            eprintln!("SKIPPED preprocessing_gives_the_pixel_values_of_transformers_image_processor: {why}");
            return;
        }
    };
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("vision-{}", std::process::id()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/vision_reference.py");
    let ran = std::process::Command::new(venv.join("bin/python")).arg(&script).arg(&out).output().expect("python runs");
    assert!(ran.status.success(), "{}", String::from_utf8_lossy(&ran.stderr));
    let manifest: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.len(), 18, "three configs by six images");
    for entry in &manifest {
        let (config, image) = (entry["config"].as_str().unwrap(), entry["image"].as_str().unwrap());
        let processor = ImageProcessor::from_dir(&out.join(config)).unwrap().expect("a processor config");
        let pixels = decode(&std::fs::read(out.join(image)).unwrap(), &DecodeLimits::default()).unwrap();
        let ours = processor.preprocess(&pixels);
        let bytes = std::fs::read(out.join(entry["values"].as_str().unwrap())).unwrap();
        let theirs: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone()).unwrap();
        assert_eq!(vec![3, ours.height, ours.width], shape, "{config} {image}");
        let worst = ours.data.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        if image.ends_with(".jpg") {
            // JPEG decoders differ by a level here and there (IDCT, chroma upsampling); the rest is exact.
            let mean = ours.data.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).sum::<f32>() / theirs.len() as f32;
            assert!(worst <= 4.0 / 255.0 / 0.26 && mean < 0.01, "{config} {image}: worst {worst}, mean {mean}");
        } else {
            assert_eq!(worst, 0.0, "{config} {image}: not the same pixel values (worst difference {worst})");
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn an_image_past_the_limits_or_not_an_image_is_refused_before_its_pixels_are_allocated() {
    // Past the side limit: refused from the header.
    let mut png = Vec::new();
    image::RgbImage::new(12, 9).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let error = decode(&png, &DecodeLimits { max_side: 10, ..DecodeLimits::default() }).unwrap_err().to_string();
    assert!(error.contains("12x9") && error.contains("10-pixel limit"), "{error}");
    // Past the allocation limit: the decoder refuses before it allocates.
    let error = decode(&png, &DecodeLimits { max_side: 100, max_alloc: 64 }).unwrap_err().to_string();
    assert!(error.contains("cannot be decoded"), "{error}");
    assert!(decode(&png, &DecodeLimits::default()).is_ok());
    let error = decode(b"not an image at all", &DecodeLimits::default()).unwrap_err().to_string();
    assert!(error.contains("send PNG, JPEG or WebP"), "{error}");
}
