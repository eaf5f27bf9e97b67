# Convenience recipes; each one's cargo command is also in the README.

# Build and start everything in one process on the built-in model (http://127.0.0.1:8000).
run *ARGS:
    cargo run --release -- run {{ARGS}}

# The test suite, as CI runs it.
test:
    cargo test --locked

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets --locked -- -D warnings

# Frontend overhead: HTTP vs the same workers called directly.
bench-http *ARGS:
    cargo run --release -- bench http {{ARGS}}

# The KV index on a Mooncake trace: FlashIndexer vs the reference index.
bench-index TRACE="../shared/data/mooncake_synthetic_trace.jsonl" *ARGS:
    cargo run --release -- bench index --trace {{TRACE}} {{ARGS}}

# Routing quality on a Mooncake trace: kv vs round-robin vs random.
bench-route TRACE="../shared/data/mooncake_synthetic_trace.jsonl" *ARGS:
    cargo run --release -- bench route --trace {{TRACE}} {{ARGS}}

# KV events through the ZMQ event plane vs raw PUB/SUB.
bench-plane *ARGS:
    cargo run --release -- bench plane {{ARGS}}

# Regenerate the shell completions kept in completions/.
completions:
    cargo run -q -- completions bash > completions/dynamo.bash
    cargo run -q -- completions zsh > completions/_dynamo
    cargo run -q -- completions fish > completions/dynamo.fish

# Regenerate testdata (needs the `tokenizers` and `msgspec` Python packages).
fixtures:
    python3 testdata/generate_tiny_model.py
    python3 testdata/kv_events/generate_kv_events.py
