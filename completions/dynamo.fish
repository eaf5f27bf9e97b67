# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_dynamo_global_optspecs
    string join \n v/verbose h/help V/version
end

function __fish_dynamo_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_dynamo_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_dynamo_using_subcommand
    set -l cmd (__fish_dynamo_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c dynamo -n "__fish_dynamo_needs_command" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_needs_command" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_needs_command" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "run" -d 'Run everything in one process: OpenAI HTTP frontend, router and workers'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "decode" -d 'Start a worker (prefill and decode in one) that registers itself and serves requests from routers'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "prefill" -d 'Start a worker that only prefills prompts and hands their KV to decode workers (disaggregated serving)'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "encode" -d 'Start a worker that runs only a vision model\'s image encoder and hands images\' embeddings to the workers that prefill their prompts (those need --kv-transfer, or to be prefill workers)'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "route" -d 'Start the OpenAI HTTP frontend and router in front of the workers discovery finds'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "top" -d 'Watch every worker of a namespace live: state, load, KV cache, requests'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "profile" -d 'Write a worker\'s performance profile (prefill time by prompt length, time between tokens by batch and context) for the planner\'s profile-based sizing: the mocker\'s from its timing fit, others measured'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "bench" -d 'Measure performance; each benchmark compares against a reference in the same run'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "selftest" -d 'Check the CUDA backend against the CPU backend (or, with --compile-only, just compile its kernels)'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "keygen" -d 'Make a cluster key: with it, roles seal every plane message and ignore processes without it'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "completions" -d 'Print shell completions (bash, zsh, fish, …) to stdout'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l model -d 'HF model directory (config.json, tokenizer files, safetensors weights) [default: the built-in tiny-chat]' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l served-model-name -d 'Names clients use in "model", the first the one answers carry (space- or comma-separated, as vLLM\'s) [default: the model directory\'s name]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l max-model-len -d 'Longest sequence (prompt plus output) served, at most the model\'s context [default: the model\'s]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l chat-template -d 'A Jinja chat template file to use instead of the model\'s (routers get it with the model\'s files)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l workers -d 'In-process workers' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l prefill-workers -d 'In-process workers that only prefill prompts and hand their KV to the workers above (disaggregated serving; 0 serves aggregated). Needs the native engine on the CPU' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l encode-workers -d 'In-process workers that only run a vision model\'s image encoder and hand images\' embeddings to the workers that prefill their prompts (a LLaVA-style --model on the native engine; 0 encodes in them)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l http-host -l host -d 'Address the OpenAI HTTP frontend listens on' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l http-port -l port -d 'Port of the OpenAI HTTP frontend (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l api-key -d 'Clients must send `Authorization: Bearer KEY` (all but /health, /live and /metrics)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l allowed-origin -d 'Web origins whose pages may call the API from a browser (CORS), comma-separated; `*` for any' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l tool-call-parser -d 'The format chat models write tool calls in (hermes, mistral, llama3_json), read from their output into `tool_calls` [default: the one the chat template names]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l max-request-bytes -d 'Largest request body in bytes; larger ones are answered 413' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l max-connections -d 'Open client connections past which a new one is answered 503 (lowered to fit `ulimit -n`)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l http-header-timeout -d 'Seconds a client has to send a request\'s headers; a kept-alive connection idle this long is closed' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l http-body-timeout -d 'Seconds a client has to send a whole request body (408 past it)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l limit-images-per-prompt -d 'Images one prompt may carry (vision models); more are answered 400' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l allowed-local-media-path -d 'A directory whose image files requests may name as `file:///…` URLs (none by default: any client could then read what this server can read there)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l allowed-media-domains -d 'Hosts image URLs may be fetched from, redirects included (exact names, comma-separated) [default: any; on a server untrusted clients reach, set it: they could otherwise have it fetch internal addresses]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l media-fetch-timeout -d 'Seconds fetching one image URL may take' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l discovery -d 'Also put the workers on the planes and register them (mdns, mdns:PORT or file:PATH), as `dynamo decode` workers are, so `dynamo top` and other routers of the namespace see them' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l namespace -d 'The namespace the workers are announced in (with --discovery)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l cluster-key-file -d 'File holding the cluster key (`dynamo keygen --out PATH` makes one): every plane message is sealed with it and processes without it are ignored. Without a key (nor DYNAMO_CLUSTER_KEY) the cluster is open to anyone on the network' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l router-mode -d 'How requests are spread over workers' -r -f -a "kv\t'Lowest cost: uncached prompt blocks and queued prefill, weighed against decode load'
latency\t'Lowest predicted time to first token: the prefill of what the worker lacks, behind its queued prompts and beside its decode batch, timed by the worker\'s performance profile'
round-robin\t''
random\t''
least-loaded\t'Fewest requests in flight'"
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l kv-overlap-score-weight -d 'Weight of prefill work (uncached and queued prompt blocks) against decode blocks in the kv cost' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l router-temperature -d '0 always takes the cheapest worker; above 0 samples a softmax over normalised costs' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l router-ttl -d 'With --no-kv-events, seconds a worker is assumed to keep a prompt it was sent' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l busy-threshold -d 'In-flight requests per worker past which the frontend answers 503 with Retry-After' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l migration-limit -d 'Times a request whose worker is lost mid-stream continues on another worker (0: it fails instead)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l disagg-threshold -d 'With prefill workers up: prompts whose part not cached on their decode worker is at least this many tokens are prefilled on a prefill worker, shorter ones on the decode worker (0: every prompt)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l prefill-queue-limit -d 'Prefills in flight per prefill worker past which it takes no more; when all are full, prompts are prefilled on their decode worker rather than wait' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l disagg-itl-budget-ms -d 'With prefill workers up: a prompt is prefilled on its decode worker when moving its KV there (at the rate that worker\'s reads have gone), spread over the tokens the request may generate, would add more than this many ms to its mean time between tokens: a long prompt with a short answer (0: no limit)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l encode-queue-limit -d 'Requests with images in flight per encode worker past which it takes no more; when all are full, the worker that prefills a prompt encodes its images itself rather than wait' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l engine -d 'Engine the workers run' -r -f -a "native\t'The built-in engine: runs the model\'s weights (Llama / Mistral / Qwen2 / Qwen3 safetensors) on the CPU'
mocker\t'Simulated engine: real KV-cache bookkeeping, timing fitted to vLLM, no weights needed'
vllm\t'A running vLLM server (--engine-url), put behind this worker: its OpenAI API, KV events and metrics'
sglang\t'A running SGLang server (--engine-url): its /generate API, KV events and metrics (--enable-metrics)'
trtllm\t'A running TensorRT-LLM server (trtllm-serve, --engine-url): its OpenAI API, polled KV events, metrics'"
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l block-size -d 'Tokens per KV block' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l num-blocks -d 'KV blocks per worker [default: 16384 for the mocker; for native, what --kv-cache-gib holds]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l max-num-seqs -d 'Most requests in a worker\'s running batch [default: 256]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l max-num-batched-tokens -d 'Token budget of one engine step (prefill chunks plus decodes) [default: 8192]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l device -d 'Native: where to compute: auto (a GPU when CUDA and one are present, else the CPU), cpu, cuda or cuda:N [default: auto]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l threads -d 'Native: compute threads shared by this process\'s workers [default: the CPUs this process may use]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l kv-cache-gib -d 'Native: memory for each worker\'s KV cache, in GiB [default: 1]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l quantization -d 'Native: how the weights are held: none (as the checkpoint stores them) or int8 (symmetric, one scale per output channel, quantized at load; CPU only: about half of bf16\'s bytes to stream per token)' -r -f -a "none\t'As the checkpoint stores them (f32, bf16; f16 is widened to f32)'
int8\t'Symmetric int8 per output channel, quantized at load (CPU)'"
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l speedup -d 'Mocker: simulated time runs this many times faster than the fitted real timing [default: 1]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l kv-bytes-per-token -d 'Mocker: KV bytes per token of the simulated model; a hand-off between mockers (prefill to decode) takes as long as moving that much would [default: 131072, Llama-3-8B in bf16]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l transfer-gbps -d 'Mocker: the bandwidth of a hand-off between mockers, GB/s (measure yours with `dynamo bench transfer`) [default: 25]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l engine-url -d 'vLLM / SGLang / TensorRT-LLM: its server, http://HOST:PORT (required with those engines)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l kv-events -d 'vLLM / SGLang: its KV-event publisher (the endpoint of its --kv-events-config, e.g. tcp://HOST:5557); TensorRT-LLM: its events URL, asked every 100 ms (http://HOST:PORT/kv_cache_events). Without it the routers see no KV of this worker and route to it by load only' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l kv-events-replay -d 'vLLM / SGLang: its KV-event replay socket (replay_endpoint of --kv-events-config, e.g. tcp://HOST:5558): the worker starts from the engine\'s event history and fills gaps from it' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l engine-bootstrap-port -d 'SGLang prefill worker: the engine\'s --disaggregation-bootstrap-port, which decode engines fetch KV from' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l data-parallel-rank -d 'vLLM run with --data-parallel-size N: the rank (0..N) this worker fronts. Its KV events come from --kv-events\' port + rank (where vLLM puts that rank\'s publisher; --kv-events-replay likewise), its load from that rank\'s series, and each request is pinned to the rank (X-data-parallel-rank), so the routers see every rank\'s cache on its own. Start one worker per rank' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l engine-metrics -d 'Its Prometheus metrics [default: /metrics of --engine-url; TensorRT-LLM: /prometheus/metrics]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l profile -d 'Native and external engines: their performance profile, written by `dynamo profile` on this model and hardware, which a --router-mode latency router prices this worker by (the mocker\'s is its timing fit)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l protect-metrics -d 'With --api-key, /metrics asks for the key too'
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l no-kv-events -d 'The engines publish no KV events: route on the router\'s own past decisions instead'
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l no-prefix-caching -d 'Turn off prefix caching (no block reuse between requests)'
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l model -d 'HF model directory (config.json, tokenizer files, safetensors weights) [default: the built-in tiny-chat]' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l served-model-name -d 'Names clients use in "model", the first the one answers carry (space- or comma-separated, as vLLM\'s) [default: the model directory\'s name]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l max-model-len -d 'Longest sequence (prompt plus output) served, at most the model\'s context [default: the model\'s]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l chat-template -d 'A Jinja chat template file to use instead of the model\'s (routers get it with the model\'s files)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l host -d 'Address routers reach this worker at; its sockets bind there' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l request-port -d 'Port of the request plane (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l event-port -d 'Port of the event plane (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l max-in-flight -d 'Requests in flight past which new ones are refused as busy (routers then pick another worker)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l drain-timeout -d 'Seconds a worker told to stop (SIGTERM, Ctrl-C) keeps serving the requests it has, having left discovery; a second signal stops it at once' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l metrics-port -d 'Serve /metrics (this worker\'s load, also under vLLM\'s gauge names for endpoint pickers), /health (503 once it drains: a readiness probe) and /live on this port of --host (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l http-addr -d 'Where an OpenAI frontend serving this worker listens (a `dynamo route` beside it, e.g. in the same pod, which follows the x-worker-instance-id an endpoint picker sets): written in its record, so a Gateway API endpoint picker can send the worker\'s requests there' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l transfer-port -d 'Port of the transfer agent (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l transfer-backend -d 'How KV moves: shm to workers on this host and tcp to the rest (auto), or one of them always. nixl is NVIDIA\'s NIXL (UCX), loaded from libnixl_capi.so on LD_LIBRARY_PATH; the workers it reads from must run it too' -r -f -a "auto\t''
shm\t''
tcp\t''
nixl\t''"
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l transfer-streams -d 'Data connections per tcp peer' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l kv-lease -d 'Seconds a prefill worker keeps a prompt\'s KV for the decode worker that should read it; past it the pages go back to the pool (a decode worker that died before reading costs no more than this)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l discovery -d 'Where roles find each other: mdns (multicast DNS on the local network, nothing to set up), mdns:PORT (the same on another UDP port), file:PATH (a TOML or JSON cluster file every machine can read; workers add and remove themselves), or k8s[:SELECTOR] (the Kubernetes API: workers write DynamoWorker records owned by their pods and are seen while ready in the EndpointSlices of the Services labelled SELECTOR, by default dynamo.rs/discovery=enabled)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l namespace -d 'Clusters sharing one network or file see only their own namespace' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l cluster-key-file -d 'File holding the cluster key (`dynamo keygen --out PATH` makes one): every plane message is sealed with it and processes without it are ignored. Without a key (nor DYNAMO_CLUSTER_KEY) the cluster is open to anyone on the network' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l engine -d 'Engine the workers run' -r -f -a "native\t'The built-in engine: runs the model\'s weights (Llama / Mistral / Qwen2 / Qwen3 safetensors) on the CPU'
mocker\t'Simulated engine: real KV-cache bookkeeping, timing fitted to vLLM, no weights needed'
vllm\t'A running vLLM server (--engine-url), put behind this worker: its OpenAI API, KV events and metrics'
sglang\t'A running SGLang server (--engine-url): its /generate API, KV events and metrics (--enable-metrics)'
trtllm\t'A running TensorRT-LLM server (trtllm-serve, --engine-url): its OpenAI API, polled KV events, metrics'"
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l block-size -d 'Tokens per KV block' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l num-blocks -d 'KV blocks per worker [default: 16384 for the mocker; for native, what --kv-cache-gib holds]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l max-num-seqs -d 'Most requests in a worker\'s running batch [default: 256]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l max-num-batched-tokens -d 'Token budget of one engine step (prefill chunks plus decodes) [default: 8192]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l device -d 'Native: where to compute: auto (a GPU when CUDA and one are present, else the CPU), cpu, cuda or cuda:N [default: auto]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l threads -d 'Native: compute threads shared by this process\'s workers [default: the CPUs this process may use]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l kv-cache-gib -d 'Native: memory for each worker\'s KV cache, in GiB [default: 1]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l quantization -d 'Native: how the weights are held: none (as the checkpoint stores them) or int8 (symmetric, one scale per output channel, quantized at load; CPU only: about half of bf16\'s bytes to stream per token)' -r -f -a "none\t'As the checkpoint stores them (f32, bf16; f16 is widened to f32)'
int8\t'Symmetric int8 per output channel, quantized at load (CPU)'"
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l speedup -d 'Mocker: simulated time runs this many times faster than the fitted real timing [default: 1]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l kv-bytes-per-token -d 'Mocker: KV bytes per token of the simulated model; a hand-off between mockers (prefill to decode) takes as long as moving that much would [default: 131072, Llama-3-8B in bf16]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l transfer-gbps -d 'Mocker: the bandwidth of a hand-off between mockers, GB/s (measure yours with `dynamo bench transfer`) [default: 25]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l engine-url -d 'vLLM / SGLang / TensorRT-LLM: its server, http://HOST:PORT (required with those engines)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l kv-events -d 'vLLM / SGLang: its KV-event publisher (the endpoint of its --kv-events-config, e.g. tcp://HOST:5557); TensorRT-LLM: its events URL, asked every 100 ms (http://HOST:PORT/kv_cache_events). Without it the routers see no KV of this worker and route to it by load only' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l kv-events-replay -d 'vLLM / SGLang: its KV-event replay socket (replay_endpoint of --kv-events-config, e.g. tcp://HOST:5558): the worker starts from the engine\'s event history and fills gaps from it' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l engine-bootstrap-port -d 'SGLang prefill worker: the engine\'s --disaggregation-bootstrap-port, which decode engines fetch KV from' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l data-parallel-rank -d 'vLLM run with --data-parallel-size N: the rank (0..N) this worker fronts. Its KV events come from --kv-events\' port + rank (where vLLM puts that rank\'s publisher; --kv-events-replay likewise), its load from that rank\'s series, and each request is pinned to the rank (X-data-parallel-rank), so the routers see every rank\'s cache on its own. Start one worker per rank' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l engine-metrics -d 'Its Prometheus metrics [default: /metrics of --engine-url; TensorRT-LLM: /prometheus/metrics]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l profile -d 'Native and external engines: their performance profile, written by `dynamo profile` on this model and hardware, which a --router-mode latency router prices this worker by (the mocker\'s is its timing fit)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l kv-transfer -d 'Take prompts\' KV from prefill workers, and images\' embeddings from encode workers, through a transfer agent (disaggregated serving; the native engine on the CPU). Its address goes in the worker\'s record. Prefill workers always have one. With --engine vllm: the engine runs a KV connector (NixlConnector) and takes KV from vLLM prefill workers'
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -l no-prefix-caching -d 'Turn off prefix caching (no block reuse between requests)'
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand decode" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l model -d 'HF model directory (config.json, tokenizer files, safetensors weights) [default: the built-in tiny-chat]' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l served-model-name -d 'Names clients use in "model", the first the one answers carry (space- or comma-separated, as vLLM\'s) [default: the model directory\'s name]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l max-model-len -d 'Longest sequence (prompt plus output) served, at most the model\'s context [default: the model\'s]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l chat-template -d 'A Jinja chat template file to use instead of the model\'s (routers get it with the model\'s files)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l host -d 'Address routers reach this worker at; its sockets bind there' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l request-port -d 'Port of the request plane (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l event-port -d 'Port of the event plane (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l max-in-flight -d 'Requests in flight past which new ones are refused as busy (routers then pick another worker)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l drain-timeout -d 'Seconds a worker told to stop (SIGTERM, Ctrl-C) keeps serving the requests it has, having left discovery; a second signal stops it at once' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l metrics-port -d 'Serve /metrics (this worker\'s load, also under vLLM\'s gauge names for endpoint pickers), /health (503 once it drains: a readiness probe) and /live on this port of --host (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l http-addr -d 'Where an OpenAI frontend serving this worker listens (a `dynamo route` beside it, e.g. in the same pod, which follows the x-worker-instance-id an endpoint picker sets): written in its record, so a Gateway API endpoint picker can send the worker\'s requests there' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l transfer-port -d 'Port of the transfer agent (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l transfer-backend -d 'How KV moves: shm to workers on this host and tcp to the rest (auto), or one of them always. nixl is NVIDIA\'s NIXL (UCX), loaded from libnixl_capi.so on LD_LIBRARY_PATH; the workers it reads from must run it too' -r -f -a "auto\t''
shm\t''
tcp\t''
nixl\t''"
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l transfer-streams -d 'Data connections per tcp peer' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l kv-lease -d 'Seconds a prefill worker keeps a prompt\'s KV for the decode worker that should read it; past it the pages go back to the pool (a decode worker that died before reading costs no more than this)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l discovery -d 'Where roles find each other: mdns (multicast DNS on the local network, nothing to set up), mdns:PORT (the same on another UDP port), file:PATH (a TOML or JSON cluster file every machine can read; workers add and remove themselves), or k8s[:SELECTOR] (the Kubernetes API: workers write DynamoWorker records owned by their pods and are seen while ready in the EndpointSlices of the Services labelled SELECTOR, by default dynamo.rs/discovery=enabled)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l namespace -d 'Clusters sharing one network or file see only their own namespace' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l cluster-key-file -d 'File holding the cluster key (`dynamo keygen --out PATH` makes one): every plane message is sealed with it and processes without it are ignored. Without a key (nor DYNAMO_CLUSTER_KEY) the cluster is open to anyone on the network' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l engine -d 'Engine the workers run' -r -f -a "native\t'The built-in engine: runs the model\'s weights (Llama / Mistral / Qwen2 / Qwen3 safetensors) on the CPU'
mocker\t'Simulated engine: real KV-cache bookkeeping, timing fitted to vLLM, no weights needed'
vllm\t'A running vLLM server (--engine-url), put behind this worker: its OpenAI API, KV events and metrics'
sglang\t'A running SGLang server (--engine-url): its /generate API, KV events and metrics (--enable-metrics)'
trtllm\t'A running TensorRT-LLM server (trtllm-serve, --engine-url): its OpenAI API, polled KV events, metrics'"
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l block-size -d 'Tokens per KV block' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l num-blocks -d 'KV blocks per worker [default: 16384 for the mocker; for native, what --kv-cache-gib holds]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l max-num-seqs -d 'Most requests in a worker\'s running batch [default: 256]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l max-num-batched-tokens -d 'Token budget of one engine step (prefill chunks plus decodes) [default: 8192]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l device -d 'Native: where to compute: auto (a GPU when CUDA and one are present, else the CPU), cpu, cuda or cuda:N [default: auto]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l threads -d 'Native: compute threads shared by this process\'s workers [default: the CPUs this process may use]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l kv-cache-gib -d 'Native: memory for each worker\'s KV cache, in GiB [default: 1]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l quantization -d 'Native: how the weights are held: none (as the checkpoint stores them) or int8 (symmetric, one scale per output channel, quantized at load; CPU only: about half of bf16\'s bytes to stream per token)' -r -f -a "none\t'As the checkpoint stores them (f32, bf16; f16 is widened to f32)'
int8\t'Symmetric int8 per output channel, quantized at load (CPU)'"
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l speedup -d 'Mocker: simulated time runs this many times faster than the fitted real timing [default: 1]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l kv-bytes-per-token -d 'Mocker: KV bytes per token of the simulated model; a hand-off between mockers (prefill to decode) takes as long as moving that much would [default: 131072, Llama-3-8B in bf16]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l transfer-gbps -d 'Mocker: the bandwidth of a hand-off between mockers, GB/s (measure yours with `dynamo bench transfer`) [default: 25]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l engine-url -d 'vLLM / SGLang / TensorRT-LLM: its server, http://HOST:PORT (required with those engines)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l kv-events -d 'vLLM / SGLang: its KV-event publisher (the endpoint of its --kv-events-config, e.g. tcp://HOST:5557); TensorRT-LLM: its events URL, asked every 100 ms (http://HOST:PORT/kv_cache_events). Without it the routers see no KV of this worker and route to it by load only' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l kv-events-replay -d 'vLLM / SGLang: its KV-event replay socket (replay_endpoint of --kv-events-config, e.g. tcp://HOST:5558): the worker starts from the engine\'s event history and fills gaps from it' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l engine-bootstrap-port -d 'SGLang prefill worker: the engine\'s --disaggregation-bootstrap-port, which decode engines fetch KV from' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l data-parallel-rank -d 'vLLM run with --data-parallel-size N: the rank (0..N) this worker fronts. Its KV events come from --kv-events\' port + rank (where vLLM puts that rank\'s publisher; --kv-events-replay likewise), its load from that rank\'s series, and each request is pinned to the rank (X-data-parallel-rank), so the routers see every rank\'s cache on its own. Start one worker per rank' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l engine-metrics -d 'Its Prometheus metrics [default: /metrics of --engine-url; TensorRT-LLM: /prometheus/metrics]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l profile -d 'Native and external engines: their performance profile, written by `dynamo profile` on this model and hardware, which a --router-mode latency router prices this worker by (the mocker\'s is its timing fit)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l kv-transfer -d 'Take prompts\' KV from prefill workers, and images\' embeddings from encode workers, through a transfer agent (disaggregated serving; the native engine on the CPU). Its address goes in the worker\'s record. Prefill workers always have one. With --engine vllm: the engine runs a KV connector (NixlConnector) and takes KV from vLLM prefill workers'
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -l no-prefix-caching -d 'Turn off prefix caching (no block reuse between requests)'
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand prefill" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l model -d 'HF model directory (config.json, tokenizer files, safetensors weights) [default: the built-in tiny-chat]' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l served-model-name -d 'Names clients use in "model", the first the one answers carry (space- or comma-separated, as vLLM\'s) [default: the model directory\'s name]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l max-model-len -d 'Longest sequence (prompt plus output) served, at most the model\'s context [default: the model\'s]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l chat-template -d 'A Jinja chat template file to use instead of the model\'s (routers get it with the model\'s files)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l host -d 'Address routers reach this worker at; its sockets bind there' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l request-port -d 'Port of the request plane (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l event-port -d 'Port of the event plane (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l max-in-flight -d 'Requests in flight past which new ones are refused as busy (routers then pick another worker)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l drain-timeout -d 'Seconds a worker told to stop (SIGTERM, Ctrl-C) keeps serving the requests it has, having left discovery; a second signal stops it at once' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l metrics-port -d 'Serve /metrics (this worker\'s load, also under vLLM\'s gauge names for endpoint pickers), /health (503 once it drains: a readiness probe) and /live on this port of --host (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l http-addr -d 'Where an OpenAI frontend serving this worker listens (a `dynamo route` beside it, e.g. in the same pod, which follows the x-worker-instance-id an endpoint picker sets): written in its record, so a Gateway API endpoint picker can send the worker\'s requests there' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l transfer-port -d 'Port of the transfer agent that serves the embeddings (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l transfer-backend -d 'How embeddings move: shm to workers on this host and tcp to the rest (auto), or one of them always' -r -f -a "auto\t''
shm\t''
tcp\t''
nixl\t''"
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l transfer-streams -d 'Data connections per tcp peer' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l encode-cache-mib -d 'Memory for images\' embeddings, in MiB: held for their readers, then kept so a repeated image is not encoded again (LLaVA-1.5-7B: 9 MiB an image)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l embeddings-lease -d 'Seconds an image\'s embeddings are kept for the worker that should read them; past it the memory may go to another image' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l device -d 'Where to compute: auto (a GPU when CUDA and one are present, else the CPU), cpu, cuda or cuda:N' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l threads -d 'Compute threads [default: the CPUs this process may use]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l discovery -d 'Where roles find each other: mdns (multicast DNS on the local network, nothing to set up), mdns:PORT (the same on another UDP port), file:PATH (a TOML or JSON cluster file every machine can read; workers add and remove themselves), or k8s[:SELECTOR] (the Kubernetes API: workers write DynamoWorker records owned by their pods and are seen while ready in the EndpointSlices of the Services labelled SELECTOR, by default dynamo.rs/discovery=enabled)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l namespace -d 'Clusters sharing one network or file see only their own namespace' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -l cluster-key-file -d 'File holding the cluster key (`dynamo keygen --out PATH` makes one): every plane message is sealed with it and processes without it are ignored. Without a key (nor DYNAMO_CLUSTER_KEY) the cluster is open to anyone on the network' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand encode" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l http-host -l host -d 'Address the OpenAI HTTP frontend listens on' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l http-port -l port -d 'Port of the OpenAI HTTP frontend (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l api-key -d 'Clients must send `Authorization: Bearer KEY` (all but /health, /live and /metrics)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l allowed-origin -d 'Web origins whose pages may call the API from a browser (CORS), comma-separated; `*` for any' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l tool-call-parser -d 'The format chat models write tool calls in (hermes, mistral, llama3_json), read from their output into `tool_calls` [default: the one the chat template names]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l max-request-bytes -d 'Largest request body in bytes; larger ones are answered 413' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l max-connections -d 'Open client connections past which a new one is answered 503 (lowered to fit `ulimit -n`)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l http-header-timeout -d 'Seconds a client has to send a request\'s headers; a kept-alive connection idle this long is closed' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l http-body-timeout -d 'Seconds a client has to send a whole request body (408 past it)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l limit-images-per-prompt -d 'Images one prompt may carry (vision models); more are answered 400' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l allowed-local-media-path -d 'A directory whose image files requests may name as `file:///…` URLs (none by default: any client could then read what this server can read there)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l allowed-media-domains -d 'Hosts image URLs may be fetched from, redirects included (exact names, comma-separated) [default: any; on a server untrusted clients reach, set it: they could otherwise have it fetch internal addresses]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l media-fetch-timeout -d 'Seconds fetching one image URL may take' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l epp-port -d 'Also serve the Gateway API Inference Extension\'s endpoint picker (Envoy ext_proc over h2c) on this port of --http-host (0 picks a free one): a gateway asks it which worker each request goes to, among workers served by an OpenAI server of their own (`dynamo run --workers 1 --discovery …`)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l epp-health-port -d 'The picker\'s gRPC health service (grpc.health.v1: liveness, readiness and the ext_proc service), in plaintext on this port of --http-host' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l epp-cert-file -d 'The picker\'s TLS certificate chain (PEM) [default: a self-signed one made at start-up, which gateways configured as GAIE\'s accept]' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l epp-key-file -d 'The key of --epp-cert-file (PEM)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l worker-timeout -d 'Seconds without an answer to the heartbeat after which a worker leaves the routing set' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l discovery -d 'Where roles find each other: mdns (multicast DNS on the local network, nothing to set up), mdns:PORT (the same on another UDP port), file:PATH (a TOML or JSON cluster file every machine can read; workers add and remove themselves), or k8s[:SELECTOR] (the Kubernetes API: workers write DynamoWorker records owned by their pods and are seen while ready in the EndpointSlices of the Services labelled SELECTOR, by default dynamo.rs/discovery=enabled)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l namespace -d 'Clusters sharing one network or file see only their own namespace' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l cluster-key-file -d 'File holding the cluster key (`dynamo keygen --out PATH` makes one): every plane message is sealed with it and processes without it are ignored. Without a key (nor DYNAMO_CLUSTER_KEY) the cluster is open to anyone on the network' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l router-mode -d 'How requests are spread over workers' -r -f -a "kv\t'Lowest cost: uncached prompt blocks and queued prefill, weighed against decode load'
latency\t'Lowest predicted time to first token: the prefill of what the worker lacks, behind its queued prompts and beside its decode batch, timed by the worker\'s performance profile'
round-robin\t''
random\t''
least-loaded\t'Fewest requests in flight'"
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l kv-overlap-score-weight -d 'Weight of prefill work (uncached and queued prompt blocks) against decode blocks in the kv cost' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l router-temperature -d '0 always takes the cheapest worker; above 0 samples a softmax over normalised costs' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l router-ttl -d 'With --no-kv-events, seconds a worker is assumed to keep a prompt it was sent' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l busy-threshold -d 'In-flight requests per worker past which the frontend answers 503 with Retry-After' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l migration-limit -d 'Times a request whose worker is lost mid-stream continues on another worker (0: it fails instead)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l disagg-threshold -d 'With prefill workers up: prompts whose part not cached on their decode worker is at least this many tokens are prefilled on a prefill worker, shorter ones on the decode worker (0: every prompt)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l prefill-queue-limit -d 'Prefills in flight per prefill worker past which it takes no more; when all are full, prompts are prefilled on their decode worker rather than wait' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l disagg-itl-budget-ms -d 'With prefill workers up: a prompt is prefilled on its decode worker when moving its KV there (at the rate that worker\'s reads have gone), spread over the tokens the request may generate, would add more than this many ms to its mean time between tokens: a long prompt with a short answer (0: no limit)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l encode-queue-limit -d 'Requests with images in flight per encode worker past which it takes no more; when all are full, the worker that prefills a prompt encodes its images itself rather than wait' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l kv-events-from -d 'A vLLM, SGLang or TensorRT-LLM server this router routes to itself, with no `dynamo decode` beside it: KIND:EVENTS[,REPLAY]=URL, its KV-event publisher, optionally its replay socket, and its HTTP server (vllm:tcp://10.0.0.7:5557,tcp://10.0.0.7:5558=http://10.0.0.7:8000; TensorRT-LLM: trtllm:http://HOST:PORT/kv_cache_events=http://HOST:PORT). Once per engine; they serve --model and must answer at start. The workers discovery finds serve beside them' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l model -d 'The held engines\' model directory (tokenizer, chat template, config.json), as the engines were given it' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l served-model-name -d 'Names clients use in "model" for the held engines\' model [default: the model directory\'s name]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l block-size -d 'Tokens per KV block of the held engines (each must keep its KV in blocks of this size)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l planner -d 'Plan the cluster\'s size, forecasting traffic with this predictor: auto, constant, mavg-N, ewma-A, kalman, kalman-log1p, kalman-adaptive, kalman-adaptive-log1p (`dynamo bench planner` compares them). Workers are sized on their KV pressure (load-based scaling); the forecast is exported meanwhile' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l planner-connector -d 'Who carries the plan out: local (starts and drains `dynamo decode`/`prefill` processes on this machine, with the router\'s discovery, namespace and key, and the worker flags after `--`), kubernetes (sets the replicas of the --kube-*-deployment Deployments), or virtual (an orchestrator, which reads it on the event plane, where every plan is published)' -r -f -a "local\t''
kubernetes\t''
virtual\t''"
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l planner-interval -d 'Seconds between plans' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l min-workers -d 'Fewest decode workers' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l max-workers -d 'Most decode workers' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l min-prefill-workers -d 'Fewest prefill workers' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l max-prefill-workers -d 'Most prefill workers (0: aggregated serving, decode workers only)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l worker-budget -d 'Most workers of every role together (Dynamo\'s max GPU budget)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l scale-up-pressure -d 'KV pressure (KV needed over KV held) past which a role gets one more worker; past 1, requests queue' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l scale-down-pressure -d 'KV pressure every sample of an interval must stay under for a role to lose a worker' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l planner-profile -d 'Size each role for the latency targets from this performance profile (`dynamo profile` writes one) and the traffic forecast; load-based steps still add workers beyond that. `workers`: the profile the workers send the router (the mocker\'s own; a native worker\'s `--profile`), once one has' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l ttft-target-ms -d 'Mean time to first token the profile-based sizing aims at, in ms' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l itl-target-ms -d 'Mean time between tokens the profile-based sizing aims at, in ms' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l sla-attainment -d 'The share of requests that must meet the latency targets (0.95: 95 %); without it, their means must (as Dynamo\'s SLA planner sizes)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l drain-timeout -d 'Seconds a worker the planner stops may take to finish its requests' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l kube-api -d 'Kubernetes: the API\'s URL, e.g. `kubectl proxy`\'s http://127.0.0.1:8001 [default: the kubeconfig\'s ($KUBECONFIG, ~/.kube/config), else the pod\'s service account]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l kube-namespace -d 'Kubernetes: the namespace of the Deployments [default: the kubeconfig context\'s, or the pod\'s own]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l kube-decode-deployment -d 'Kubernetes: the Deployment of decode workers' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l kube-prefill-deployment -d 'Kubernetes: the Deployment of prefill workers (needed with --max-prefill-workers above 0)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l kube-token-file -d 'Kubernetes: a file holding a bearer token for the --kube-api URL (not needed through `kubectl proxy`)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l protect-metrics -d 'With --api-key, /metrics asks for the key too'
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l epp-insecure -d 'Serve the picker over h2c (plaintext HTTP/2) rather than TLS'
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -l no-kv-events -d 'The engines publish no KV events: route on the router\'s own past decisions instead'
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand route" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand top" -l wait -d 'Seconds to watch before printing with --once (workers answer within a heartbeat; load and request totals arrive every second)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand top" -l refresh -d 'Seconds between redraws of the live table' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand top" -l worker-timeout -d 'Seconds without an answer to the heartbeat after which a worker shows as lost' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand top" -l discovery -d 'Where roles find each other: mdns (multicast DNS on the local network, nothing to set up), mdns:PORT (the same on another UDP port), file:PATH (a TOML or JSON cluster file every machine can read; workers add and remove themselves), or k8s[:SELECTOR] (the Kubernetes API: workers write DynamoWorker records owned by their pods and are seen while ready in the EndpointSlices of the Services labelled SELECTOR, by default dynamo.rs/discovery=enabled)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand top" -l namespace -d 'Clusters sharing one network or file see only their own namespace' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand top" -l cluster-key-file -d 'File holding the cluster key (`dynamo keygen --out PATH` makes one): every plane message is sealed with it and processes without it are ignored. Without a key (nor DYNAMO_CLUSTER_KEY) the cluster is open to anyone on the network' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand top" -l once -d 'Print the table once, after watching for --wait seconds, instead of taking over the terminal'
complete -c dynamo -n "__fish_dynamo_using_subcommand top" -l json -d 'With --once: print JSON (the same facts, numbers as numbers) instead of the table'
complete -c dynamo -n "__fish_dynamo_using_subcommand top" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand top" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand top" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l model -d 'HF model directory [default: the built-in tiny-chat]' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -s o -l out -d 'Where the profile goes (JSON)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l max-prompt -d 'Longest prompt prefilled (64, 128, … up to this; never past the model\'s context length)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l max-context -d 'Longest context decoded (64, 128, … up to this)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l max-batch -d 'Largest batch decoded (1, 2, 4, … up to this, as far as the KV cache holds them)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l decode-tokens -d 'Tokens each decoding sequence generates' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l repeats -d 'Times each prefill is measured (the median counts)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l engine -d 'Engine the workers run' -r -f -a "native\t'The built-in engine: runs the model\'s weights (Llama / Mistral / Qwen2 / Qwen3 safetensors) on the CPU'
mocker\t'Simulated engine: real KV-cache bookkeeping, timing fitted to vLLM, no weights needed'
vllm\t'A running vLLM server (--engine-url), put behind this worker: its OpenAI API, KV events and metrics'
sglang\t'A running SGLang server (--engine-url): its /generate API, KV events and metrics (--enable-metrics)'
trtllm\t'A running TensorRT-LLM server (trtllm-serve, --engine-url): its OpenAI API, polled KV events, metrics'"
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l block-size -d 'Tokens per KV block' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l num-blocks -d 'KV blocks per worker [default: 16384 for the mocker; for native, what --kv-cache-gib holds]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l max-num-seqs -d 'Most requests in a worker\'s running batch [default: 256]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l max-num-batched-tokens -d 'Token budget of one engine step (prefill chunks plus decodes) [default: 8192]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l device -d 'Native: where to compute: auto (a GPU when CUDA and one are present, else the CPU), cpu, cuda or cuda:N [default: auto]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l threads -d 'Native: compute threads shared by this process\'s workers [default: the CPUs this process may use]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l kv-cache-gib -d 'Native: memory for each worker\'s KV cache, in GiB [default: 1]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l quantization -d 'Native: how the weights are held: none (as the checkpoint stores them) or int8 (symmetric, one scale per output channel, quantized at load; CPU only: about half of bf16\'s bytes to stream per token)' -r -f -a "none\t'As the checkpoint stores them (f32, bf16; f16 is widened to f32)'
int8\t'Symmetric int8 per output channel, quantized at load (CPU)'"
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l speedup -d 'Mocker: simulated time runs this many times faster than the fitted real timing [default: 1]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l kv-bytes-per-token -d 'Mocker: KV bytes per token of the simulated model; a hand-off between mockers (prefill to decode) takes as long as moving that much would [default: 131072, Llama-3-8B in bf16]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l transfer-gbps -d 'Mocker: the bandwidth of a hand-off between mockers, GB/s (measure yours with `dynamo bench transfer`) [default: 25]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l engine-url -d 'vLLM / SGLang / TensorRT-LLM: its server, http://HOST:PORT (required with those engines)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l kv-events -d 'vLLM / SGLang: its KV-event publisher (the endpoint of its --kv-events-config, e.g. tcp://HOST:5557); TensorRT-LLM: its events URL, asked every 100 ms (http://HOST:PORT/kv_cache_events). Without it the routers see no KV of this worker and route to it by load only' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l kv-events-replay -d 'vLLM / SGLang: its KV-event replay socket (replay_endpoint of --kv-events-config, e.g. tcp://HOST:5558): the worker starts from the engine\'s event history and fills gaps from it' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l engine-bootstrap-port -d 'SGLang prefill worker: the engine\'s --disaggregation-bootstrap-port, which decode engines fetch KV from' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l data-parallel-rank -d 'vLLM run with --data-parallel-size N: the rank (0..N) this worker fronts. Its KV events come from --kv-events\' port + rank (where vLLM puts that rank\'s publisher; --kv-events-replay likewise), its load from that rank\'s series, and each request is pinned to the rank (X-data-parallel-rank), so the routers see every rank\'s cache on its own. Start one worker per rank' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l engine-metrics -d 'Its Prometheus metrics [default: /metrics of --engine-url; TensorRT-LLM: /prometheus/metrics]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l profile -d 'Native and external engines: their performance profile, written by `dynamo profile` on this model and hardware, which a --router-mode latency router prices this worker by (the mocker\'s is its timing fit)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -l no-prefix-caching -d 'Turn off prefix caching (no block reuse between requests)'
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand profile" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "http" -d 'Requests/s and added latency of the HTTP frontend, against the same workers called directly'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "index" -d 'KV index under a replayed Mooncake trace: FlashIndexer against the reference index'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "route" -d 'Routing quality on a replayed trace: cached fraction, TTFT, ITL and load spread of latency vs kv vs round-robin vs random routing'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "trace" -d 'Writes a synthetic Mooncake-format trace (shared prefixes, or multi-turn conversations in bursts) for the other benches'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "disagg" -d 'Aggregated vs always-disaggregated vs conditional serving on a replayed trace, same simulated GPUs: TTFT, ITL and goodput'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "disagg-native" -d 'Aggregated vs disaggregated serving on the native engine in one process: TTFT and ITL of a mix of long and short prompts under concurrency'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "planner" -d 'Load forecasts on a trace: one-step-ahead WAPE of every predictor (constant, moving average, EWMA, Kalman) on requests, input and output tokens per interval'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "plane" -d 'KV events through the ZMQ event plane end to end, against raw libzmq PUB/SUB of the same bytes'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "epp" -d 'The Gateway API endpoint picker: picks through Envoy\'s ext_proc gRPC stream against the router\'s own pick called directly, at the same rate'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "engine" -d 'Native engine prefill and decode speed on the CPU, against the memory-bandwidth bound'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "encode" -d 'Images through a vision model\'s tower on the CPU, against the CPU\'s matrix-product peak'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "transfer" -d 'KV blocks of real model shapes moved between two processes by each transfer backend, against memcpy and raw loopback TCP of the same bytes'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "transfer-target" -d 'The other process of `bench transfer` (started by it)'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "soak" -d 'Minutes of valid, hostile and cut-off requests on `dynamo route` while workers are killed: served, refused, lost, and the router\'s memory and file descriptors from start to end'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and not __fish_seen_subcommand_from http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l concurrency -d 'Closed-loop levels: requests kept in flight' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l rate -d 'Open-loop levels: requests started per second' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l requests -d 'Requests per level and path' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l max-tokens -d 'Tokens generated per request' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l workers -d 'Mocker workers behind the frontend [default: 1]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l speedup -d 'Mocker speedup; high so the engine\'s simulated time does not hide the frontend [default: 1e6]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l engine-url -d 'A running vLLM server (or one that speaks its API): compare calling it directly with calling it through `dynamo route` and `dynamo decode --engine vllm`, started by the benchmark' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l engine -d 'With --engine-url: which engine it is (vllm, sglang or trtllm) [default: vllm]' -r -f -a "native\t'The built-in engine: runs the model\'s weights (Llama / Mistral / Qwen2 / Qwen3 safetensors) on the CPU'
mocker\t'Simulated engine: real KV-cache bookkeeping, timing fitted to vLLM, no weights needed'
vllm\t'A running vLLM server (--engine-url), put behind this worker: its OpenAI API, KV events and metrics'
sglang\t'A running SGLang server (--engine-url): its /generate API, KV events and metrics (--enable-metrics)'
trtllm\t'A running TensorRT-LLM server (trtllm-serve, --engine-url): its OpenAI API, polled KV events, metrics'"
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l model -d 'With --engine-url: the engine\'s checkpoint directory (the worker\'s --model)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l kv-events -d 'With --engine-url: the engine\'s KV-event publisher, passed to the worker' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l block-size -d 'With --engine-url: tokens per KV block of the engine' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -l json -d 'Print one JSON object on the last line as well'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from http" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from index" -l trace -d 'Mooncake-format trace (JSON lines with timestamp, input_length, output_length, hash_ids)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from index" -l workers -d 'Simulated workers the trace is routed over' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from index" -l capacity -d 'KV blocks per simulated worker (LRU eviction beyond it)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from index" -l repeat -d 'Disjoint copies of the trace to replay, for a longer run and a bigger index' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from index" -l micro-blocks -d 'Distinct blocks in the find_matches micro-benchmark (0 skips it)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from index" -l micro-workers -d 'Workers in the find_matches micro-benchmark' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from index" -l json -d 'Print one JSON object on the last line as well'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from index" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from index" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from index" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -l trace -d 'Mooncake-format trace (JSON lines with timestamp, input_length, output_length, hash_ids)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -l requests -d 'Replay only the first N requests of the trace [default: all]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -l speedup -d 'Simulated time (trace arrivals and mocker steps) runs this many times faster than real time. Steps are paced by a timer of about 1 ms real time: at 50, latencies of tens of simulated ms are noise; use 10 or below to compare those' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -l num-blocks -d 'KV blocks (of 16 tokens) per worker; the default, 1M tokens, is a 7-8B model on one 80 GB GPU' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -l block-tokens -d 'Tokens per trace block id' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -l workers -d 'Mocker workers' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -l modes -d 'Router modes compared, each on fresh workers' -r -f -a "kv\t'Lowest cost: uncached prompt blocks and queued prefill, weighed against decode load'
latency\t'Lowest predicted time to first token: the prefill of what the worker lacks, behind its queued prompts and beside its decode batch, timed by the worker\'s performance profile'
round-robin\t''
random\t''
least-loaded\t'Fewest requests in flight'"
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -l concurrency -d 'Instead of the trace\'s timestamps, a closed loop of this many clients sending the requests in trace order; several (`1,8,32`) sweep the levels, each a run of every mode' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -l json -d 'Print one JSON object on the last line as well'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from route" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from trace" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from trace" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from trace" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from trace" -f -a "shared-prefix" -d 'Shared prompt prefixes each used several times, in a shuffled order'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from trace" -f -a "conversations" -d 'Multi-turn chat sessions arriving in bursts; each turn\'s prompt is the conversation so far'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from trace" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l trace -d 'Mooncake-format trace (JSON lines with timestamp, input_length, output_length, hash_ids)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l requests -d 'Replay only the first N requests of the trace [default: all]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l speedup -d 'Simulated time (trace arrivals and mocker steps) runs this many times faster than real time. Steps are paced by a timer of about 1 ms real time: at 50, latencies of tens of simulated ms are noise; use 10 or below to compare those' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l num-blocks -d 'KV blocks (of 16 tokens) per worker; the default, 1M tokens, is a 7-8B model on one 80 GB GPU' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l block-tokens -d 'Tokens per trace block id' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l gpus -d 'Simulated GPUs (one mocker worker each) in every set-up' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l prefill-gpus -d 'Of those, prefill workers in the disaggregated set-ups [default: half]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l threshold -d 'The conditional set-up\'s --disagg-threshold: prompts whose uncached part is shorter stay on the decode worker' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l queue-limit -d 'The conditional set-up\'s --prefill-queue-limit' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l itl-budget-ms -d 'The conditional set-up\'s --disagg-itl-budget-ms, in simulated ms (0: no limit)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l ttft-target-ms -d 'A request is good if its TTFT is at most this (simulated ms) …' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l itl-target-ms -d '… and its tokens came this fast on average (simulated ms between tokens)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l transfer-gbps -d 'Bandwidth a prompt\'s KV moves at between workers, GB/s (measure yours with `dynamo bench transfer`)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l output-scale -d 'Multiplies every request\'s output length: the public trace\'s outputs are short, and how much decoding a long prefill stalls decides what disaggregation is worth' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l kv-bytes-per-token -d 'KV bytes per token of the simulated model (Llama-3-8B in bf16: 128 KiB)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -l json -d 'Print one JSON object on the last line as well'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l model -d 'HF model directory [default: the built-in tiny-chat]' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l workers -d 'Workers in each set-up (one process)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l prefill-workers -d 'Of those, prefill workers in the disaggregated set-up' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l requests -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l concurrency -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l long-tokens -d 'Tokens of a long prompt' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l short-tokens -d 'Tokens of a short prompt' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l long-every -d 'One request in this many has a long prompt' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l max-tokens -d 'Tokens each request generates' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l engine -d 'Engine the workers run' -r -f -a "native\t'The built-in engine: runs the model\'s weights (Llama / Mistral / Qwen2 / Qwen3 safetensors) on the CPU'
mocker\t'Simulated engine: real KV-cache bookkeeping, timing fitted to vLLM, no weights needed'
vllm\t'A running vLLM server (--engine-url), put behind this worker: its OpenAI API, KV events and metrics'
sglang\t'A running SGLang server (--engine-url): its /generate API, KV events and metrics (--enable-metrics)'
trtllm\t'A running TensorRT-LLM server (trtllm-serve, --engine-url): its OpenAI API, polled KV events, metrics'"
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l block-size -d 'Tokens per KV block' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l num-blocks -d 'KV blocks per worker [default: 16384 for the mocker; for native, what --kv-cache-gib holds]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l max-num-seqs -d 'Most requests in a worker\'s running batch [default: 256]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l max-num-batched-tokens -d 'Token budget of one engine step (prefill chunks plus decodes) [default: 8192]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l device -d 'Native: where to compute: auto (a GPU when CUDA and one are present, else the CPU), cpu, cuda or cuda:N [default: auto]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l threads -d 'Native: compute threads shared by this process\'s workers [default: the CPUs this process may use]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l kv-cache-gib -d 'Native: memory for each worker\'s KV cache, in GiB [default: 1]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l quantization -d 'Native: how the weights are held: none (as the checkpoint stores them) or int8 (symmetric, one scale per output channel, quantized at load; CPU only: about half of bf16\'s bytes to stream per token)' -r -f -a "none\t'As the checkpoint stores them (f32, bf16; f16 is widened to f32)'
int8\t'Symmetric int8 per output channel, quantized at load (CPU)'"
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l speedup -d 'Mocker: simulated time runs this many times faster than the fitted real timing [default: 1]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l kv-bytes-per-token -d 'Mocker: KV bytes per token of the simulated model; a hand-off between mockers (prefill to decode) takes as long as moving that much would [default: 131072, Llama-3-8B in bf16]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l transfer-gbps -d 'Mocker: the bandwidth of a hand-off between mockers, GB/s (measure yours with `dynamo bench transfer`) [default: 25]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l engine-url -d 'vLLM / SGLang / TensorRT-LLM: its server, http://HOST:PORT (required with those engines)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l kv-events -d 'vLLM / SGLang: its KV-event publisher (the endpoint of its --kv-events-config, e.g. tcp://HOST:5557); TensorRT-LLM: its events URL, asked every 100 ms (http://HOST:PORT/kv_cache_events). Without it the routers see no KV of this worker and route to it by load only' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l kv-events-replay -d 'vLLM / SGLang: its KV-event replay socket (replay_endpoint of --kv-events-config, e.g. tcp://HOST:5558): the worker starts from the engine\'s event history and fills gaps from it' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l engine-bootstrap-port -d 'SGLang prefill worker: the engine\'s --disaggregation-bootstrap-port, which decode engines fetch KV from' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l data-parallel-rank -d 'vLLM run with --data-parallel-size N: the rank (0..N) this worker fronts. Its KV events come from --kv-events\' port + rank (where vLLM puts that rank\'s publisher; --kv-events-replay likewise), its load from that rank\'s series, and each request is pinned to the rank (X-data-parallel-rank), so the routers see every rank\'s cache on its own. Start one worker per rank' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l engine-metrics -d 'Its Prometheus metrics [default: /metrics of --engine-url; TensorRT-LLM: /prometheus/metrics]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l profile -d 'Native and external engines: their performance profile, written by `dynamo profile` on this model and hardware, which a --router-mode latency router prices this worker by (the mocker\'s is its timing fit)' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l no-prefix-caching -d 'Turn off prefix caching (no block reuse between requests)'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -l json -d 'Print one JSON object on the last line as well'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from disagg-native" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l trace -d 'Mooncake JSONL (timestamp ms, input_length, output_length) or Azure CSV (TIMESTAMP, ContextTokens, GeneratedTokens) trace' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l interval -d 'Interval lengths, seconds' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l requests -d 'Replay only the first N requests of the trace [default: all]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l speedup -d 'Simulated time (trace arrivals and mocker steps) runs this many times faster than real time' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l num-blocks -d 'KV blocks (of 16 tokens) per worker' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l block-tokens -d 'Tokens per trace block id' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l max-workers -d 'Most workers, for the planner and the static pools alike' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l ttft-target-ms -d 'A request met its targets if its TTFT was at most this (simulated ms) …' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l itl-target-ms -d '… and its tokens came this fast on average (simulated ms between tokens)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l attainment -d 'The share of requests that must meet both' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l planner-interval -d 'The planner\'s interval, simulated seconds' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l startup -d 'Simulated seconds a started worker takes to join (loading its weights)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l predictor -d 'The planner\'s traffic predictor' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l simulate -d 'Instead: replay the (Mooncake) trace in simulated time on mocker workers that the planner sizes, and on static pools of them; SLA attainment and worker-hours of each'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -l json -d 'Print one JSON object on the last line as well'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from planner" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from plane" -l messages -d 'Messages to send on each path' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from plane" -l events-per-message -d 'KV events per message (a worker publishes one batch per engine step)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from plane" -l rounds -d 'Alternating rounds of each plane and raw libzmq; the median of each is reported' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from plane" -l requests -d 'Requests to stream through each request-plane path (64 in flight at once)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from plane" -l tokens -d 'Outputs (one token each) streamed back per request' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from plane" -l cluster-key -d 'Seal both planes\' messages with a cluster key, as `--cluster-key-file` does (the raw paths stay clear)'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from plane" -l json -d 'Print one JSON object on the last line as well'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from plane" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from plane" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from plane" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from epp" -l rate -d 'Picks started per second (open loop)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from epp" -l picks -d 'Picks per round and path' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from epp" -l rounds -d 'Rounds, each path in turn; the medians are reported' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from epp" -l workers -d 'Mocker workers the router picks among' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from epp" -l prompt-words -d 'Words of each request\'s prompt' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from epp" -l json -d 'Print one JSON object on the last line'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from epp" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from epp" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from epp" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -l model -d 'HF checkpoint directory [default: a generated random SmolLM2-135M-shaped bf16 model]' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -l threads -d 'Compute threads [default: the CPUs this process may use]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -l device -d 'Where to run: auto, cpu, cuda or cuda:N (the bandwidth and compute ceilings are measured on the CPU only)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -l prompt-tokens -d 'Prompt lengths to prefill' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -l batch -d 'Decode batch sizes (batch 1 first: the others are compared with it)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -l temperature -d 'Sampling temperatures to decode at, each with every batch size (0 is greedy, the others are compared with it)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -l decode-steps -d 'Timed decode steps per batch size' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -l repeats -d 'Prefill runs per prompt length' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -l quantization -d 'How the weights are held, each measured in turn: none (the checkpoint\'s), int8' -r -f -a "none\t'As the checkpoint stores them (f32, bf16; f16 is widened to f32)'
int8\t'Symmetric int8 per output channel, quantized at load (CPU)'"
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -l structured -d 'Also decode each batch held to a JSON schema (structured output) and compare with it free ("× free")'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -l json -d 'Print one JSON object on the last line as well'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from engine" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from encode" -l model -d 'LLaVA-style checkpoint directory [default: a generated random LLaVA-1.5-shaped vision tower, bf16]' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from encode" -l threads -d 'Compute threads [default: the CPUs this process may use]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from encode" -l batch -d 'Images per pass through the tower' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from encode" -l rounds -d 'Timed passes' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from encode" -l text-streams -d 'Text requests decoding while images arrive, aggregated and with an encode worker (0 skips that part)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from encode" -l images -d 'Image requests that arrive, one after another, while the text requests decode' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from encode" -l json -d 'Also print the result as one JSON object on the last line'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from encode" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from encode" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from encode" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer" -l backend -d 'Backends to measure' -r -f -a "shm\t''
tcp\t''
nixl\t'NVIDIA\'s NIXL (UCX), where libnixl_capi.so can be loaded; reported as unavailable otherwise'"
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer" -l blocks -d 'KV blocks moved per request, of each model shape (SmolLM2-135M and Llama-3-8B)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer" -l layout -d 'How KV pages lie in memory' -r -f -a "layered\t'The engine\'s: a region of pages per layer for K and one for V; a block is one page in each'
contiguous\t'One region, each block\'s bytes contiguous: the best case'"
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer" -l rounds -d 'Timed rounds of each path; the median is reported' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer" -l latency-requests -d 'One-block requests timed for the latency percentiles' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer" -l streams -d 'Data connections of the tcp backend, and of the several-stream raw TCP reference' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer" -l sealed -d 'Both processes hold a fresh cluster key, as a keyed cluster\'s workers do: tcp\'s bytes are encrypted (the raw TCP references stay clear, so their ratio is what sealing costs)'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer" -l json -d 'Print one JSON object on the last line as well'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer-target" -l layout -r -f -a "layered\t'The engine\'s: a region of pages per layer for K and one for V; a block is one page in each'
contiguous\t'One region, each block\'s bytes contiguous: the best case'"
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer-target" -l blocks -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer-target" -l nixl -d 'Run NIXL too'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer-target" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer-target" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from transfer-target" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from soak" -l minutes -d 'How long the load runs' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from soak" -l workers -d 'Mocker workers, each its own `dynamo decode` process' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from soak" -l rate -d 'Requests started per second, of every kind' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from soak" -l kill-every -d 'Seconds between worker kills (SIGKILL, then a new worker in its place)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from soak" -l speedup -d 'Mocker speedup' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from soak" -l seed -d 'Seed of the request mix and of which worker is killed' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from soak" -l json -d 'Print one JSON object on the last line as well'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from soak" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from soak" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from soak" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "http" -d 'Requests/s and added latency of the HTTP frontend, against the same workers called directly'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "index" -d 'KV index under a replayed Mooncake trace: FlashIndexer against the reference index'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "route" -d 'Routing quality on a replayed trace: cached fraction, TTFT, ITL and load spread of latency vs kv vs round-robin vs random routing'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "trace" -d 'Writes a synthetic Mooncake-format trace (shared prefixes, or multi-turn conversations in bursts) for the other benches'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "disagg" -d 'Aggregated vs always-disaggregated vs conditional serving on a replayed trace, same simulated GPUs: TTFT, ITL and goodput'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "disagg-native" -d 'Aggregated vs disaggregated serving on the native engine in one process: TTFT and ITL of a mix of long and short prompts under concurrency'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "planner" -d 'Load forecasts on a trace: one-step-ahead WAPE of every predictor (constant, moving average, EWMA, Kalman) on requests, input and output tokens per interval'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "plane" -d 'KV events through the ZMQ event plane end to end, against raw libzmq PUB/SUB of the same bytes'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "epp" -d 'The Gateway API endpoint picker: picks through Envoy\'s ext_proc gRPC stream against the router\'s own pick called directly, at the same rate'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "engine" -d 'Native engine prefill and decode speed on the CPU, against the memory-bandwidth bound'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "encode" -d 'Images through a vision model\'s tower on the CPU, against the CPU\'s matrix-product peak'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "transfer" -d 'KV blocks of real model shapes moved between two processes by each transfer backend, against memcpy and raw loopback TCP of the same bytes'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "transfer-target" -d 'The other process of `bench transfer` (started by it)'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "soak" -d 'Minutes of valid, hostile and cut-off requests on `dynamo route` while workers are killed: served, refused, lost, and the router\'s memory and file descriptors from start to end'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c dynamo -n "__fish_dynamo_using_subcommand selftest" -l device -d 'Device to check: cuda or cuda:N' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand selftest" -l model -d 'Also compare the forward pass of this checkpoint (repeatable); the built-in model is always compared' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand selftest" -l threads -d 'CPU threads for the reference side' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand selftest" -l compile-only -d 'Only compile the CUDA kernels with NVRTC (needs libnvrtc, no GPU)'
complete -c dynamo -n "__fish_dynamo_using_subcommand selftest" -l json -d 'Print one JSON object on the last line as well'
complete -c dynamo -n "__fish_dynamo_using_subcommand selftest" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand selftest" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand selftest" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand keygen" -l out -d 'Write the key to this file, readable by its owner only (it must not exist yet) [default: print it]' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand keygen" -l sign -d 'Instead of a new key: print the `mac` of a cluster-file entry for this request address, signed with the cluster key (--cluster-key-file or DYNAMO_CLUSTER_KEY)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand keygen" -l namespace -d 'With --sign: the entry\'s namespace [default: none, an entry every namespace sees]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand keygen" -l cluster-key-file -d 'File holding the cluster key (`dynamo keygen --out PATH` makes one): every plane message is sealed with it and processes without it are ignored. Without a key (nor DYNAMO_CLUSTER_KEY) the cluster is open to anyone on the network' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand keygen" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand keygen" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand keygen" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand completions" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand completions" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand completions" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "run" -d 'Run everything in one process: OpenAI HTTP frontend, router and workers'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "decode" -d 'Start a worker (prefill and decode in one) that registers itself and serves requests from routers'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "prefill" -d 'Start a worker that only prefills prompts and hands their KV to decode workers (disaggregated serving)'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "encode" -d 'Start a worker that runs only a vision model\'s image encoder and hands images\' embeddings to the workers that prefill their prompts (those need --kv-transfer, or to be prefill workers)'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "route" -d 'Start the OpenAI HTTP frontend and router in front of the workers discovery finds'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "top" -d 'Watch every worker of a namespace live: state, load, KV cache, requests'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "profile" -d 'Write a worker\'s performance profile (prefill time by prompt length, time between tokens by batch and context) for the planner\'s profile-based sizing: the mocker\'s from its timing fit, others measured'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "bench" -d 'Measure performance; each benchmark compares against a reference in the same run'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "selftest" -d 'Check the CUDA backend against the CPU backend (or, with --compile-only, just compile its kernels)'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "keygen" -d 'Make a cluster key: with it, roles seal every plane message and ignore processes without it'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "completions" -d 'Print shell completions (bash, zsh, fish, …) to stdout'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run decode prefill encode route top profile bench selftest keygen completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "http" -d 'Requests/s and added latency of the HTTP frontend, against the same workers called directly'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "index" -d 'KV index under a replayed Mooncake trace: FlashIndexer against the reference index'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "route" -d 'Routing quality on a replayed trace: cached fraction, TTFT, ITL and load spread of latency vs kv vs round-robin vs random routing'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "trace" -d 'Writes a synthetic Mooncake-format trace (shared prefixes, or multi-turn conversations in bursts) for the other benches'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "disagg" -d 'Aggregated vs always-disaggregated vs conditional serving on a replayed trace, same simulated GPUs: TTFT, ITL and goodput'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "disagg-native" -d 'Aggregated vs disaggregated serving on the native engine in one process: TTFT and ITL of a mix of long and short prompts under concurrency'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "planner" -d 'Load forecasts on a trace: one-step-ahead WAPE of every predictor (constant, moving average, EWMA, Kalman) on requests, input and output tokens per interval'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "plane" -d 'KV events through the ZMQ event plane end to end, against raw libzmq PUB/SUB of the same bytes'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "epp" -d 'The Gateway API endpoint picker: picks through Envoy\'s ext_proc gRPC stream against the router\'s own pick called directly, at the same rate'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "engine" -d 'Native engine prefill and decode speed on the CPU, against the memory-bandwidth bound'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "encode" -d 'Images through a vision model\'s tower on the CPU, against the CPU\'s matrix-product peak'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "transfer" -d 'KV blocks of real model shapes moved between two processes by each transfer backend, against memcpy and raw loopback TCP of the same bytes'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "transfer-target" -d 'The other process of `bench transfer` (started by it)'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and __fish_seen_subcommand_from bench" -f -a "soak" -d 'Minutes of valid, hostile and cut-off requests on `dynamo route` while workers are killed: served, refused, lost, and the router\'s memory and file descriptors from start to end'
