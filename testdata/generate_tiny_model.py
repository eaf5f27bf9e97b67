#!/usr/bin/env python3
"""Generates testdata/tiny-chat: the tiny model directory the mocker, the frontend and the tests use.

It trains a byte-level BPE tokenizer (HF `tokenizers`) on a small corpus written into this script, and writes
config.json, generation_config.json, tokenizer.json and tokenizer_config.json (with a ChatML chat template).
The output is committed; run this only to change the fixture:

    python3 -m venv /tmp/gen && /tmp/gen/bin/pip install tokenizers==0.23.3
    /tmp/gen/bin/python testdata/generate_tiny_model.py
"""
import json
import pathlib

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = pathlib.Path(__file__).resolve().parent / "tiny-chat"
VOCAB_SIZE = 1024
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = """
A serving system turns a prompt into tokens, runs the model over them, and streams new tokens back to the client.
The router sends each request to the worker that already holds the longest prefix of its prompt in the key-value cache.
Prefill reads the whole prompt at once; decode produces one token per step for every running sequence.
Continuous batching lets requests join and leave the running batch at every step of the scheduler.
Blocks of sixteen tokens are hashed in a chain, so two prompts that share a prefix share their first blocks.
When memory runs out, the least recently used blocks that no request holds are evicted from the cache.
The planner forecasts the load with a Kalman filter and decides how many prefill and decode workers to run.
Hello! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital of France.
Tell me a story about a small robot who learned to paint the sea at night, under a sky full of quiet stars.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. 0123456789 + - * / = ( )
def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, i))\n
{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}
Café, naïve, façade, déjà vu, crème brûlée. Grüße aus München! ¿Dónde está la biblioteca? Ça va très bien.
日本語の文章も少し含めます。東京は日本の首都です。中文也可以。你好，世界！ 한국어 문장도 있습니다.
Emoji appear too: 🚀 ✨ 🤖 👋 — and symbols like €, £, ¥, ©, ®, ™, °, ±, µ, ∑, ∞, ≈, ≠, ≤, ≥.
The user asked a question, and the assistant answered it clearly, briefly, and without making anything up.
Infrastructure engineers start roles on GPU nodes over ssh and watch the cluster live in a terminal.
"""


def corpus_lines():
    lines = [line for line in CORPUS.strip().splitlines() if line]
    # Repeat with small variations so merges see enough pairs.
    for i in range(40):
        for line in lines:
            yield line if i % 2 == 0 else line.lower()


def build_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    return tok


CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content.strip() + '\\n\\n' }}{%- endif %}"
    "{{- 'You may call these tools:\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson + '\\n' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content.strip() + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('Unknown role: ' + message.role) }}"
    "{%- endif %}"
    "{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(OUT / "tokenizer.json"))
    eos_id = tok.token_to_id("<|im_end|>")
    pad_id = tok.token_to_id("<|endoftext|>")
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "vocab_size": tok.get_vocab_size(),
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
    }
    (OUT / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": pad_id, "eos_token_id": [eos_id, pad_id], "do_sample": False}
    (OUT / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer_config = {
        "add_bos_token": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {"content": t, "special": True} for t in SPECIAL
        },
    }
    (OUT / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    print(f"wrote {OUT} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
