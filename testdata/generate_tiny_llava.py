#!/usr/bin/env python3
"""Generates the tiny LLaVA checkpoints the built-in engine's vision path is tested against, with HF
transformers (LlavaForConditionalGeneration, LlavaProcessor) as the independent implementation. Needs torch,
transformers, pillow, numpy (only to regenerate; CI never runs this):

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch 'transformers>=5' safetensors tokenizers 'pillow>=13,<14' numpy
    /tmp/hf/bin/python testdata/generate_tiny_llava.py

Writes
- tiny-llava/: a LLaVA-1.5-shaped checkpoint (CLIP vision tower with quick_gelu, the second-to-last layer's
  patch features, a gelu projector, a Llama language model) in f32, in transformers 5's tensor names, with
  tiny-chat's tokenizer plus an `<image>` token, a chat template that places images, preprocessor_config.json
  as hub checkpoints ship it, two image files, and golden.json;
- golden/llava-full/: the variants: bf16 weights under the hub's older tensor names (`language_model.model.…`),
  the `full` feature strategy over two concatenated layers, gelu in the tower, a Qwen2 language model with a
  tied head, and the image processor in transformers 5's processor_config.json.

golden.json holds, per case: the prompt's ids as LlavaProcessor expands them, the image files, the projected
image features, the logits at the last prompt position, and 12 greedy tokens, all computed in f32.
"""
import json
import pathlib
import shutil
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
)

HERE = pathlib.Path(__file__).resolve().parent
TINY_CHAT = HERE / "tiny-chat"
GREEDY_TOKENS = 12
QUESTION = "What is in the picture?"

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' %}{{- '<image>\\n' }}"
    "{%- elif part.type == 'text' %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def images(out):
    """Two small picture files, written where the checkpoint is: a wide RGB PNG and a tall RGBA PNG."""
    y, x = np.mgrid[0:48, 0:64]
    wide = np.stack([x * 4, y * 5, (x * y) % 256], -1).astype(np.uint8)
    Image.fromarray(wide).save(out / "wide.png")
    rng = np.random.default_rng(3)
    tall = rng.integers(0, 256, (57, 41, 4), dtype=np.uint8)
    Image.fromarray(tall, "RGBA").save(out / "tall-rgba.png")
    return ["wide.png", "tall-rgba.png"]


def tokenizer_files(out):
    tok = Tokenizer.from_file(str(TINY_CHAT / "tokenizer.json"))
    tok.add_special_tokens(["<image>"])
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((TINY_CHAT / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config["added_tokens_decoder"][str(tok.token_to_id("<image>"))] = {"content": "<image>", "special": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(TINY_CHAT / "generation_config.json", out / "generation_config.json")
    return tok


def image_processor(size):
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,
        do_center_crop=True,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


def randomize(model, std):
    """Random weights large enough that greedy choices are not near-ties (the default 0.02 makes logits flat)."""
    torch.manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.1)
            else:
                p.normal_(0, std)


def build(out, config, std, bf16, old_names, processor_file):
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_files(out)
    files = images(out)
    model = LlavaForConditionalGeneration(config).float().eval()
    randomize(model, std)
    if bf16:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    if old_names:
        renamed = {}
        for k, v in state.items():
            k = k.replace("model.language_model.", "language_model.model.", 1)
            k = k.replace("lm_head.", "language_model.lm_head.", 1)
            k = k.replace("model.vision_tower.", "vision_tower.vision_model.", 1)
            k = k.replace("model.multi_modal_projector.", "multi_modal_projector.", 1)
            renamed[k] = v
        state = renamed
    if bf16:
        state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)

    size = config.vision_config.image_size
    processor_obj = image_processor(size)
    if processor_file == "preprocessor_config.json":
        processor_obj.save_pretrained(out)
    else:
        (out / "processor_config.json").write_text(
            json.dumps({"image_processor": processor_obj.to_dict(), "processor_class": "LlavaProcessor"}, indent=2)
        )
    hf_tok = AutoTokenizer.from_pretrained(out)
    processor = LlavaProcessor(
        image_processor=processor_obj,
        tokenizer=hf_tok,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token, as llava-hf's processors say
        chat_template=CHAT_TEMPLATE,
    )

    cases = []
    for image_files in [[files[0]], [files[0], files[1]]]:
        content = [{"type": "image"} for _ in image_files] + [{"type": "text", "text": QUESTION}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        pictures = [Image.open(out / f) for f in image_files]
        inputs = processor(images=pictures, text=text, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        with torch.no_grad():
            features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            features = torch.cat(list(features), 0) if isinstance(features, (list, tuple)) else features
            logits = model(**inputs).logits[0, -1]
            tokens = list(ids)
            for _ in range(GREEDY_TOKENS):
                step = model(input_ids=torch.tensor([tokens]), pixel_values=inputs["pixel_values"]).logits[0, -1]
                top = torch.topk(step, 2).values
                assert top[0] - top[1] > 1e-3, f"near-tie in greedy decoding: {top.tolist()}"
                tokens.append(int(step.argmax()))
        greedy = tokens[len(ids) :]
        cases.append(
            {
                "text": text,
                "images": image_files,
                "prompt_ids": ids,
                "features": [[round(float(v), 7) for v in row] for row in features.reshape(-1, features.shape[-1])],
                "last_logits": [round(float(v), 6) for v in logits],
                "greedy_ids": greedy,
                "greedy_text": tok.decode(greedy, skip_special_tokens=False),
            }
        )
        print(f"{out.name}: {len(image_files)} image(s), {len(ids)} prompt tokens, greedy {greedy}")
    (out / "golden.json").write_text(json.dumps({"cases": cases}) + "\n")


def main():
    vocab = json.loads((TINY_CHAT / "config.json").read_text())["vocab_size"]
    image_token = vocab  # `<image>` is added after tiny-chat's vocabulary
    llama = LlamaConfig(
        vocab_size=vocab + 16, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=2,
    )
    clip = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=30,
        patch_size=6, projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=clip, text_config=llama, image_token_index=image_token, image_seq_length=25,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    build(HERE / "tiny-llava", config, 0.15, False, False, "preprocessor_config.json")

    qwen2 = Qwen2Config(
        vocab_size=vocab + 16, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=2,
    )
    clip_gelu = CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=24,
        patch_size=8, projection_dim=24, hidden_act="gelu", layer_norm_eps=1e-6,
    )
    config = LlavaConfig(
        vision_config=clip_gelu, text_config=qwen2, image_token_index=image_token, image_seq_length=10,
        vision_feature_layer=[-3, -1], vision_feature_select_strategy="full", projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    build(HERE / "golden" / "llava-full", config, 0.15, True, True, "processor_config.json")


if __name__ == "__main__":
    sys.exit(main())
