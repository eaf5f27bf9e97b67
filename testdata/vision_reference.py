"""Pixel values from Hugging Face's own image processors, for tests/integration/vision.rs to compare with.

Writes, under the directory given: test images (PNG RGB, RGBA and grey, an upscaled small one, lossless WebP,
JPEG), one directory per processor config holding its preprocessor_config.json, each image's pixel values
as little-endian float32 (`<config>-<image>.f32`), and manifest.json listing them with their shapes.
Needs transformers, pillow and numpy; no torch (transformers then runs the processors' PIL backend).
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoImageProcessor

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(7)


def noise(height, width, channels):
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def smooth(height, width):
    y, x = np.mgrid[0:height, 0:width]
    planes = [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * 3 + y * 5) % 256]
    return np.stack(planes, -1).astype(np.uint8)


images = {
    "wide.png": (Image.fromarray(noise(300, 517, 3)), {}),
    "tall-rgba.png": (Image.fromarray(noise(641, 211, 4), "RGBA"), {}),
    "grey.png": (Image.fromarray(noise(120, 90, 1)[:, :, 0], "L"), {}),
    "small.png": (Image.fromarray(smooth(50, 70)), {}),
    "lossless.webp": (Image.fromarray(smooth(400, 333)), {"lossless": True}),
    "photo.jpg": (Image.fromarray(smooth(480, 640)), {"quality": 92}),
}
for name, (image, options) in images.items():
    image.save(out / name, **options)

clip = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 336},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 336, "width": 336},
    "do_rescale": True,
    "rescale_factor": 0.00392156862745098,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.2613026, 0.2757771],
    "do_convert_rgb": True,
}
configs = {
    "clip-336": clip,
    "bilinear-64": dict(clip, size={"shortest_edge": 64}, resample=2, crop_size={"height": 56, "width": 48}),
    "exact-384": dict(clip, size={"height": 384, "width": 384}, do_center_crop=False,
                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]),
}
manifest = []
for config_name, config in configs.items():
    directory = out / config_name
    directory.mkdir(exist_ok=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(config))
    processor = AutoImageProcessor.from_pretrained(directory)
    for image_name in images:
        with Image.open(out / image_name) as image:
            values = processor(images=image, return_tensors="np")["pixel_values"][0]
        file = f"{config_name}-{image_name}.f32"
        values.astype("<f4").tofile(out / file)
        manifest.append({"config": config_name, "image": image_name, "values": file, "shape": list(values.shape),
                         "processor": type(processor).__name__})
(out / "manifest.json").write_text(json.dumps(manifest, indent=1))
