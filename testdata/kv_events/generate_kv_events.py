#!/usr/bin/env python3
"""Writes golden KV-event payloads as vLLM, SGLang and TensorRT-LLM publish them, for the decoder tests.

The msgpack files are encoded by msgspec with struct definitions that mirror the engines' own
(vllm/distributed/kv_events.py before and after the switch from array to map events, SGLang's copy with
attn_dp_rank); each file is a stream of batches, one per engine step. Run only to change the fixtures:

    python3 -m venv /tmp/gen && /tmp/gen/bin/pip install msgspec==0.22.0
    /tmp/gen/bin/python testdata/kv_events/generate_kv_events.py

The scenario, the same in every file (block size 4): store blocks [1 2 3 4] [5 6 7 8] from the root, store
[9 10 11 12] after the second, remove the third, then clear everything.
"""
import json
import pathlib
from typing import Any, Optional, Union

import msgspec

OUT = pathlib.Path(__file__).resolve().parent
Hash = Union[bytes, int]


# vLLM before PR #42892 (and SGLang): every struct array_like, the event tag first.
class OldBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: Optional[int] = None


class OldEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class OldStored(OldEvent, tag="BlockStored"):
    block_hashes: list[Hash]
    parent_block_hash: Optional[Hash]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int]
    medium: Optional[str]
    lora_name: Optional[str]


class OldRemoved(OldEvent, tag="BlockRemoved"):
    block_hashes: list[Hash]
    medium: Optional[str]


class OldCleared(OldEvent, tag="AllBlocksCleared"):
    pass


# vLLM after PR #42892: events are maps keyed by field name with a "type" tag; the batch stays an array.
class NewEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class NewStored(NewEvent, tag="BlockStored"):
    block_hashes: list[Hash]
    parent_block_hash: Optional[Hash]
    token_ids: list[int]
    block_size: int
    lora_id: Optional[int] = None
    medium: Optional[str] = None
    lora_name: Optional[str] = None
    extra_keys: Optional[list[Any]] = None
    group_idx: Optional[int] = None


class NewRemoved(NewEvent, tag="BlockRemoved"):
    block_hashes: list[Hash]
    medium: Optional[str] = None
    group_idx: Optional[int] = None


class NewCleared(NewEvent, tag="AllBlocksCleared"):
    pass


def scenario(h, stored, removed, cleared, batch, rank):
    return [
        batch(ts=1.0, events=[stored([h[0], h[1]], None, [1, 2, 3, 4, 5, 6, 7, 8])], data_parallel_rank=rank),
        batch(ts=2.0, events=[stored([h[2]], h[1], [9, 10, 11, 12])], data_parallel_rank=rank),
        batch(ts=3.0, events=[removed([h[2]]), cleared()], data_parallel_rank=rank),
    ]


def write(name, batches):
    encoder = msgspec.msgpack.Encoder()
    (OUT / name).write_bytes(b"".join(encoder.encode(b) for b in batches))


def main():
    old_stored = lambda hashes, parent, tokens: OldStored(hashes, parent, tokens, 4, None, "GPU", None)
    old_removed = lambda hashes: OldRemoved(hashes, "GPU")
    write("vllm_array.msgpack", scenario([111, 222, 333], old_stored, old_removed, OldCleared, OldBatch, 0))

    digests = [bytes([i]) * 32 for i in (1, 2, 3)]
    new_stored = lambda hashes, parent, tokens: NewStored(hashes, parent, tokens, 4, medium="GPU")
    new_removed = lambda hashes: NewRemoved(hashes, medium="GPU")
    write("vllm_map.msgpack", scenario(digests, new_stored, new_removed, NewCleared, OldBatch, None))

    # SGLang: the same array shape, the third batch field is attn_dp_rank, hashes are signed 64-bit.
    sglang_hashes = [-5, 7_000_000_000_000_000_000 - 2**63, -(2**63)]
    write("sglang.msgpack", scenario(sglang_hashes, old_stored, old_removed, OldCleared, OldBatch, 1))

    def trt_stored(hashes, parent, tokens):
        blocks = [
            {
                "type": "stored_block",
                "block_hash": h,
                "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in tokens[i * 4 : i * 4 + 4]],
                "cache_level": 0,
                "priority": 35,
            }
            for i, h in enumerate(hashes)
        ]
        return {"type": "stored", "parent_hash": parent, "blocks": blocks}

    events = [
        {"event_id": 0, "window_size": 4, "data": {"type": "created", "num_blocks_per_cache_level": [100, 0]}},
        {"event_id": 1, "window_size": 4, "data": trt_stored([11, 22], None, [1, 2, 3, 4, 5, 6, 7, 8])},
        {"event_id": 2, "window_size": 4, "data": trt_stored([33], 22, [9, 10, 11, 12])},
        {"event_id": 3, "window_size": 4, "data": {"type": "removed", "block_hashes": [33]}},
    ]
    (OUT / "trtllm.json").write_text(json.dumps(events, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
