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
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "bench" -d 'Measure performance; each benchmark compares against a reference in the same run'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "completions" -d 'Print shell completions (bash, zsh, fish, …) to stdout'
complete -c dynamo -n "__fish_dynamo_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l model -d 'HF model directory (config.json, tokenizer.json, tokenizer_config.json) [default: the built-in tiny-chat]' -r -F
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l served-model-name -d 'Name clients use in "model" [default: the model directory\'s name]' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l engine -d 'Engine the workers run' -r -f -a "mocker\t'Simulated engine: real KV-cache bookkeeping, timing fitted to vLLM, no weights needed'"
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l workers -d 'In-process workers' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l http-host -d 'Address the OpenAI HTTP frontend listens on' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l http-port -d 'Port of the OpenAI HTTP frontend (0 picks a free one)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l busy-threshold -d 'In-flight requests per worker past which the frontend answers 503 with Retry-After' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l speedup -d 'Simulated time runs this many times faster than the fitted real timing' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l block-size -d 'Tokens per KV block' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l num-blocks -d 'KV blocks per worker' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l max-num-seqs -d 'Most requests in a worker\'s running batch' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l max-num-batched-tokens -d 'Token budget of one engine step (prefill chunks plus decodes)' -r
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -l no-prefix-caching -d 'Turn off prefix caching (no block reuse between requests)'
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c dynamo -n "__fish_dynamo_using_subcommand run" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand bench" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand completions" -s v -l verbose -d 'More log output (-v debug, -vv trace); RUST_LOG or DYNAMO_LOG override it'
complete -c dynamo -n "__fish_dynamo_using_subcommand completions" -s h -l help -d 'Print help'
complete -c dynamo -n "__fish_dynamo_using_subcommand completions" -s V -l version -d 'Print version'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run bench completions help" -f -a "run" -d 'Run everything in one process: OpenAI HTTP frontend, router and workers'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run bench completions help" -f -a "bench" -d 'Measure performance; each benchmark compares against a reference in the same run'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run bench completions help" -f -a "completions" -d 'Print shell completions (bash, zsh, fish, …) to stdout'
complete -c dynamo -n "__fish_dynamo_using_subcommand help; and not __fish_seen_subcommand_from run bench completions help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
