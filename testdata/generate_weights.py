#!/usr/bin/env python3
"""Generates the weights the built-in engine is tested against, with HF transformers as the independent
implementation. Needs torch and transformers (only to regenerate; CI never runs this):

    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers safetensors tokenizers
    /tmp/hf/bin/python testdata/generate_weights.py

Writes
- tiny-chat/model.safetensors: the built-in model's weights (Qwen2 shape, f32), trained for a few hundred
  steps on the tokenizer's corpus so `dynamo run` answers with recognisable words rather than noise;
- golden/tiny-chat.json for the built-in model (Qwen2), and golden/<name>/ for two more tiny checkpoints (Llama with Llama-3 rope scaling and an
  untied head written in the transformers-4 config spelling, Qwen3 with q/k norm and head_dim != hidden/heads
  stored in bf16) plus golden.json: prompt ids, the logits at every prompt position and 16 greedy tokens,
  computed in f32 by transformers (bf16 weights are upcast, so the engine's bf16 path must match as tightly).
"""
import json
import pathlib
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

HERE = pathlib.Path(__file__).resolve().parent
TINY = HERE / "tiny-chat"
GOLDEN = HERE / "golden"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
GREEDY_TOKENS = 16

sys.path.insert(0, str(HERE))
from generate_tiny_model import CORPUS  # noqa: E402


def chat_corpus():
    lines = [line for line in CORPUS.strip().splitlines() if line]
    text = ""
    for question, answer in zip(lines, lines[1:] + lines[:1]):
        text += f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    return "\n".join(lines) + "\n" + text


def train_tiny_chat(tok):
    base = json.loads((TINY / "config.json").read_text())
    config = Qwen2Config(**{k: v for k, v in base.items() if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    ids = torch.tensor(tok.encode(chat_corpus()).ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, batch = 64, 16
    for step in range(600):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"tiny-chat step {step}: loss {loss.item():.3f}")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(TINY / "model.safetensors"), metadata={"format": "pt"})
    return model


def golden(name, model, tok, config_override=None, dtype=torch.float32):
    """Writes golden/<name>/ (a checkpoint and golden.json), or only golden/tiny-chat.json for the built-in model."""
    builtin = name == "tiny-chat"
    out = GOLDEN if builtin else GOLDEN / name
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    if dtype == torch.bfloat16:
        # Round the weights to bf16, then run transformers in f32 on exactly those values. Parameters only:
        # `model.to(bfloat16)` would also round the rotary frequency buffer, which no checkpoint stores.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    if not builtin:
        for f in TOKENIZER_FILES:
            shutil.copy(TINY / f, out / f)
        state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(out)
    if config_override:
        config = json.loads((out / "config.json").read_text())
        config_override(config)
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    prompt = tok.encode(PROMPT).ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0]
        tokens = list(prompt)
        for _ in range(GREEDY_TOKENS):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    greedy = tokens[len(prompt) :]
    fixture = {
        "prompt": PROMPT,
        "prompt_ids": prompt,
        "logits": [[round(float(v), 6) for v in row] for row in logits],
        "greedy_ids": greedy,
        "greedy_text": tok.decode(greedy, skip_special_tokens=False),
        "weights_dtype": str(dtype).removeprefix("torch."),
    }
    (out / ("tiny-chat.json" if builtin else "golden.json")).write_text(json.dumps(fixture) + "\n")
    print(f"wrote {name}: {len(prompt)} prompt tokens, greedy {greedy} = {fixture['greedy_text']!r}")


def to_transformers_4(config):
    """Rewrites a transformers-5 config.json in the older spelling (rope_theta + rope_scaling, torch_dtype)."""
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype", "float32")


def main():
    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    vocab = json.loads((TINY / "config.json").read_text())["vocab_size"]
    tiny = train_tiny_chat(tok)
    golden("tiny-chat", tiny, tok)

    torch.manual_seed(1)
    llama = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        bos_token_id=0, eos_token_id=2, initializer_range=0.15,
    )
    golden("llama", AutoModelForCausalLM.from_config(llama).float(), tok, to_transformers_4)

    torch.manual_seed(2)
    qwen3 = Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, rms_norm_eps=1e-6,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=2, initializer_range=0.15,
    )
    golden("qwen3", AutoModelForCausalLM.from_config(qwen3).float(), tok, dtype=torch.bfloat16)


if __name__ == "__main__":
    main()
