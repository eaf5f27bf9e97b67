_dynamo() {
    local i cur prev opts cmd
    COMPREPLY=()
    if [[ "${BASH_VERSINFO[0]}" -ge 4 ]]; then
        cur="$2"
    else
        cur="${COMP_WORDS[COMP_CWORD]}"
    fi
    prev="$3"
    cmd=""
    opts=""

    for i in "${COMP_WORDS[@]:0:COMP_CWORD}"
    do
        case "${cmd},${i}" in
            ",$1")
                cmd="dynamo"
                ;;
            dynamo,bench)
                cmd="dynamo__subcmd__bench"
                ;;
            dynamo,completions)
                cmd="dynamo__subcmd__completions"
                ;;
            dynamo,decode)
                cmd="dynamo__subcmd__decode"
                ;;
            dynamo,encode)
                cmd="dynamo__subcmd__encode"
                ;;
            dynamo,help)
                cmd="dynamo__subcmd__help"
                ;;
            dynamo,keygen)
                cmd="dynamo__subcmd__keygen"
                ;;
            dynamo,prefill)
                cmd="dynamo__subcmd__prefill"
                ;;
            dynamo,profile)
                cmd="dynamo__subcmd__profile"
                ;;
            dynamo,route)
                cmd="dynamo__subcmd__route"
                ;;
            dynamo,run)
                cmd="dynamo__subcmd__run"
                ;;
            dynamo,selftest)
                cmd="dynamo__subcmd__selftest"
                ;;
            dynamo,top)
                cmd="dynamo__subcmd__top"
                ;;
            dynamo__subcmd__bench,disagg)
                cmd="dynamo__subcmd__bench__subcmd__disagg"
                ;;
            dynamo__subcmd__bench,disagg-native)
                cmd="dynamo__subcmd__bench__subcmd__disagg__subcmd__native"
                ;;
            dynamo__subcmd__bench,encode)
                cmd="dynamo__subcmd__bench__subcmd__encode"
                ;;
            dynamo__subcmd__bench,engine)
                cmd="dynamo__subcmd__bench__subcmd__engine"
                ;;
            dynamo__subcmd__bench,epp)
                cmd="dynamo__subcmd__bench__subcmd__epp"
                ;;
            dynamo__subcmd__bench,help)
                cmd="dynamo__subcmd__bench__subcmd__help"
                ;;
            dynamo__subcmd__bench,http)
                cmd="dynamo__subcmd__bench__subcmd__http"
                ;;
            dynamo__subcmd__bench,index)
                cmd="dynamo__subcmd__bench__subcmd__index"
                ;;
            dynamo__subcmd__bench,plane)
                cmd="dynamo__subcmd__bench__subcmd__plane"
                ;;
            dynamo__subcmd__bench,planner)
                cmd="dynamo__subcmd__bench__subcmd__planner"
                ;;
            dynamo__subcmd__bench,route)
                cmd="dynamo__subcmd__bench__subcmd__route"
                ;;
            dynamo__subcmd__bench,soak)
                cmd="dynamo__subcmd__bench__subcmd__soak"
                ;;
            dynamo__subcmd__bench,trace)
                cmd="dynamo__subcmd__bench__subcmd__trace"
                ;;
            dynamo__subcmd__bench,transfer)
                cmd="dynamo__subcmd__bench__subcmd__transfer"
                ;;
            dynamo__subcmd__bench,transfer-target)
                cmd="dynamo__subcmd__bench__subcmd__transfer__subcmd__target"
                ;;
            dynamo__subcmd__bench__subcmd__help,disagg)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__disagg"
                ;;
            dynamo__subcmd__bench__subcmd__help,disagg-native)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__disagg__subcmd__native"
                ;;
            dynamo__subcmd__bench__subcmd__help,encode)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__encode"
                ;;
            dynamo__subcmd__bench__subcmd__help,engine)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__engine"
                ;;
            dynamo__subcmd__bench__subcmd__help,epp)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__epp"
                ;;
            dynamo__subcmd__bench__subcmd__help,help)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__help"
                ;;
            dynamo__subcmd__bench__subcmd__help,http)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__http"
                ;;
            dynamo__subcmd__bench__subcmd__help,index)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__index"
                ;;
            dynamo__subcmd__bench__subcmd__help,plane)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__plane"
                ;;
            dynamo__subcmd__bench__subcmd__help,planner)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__planner"
                ;;
            dynamo__subcmd__bench__subcmd__help,route)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__route"
                ;;
            dynamo__subcmd__bench__subcmd__help,soak)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__soak"
                ;;
            dynamo__subcmd__bench__subcmd__help,trace)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__trace"
                ;;
            dynamo__subcmd__bench__subcmd__help,transfer)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__transfer"
                ;;
            dynamo__subcmd__bench__subcmd__help,transfer-target)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__transfer__subcmd__target"
                ;;
            dynamo__subcmd__bench__subcmd__help__subcmd__trace,conversations)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__trace__subcmd__conversations"
                ;;
            dynamo__subcmd__bench__subcmd__help__subcmd__trace,shared-prefix)
                cmd="dynamo__subcmd__bench__subcmd__help__subcmd__trace__subcmd__shared__subcmd__prefix"
                ;;
            dynamo__subcmd__bench__subcmd__trace,conversations)
                cmd="dynamo__subcmd__bench__subcmd__trace__subcmd__conversations"
                ;;
            dynamo__subcmd__bench__subcmd__trace,help)
                cmd="dynamo__subcmd__bench__subcmd__trace__subcmd__help"
                ;;
            dynamo__subcmd__bench__subcmd__trace,shared-prefix)
                cmd="dynamo__subcmd__bench__subcmd__trace__subcmd__shared__subcmd__prefix"
                ;;
            dynamo__subcmd__bench__subcmd__trace__subcmd__help,conversations)
                cmd="dynamo__subcmd__bench__subcmd__trace__subcmd__help__subcmd__conversations"
                ;;
            dynamo__subcmd__bench__subcmd__trace__subcmd__help,help)
                cmd="dynamo__subcmd__bench__subcmd__trace__subcmd__help__subcmd__help"
                ;;
            dynamo__subcmd__bench__subcmd__trace__subcmd__help,shared-prefix)
                cmd="dynamo__subcmd__bench__subcmd__trace__subcmd__help__subcmd__shared__subcmd__prefix"
                ;;
            dynamo__subcmd__help,bench)
                cmd="dynamo__subcmd__help__subcmd__bench"
                ;;
            dynamo__subcmd__help,completions)
                cmd="dynamo__subcmd__help__subcmd__completions"
                ;;
            dynamo__subcmd__help,decode)
                cmd="dynamo__subcmd__help__subcmd__decode"
                ;;
            dynamo__subcmd__help,encode)
                cmd="dynamo__subcmd__help__subcmd__encode"
                ;;
            dynamo__subcmd__help,help)
                cmd="dynamo__subcmd__help__subcmd__help"
                ;;
            dynamo__subcmd__help,keygen)
                cmd="dynamo__subcmd__help__subcmd__keygen"
                ;;
            dynamo__subcmd__help,prefill)
                cmd="dynamo__subcmd__help__subcmd__prefill"
                ;;
            dynamo__subcmd__help,profile)
                cmd="dynamo__subcmd__help__subcmd__profile"
                ;;
            dynamo__subcmd__help,route)
                cmd="dynamo__subcmd__help__subcmd__route"
                ;;
            dynamo__subcmd__help,run)
                cmd="dynamo__subcmd__help__subcmd__run"
                ;;
            dynamo__subcmd__help,selftest)
                cmd="dynamo__subcmd__help__subcmd__selftest"
                ;;
            dynamo__subcmd__help,top)
                cmd="dynamo__subcmd__help__subcmd__top"
                ;;
            dynamo__subcmd__help__subcmd__bench,disagg)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__disagg"
                ;;
            dynamo__subcmd__help__subcmd__bench,disagg-native)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__disagg__subcmd__native"
                ;;
            dynamo__subcmd__help__subcmd__bench,encode)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__encode"
                ;;
            dynamo__subcmd__help__subcmd__bench,engine)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__engine"
                ;;
            dynamo__subcmd__help__subcmd__bench,epp)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__epp"
                ;;
            dynamo__subcmd__help__subcmd__bench,http)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__http"
                ;;
            dynamo__subcmd__help__subcmd__bench,index)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__index"
                ;;
            dynamo__subcmd__help__subcmd__bench,plane)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__plane"
                ;;
            dynamo__subcmd__help__subcmd__bench,planner)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__planner"
                ;;
            dynamo__subcmd__help__subcmd__bench,route)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__route"
                ;;
            dynamo__subcmd__help__subcmd__bench,soak)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__soak"
                ;;
            dynamo__subcmd__help__subcmd__bench,trace)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__trace"
                ;;
            dynamo__subcmd__help__subcmd__bench,transfer)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__transfer"
                ;;
            dynamo__subcmd__help__subcmd__bench,transfer-target)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__transfer__subcmd__target"
                ;;
            dynamo__subcmd__help__subcmd__bench__subcmd__trace,conversations)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__trace__subcmd__conversations"
                ;;
            dynamo__subcmd__help__subcmd__bench__subcmd__trace,shared-prefix)
                cmd="dynamo__subcmd__help__subcmd__bench__subcmd__trace__subcmd__shared__subcmd__prefix"
                ;;
            *)
                ;;
        esac
    done

    case "${cmd}" in
        dynamo)
            opts="-v -h -V --verbose --help --version run decode prefill encode route top profile bench selftest keygen completions help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 1 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench)
            opts="-v -h -V --verbose --help --version http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__disagg)
            opts="-v -h -V --trace --requests --speedup --num-blocks --block-tokens --gpus --prefill-gpus --threshold --queue-limit --itl-budget-ms --ttft-target-ms --itl-target-ms --transfer-gbps --output-scale --kv-bytes-per-token --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --trace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --requests)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --speedup)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-blocks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --block-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --gpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --prefill-gpus)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --threshold)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --queue-limit)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --itl-budget-ms)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ttft-target-ms)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --itl-target-ms)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-gbps)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --output-scale)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-bytes-per-token)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__disagg__subcmd__native)
            opts="-v -h -V --model --workers --prefill-workers --requests --concurrency --long-tokens --short-tokens --long-every --max-tokens --engine --block-size --num-blocks --max-num-seqs --max-num-batched-tokens --no-prefix-caching --device --threads --kv-cache-gib --quantization --speedup --kv-bytes-per-token --transfer-gbps --engine-url --kv-events --kv-events-replay --engine-bootstrap-port --data-parallel-rank --engine-metrics --profile --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --model)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --prefill-workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --requests)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --concurrency)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --long-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --short-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --long-every)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine)
                    COMPREPLY=($(compgen -W "native mocker vllm sglang trtllm" -- "${cur}"))
                    return 0
                    ;;
                --block-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-blocks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-num-seqs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-num-batched-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --device)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --threads)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-cache-gib)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --quantization)
                    COMPREPLY=($(compgen -W "none int8" -- "${cur}"))
                    return 0
                    ;;
                --speedup)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-bytes-per-token)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-gbps)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events-replay)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-bootstrap-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --data-parallel-rank)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-metrics)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --profile)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__encode)
            opts="-v -h -V --model --threads --batch --rounds --text-streams --images --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --model)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --threads)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --batch)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --rounds)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --text-streams)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --images)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__engine)
            opts="-v -h -V --model --threads --device --prompt-tokens --batch --temperature --decode-steps --repeats --structured --quantization --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --model)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --threads)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --device)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --prompt-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --batch)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --temperature)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --decode-steps)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --repeats)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --quantization)
                    COMPREPLY=($(compgen -W "none int8" -- "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__epp)
            opts="-v -h -V --rate --picks --rounds --workers --prompt-words --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --picks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --rounds)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --prompt-words)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help)
            opts="http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__disagg)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__disagg__subcmd__native)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__encode)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__engine)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__epp)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__http)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__index)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__plane)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__planner)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__route)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__soak)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__trace)
            opts="shared-prefix conversations"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__trace__subcmd__conversations)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__trace__subcmd__shared__subcmd__prefix)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__transfer)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__help__subcmd__transfer__subcmd__target)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__http)
            opts="-v -h -V --concurrency --rate --requests --max-tokens --workers --speedup --engine-url --engine --model --kv-events --block-size --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --concurrency)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --requests)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --speedup)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine)
                    COMPREPLY=($(compgen -W "native mocker vllm sglang trtllm" -- "${cur}"))
                    return 0
                    ;;
                --model)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --block-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__index)
            opts="-v -h -V --trace --workers --capacity --repeat --micro-blocks --micro-workers --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --trace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --capacity)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --repeat)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --micro-blocks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --micro-workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__plane)
            opts="-v -h -V --messages --events-per-message --rounds --requests --tokens --cluster-key --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --messages)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --events-per-message)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --rounds)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --requests)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__planner)
            opts="-v -h -V --trace --interval --simulate --requests --speedup --num-blocks --block-tokens --max-workers --ttft-target-ms --itl-target-ms --attainment --planner-interval --startup --predictor --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --trace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --requests)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --speedup)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-blocks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --block-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ttft-target-ms)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --itl-target-ms)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --attainment)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --planner-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --startup)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --predictor)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__route)
            opts="-v -h -V --trace --requests --speedup --num-blocks --block-tokens --workers --modes --concurrency --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --trace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --requests)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --speedup)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-blocks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --block-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --modes)
                    COMPREPLY=($(compgen -W "kv latency round-robin random least-loaded" -- "${cur}"))
                    return 0
                    ;;
                --concurrency)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__soak)
            opts="-v -h -V --minutes --workers --rate --kill-every --speedup --seed --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --minutes)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kill-every)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --speedup)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --seed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__trace)
            opts="-v -h -V --verbose --help --version shared-prefix conversations help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__trace__subcmd__conversations)
            opts="-o -v -h -V --sessions --rate --burst --mean-turns --system-prompts --system-tokens --mean-user-tokens --mean-output-tokens --mean-think-s --max-context --block-tokens --seed --out --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --sessions)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --rate)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --burst)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --mean-turns)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --system-prompts)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --system-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --mean-user-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --mean-output-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --mean-think-s)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-context)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --block-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --seed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --out)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -o)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__trace__subcmd__help)
            opts="shared-prefix conversations help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__trace__subcmd__help__subcmd__conversations)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__trace__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__trace__subcmd__help__subcmd__shared__subcmd__prefix)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__trace__subcmd__shared__subcmd__prefix)
            opts="-o -v -h -V --prefixes --uses --prefix-tokens --suffix-tokens --output-tokens --block-tokens --seed --out --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --prefixes)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --uses)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --prefix-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --suffix-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --output-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --block-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --seed)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --out)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -o)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__transfer)
            opts="-v -h -V --backend --blocks --layout --rounds --latency-requests --streams --sealed --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --backend)
                    COMPREPLY=($(compgen -W "shm tcp nixl" -- "${cur}"))
                    return 0
                    ;;
                --blocks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --layout)
                    COMPREPLY=($(compgen -W "layered contiguous" -- "${cur}"))
                    return 0
                    ;;
                --rounds)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --latency-requests)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --streams)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__bench__subcmd__transfer__subcmd__target)
            opts="-v -h -V --layout --blocks --nixl --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --layout)
                    COMPREPLY=($(compgen -W "layered contiguous" -- "${cur}"))
                    return 0
                    ;;
                --blocks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__completions)
            opts="-v -h -V --verbose --help --version bash elvish fish powershell zsh"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__decode)
            opts="-v -h -V --model --served-model-name --max-model-len --chat-template --host --request-port --event-port --max-in-flight --drain-timeout --metrics-port --http-addr --kv-transfer --transfer-port --transfer-backend --transfer-streams --kv-lease --discovery --namespace --cluster-key-file --engine --block-size --num-blocks --max-num-seqs --max-num-batched-tokens --no-prefix-caching --device --threads --kv-cache-gib --quantization --speedup --kv-bytes-per-token --transfer-gbps --engine-url --kv-events --kv-events-replay --engine-bootstrap-port --data-parallel-rank --engine-metrics --profile --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --model)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --served-model-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-model-len)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --chat-template)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --host)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --request-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --event-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-in-flight)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --drain-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --metrics-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --http-addr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-backend)
                    COMPREPLY=($(compgen -W "auto shm tcp nixl" -- "${cur}"))
                    return 0
                    ;;
                --transfer-streams)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-lease)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --discovery)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --namespace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cluster-key-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine)
                    COMPREPLY=($(compgen -W "native mocker vllm sglang trtllm" -- "${cur}"))
                    return 0
                    ;;
                --block-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-blocks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-num-seqs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-num-batched-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --device)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --threads)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-cache-gib)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --quantization)
                    COMPREPLY=($(compgen -W "none int8" -- "${cur}"))
                    return 0
                    ;;
                --speedup)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-bytes-per-token)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-gbps)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events-replay)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-bootstrap-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --data-parallel-rank)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-metrics)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --profile)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__encode)
            opts="-v -h -V --model --served-model-name --max-model-len --chat-template --host --request-port --event-port --max-in-flight --drain-timeout --metrics-port --http-addr --transfer-port --transfer-backend --transfer-streams --encode-cache-mib --embeddings-lease --device --threads --discovery --namespace --cluster-key-file --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --model)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --served-model-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-model-len)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --chat-template)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --host)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --request-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --event-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-in-flight)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --drain-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --metrics-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --http-addr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-backend)
                    COMPREPLY=($(compgen -W "auto shm tcp nixl" -- "${cur}"))
                    return 0
                    ;;
                --transfer-streams)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --encode-cache-mib)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --embeddings-lease)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --device)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --threads)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --discovery)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --namespace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cluster-key-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help)
            opts="run decode prefill encode route top profile bench selftest keygen completions help"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench)
            opts="http index route trace disagg disagg-native planner plane epp engine encode transfer transfer-target soak"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__disagg)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__disagg__subcmd__native)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__encode)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__engine)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__epp)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__http)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__index)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__plane)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__planner)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__route)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__soak)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__trace)
            opts="shared-prefix conversations"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__trace__subcmd__conversations)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__trace__subcmd__shared__subcmd__prefix)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 5 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__transfer)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__bench__subcmd__transfer__subcmd__target)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 4 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__completions)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__decode)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__encode)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__help)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__keygen)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__prefill)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__profile)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__route)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__run)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__selftest)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__help__subcmd__top)
            opts=""
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 3 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__keygen)
            opts="-v -h -V --out --sign --namespace --cluster-key-file --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --out)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --sign)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --namespace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cluster-key-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__prefill)
            opts="-v -h -V --model --served-model-name --max-model-len --chat-template --host --request-port --event-port --max-in-flight --drain-timeout --metrics-port --http-addr --kv-transfer --transfer-port --transfer-backend --transfer-streams --kv-lease --discovery --namespace --cluster-key-file --engine --block-size --num-blocks --max-num-seqs --max-num-batched-tokens --no-prefix-caching --device --threads --kv-cache-gib --quantization --speedup --kv-bytes-per-token --transfer-gbps --engine-url --kv-events --kv-events-replay --engine-bootstrap-port --data-parallel-rank --engine-metrics --profile --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --model)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --served-model-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-model-len)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --chat-template)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --host)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --request-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --event-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-in-flight)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --drain-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --metrics-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --http-addr)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-backend)
                    COMPREPLY=($(compgen -W "auto shm tcp nixl" -- "${cur}"))
                    return 0
                    ;;
                --transfer-streams)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-lease)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --discovery)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --namespace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cluster-key-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine)
                    COMPREPLY=($(compgen -W "native mocker vllm sglang trtllm" -- "${cur}"))
                    return 0
                    ;;
                --block-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-blocks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-num-seqs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-num-batched-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --device)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --threads)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-cache-gib)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --quantization)
                    COMPREPLY=($(compgen -W "none int8" -- "${cur}"))
                    return 0
                    ;;
                --speedup)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-bytes-per-token)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-gbps)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events-replay)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-bootstrap-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --data-parallel-rank)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-metrics)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --profile)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__profile)
            opts="-o -v -h -V --model --out --max-prompt --max-context --max-batch --decode-tokens --repeats --engine --block-size --num-blocks --max-num-seqs --max-num-batched-tokens --no-prefix-caching --device --threads --kv-cache-gib --quantization --speedup --kv-bytes-per-token --transfer-gbps --engine-url --kv-events --kv-events-replay --engine-bootstrap-port --data-parallel-rank --engine-metrics --profile --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --model)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --out)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                -o)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-prompt)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-context)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-batch)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --decode-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --repeats)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine)
                    COMPREPLY=($(compgen -W "native mocker vllm sglang trtllm" -- "${cur}"))
                    return 0
                    ;;
                --block-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-blocks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-num-seqs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-num-batched-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --device)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --threads)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-cache-gib)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --quantization)
                    COMPREPLY=($(compgen -W "none int8" -- "${cur}"))
                    return 0
                    ;;
                --speedup)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-bytes-per-token)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-gbps)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events-replay)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-bootstrap-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --data-parallel-rank)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-metrics)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --profile)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__route)
            opts="-v -h -V --host --http-host --port --http-port --api-key --protect-metrics --allowed-origin --tool-call-parser --max-request-bytes --max-connections --http-header-timeout --http-body-timeout --limit-images-per-prompt --allowed-local-media-path --allowed-media-domains --media-fetch-timeout --epp-port --epp-health-port --epp-insecure --epp-cert-file --epp-key-file --worker-timeout --discovery --namespace --cluster-key-file --router-mode --kv-overlap-score-weight --router-temperature --no-kv-events --router-ttl --busy-threshold --migration-limit --disagg-threshold --prefill-queue-limit --disagg-itl-budget-ms --encode-queue-limit --kv-events-from --model --served-model-name --block-size --planner --planner-connector --planner-interval --min-workers --max-workers --min-prefill-workers --max-prefill-workers --worker-budget --scale-up-pressure --scale-down-pressure --planner-profile --ttft-target-ms --itl-target-ms --sla-attainment --drain-timeout --kube-api --kube-namespace --kube-decode-deployment --kube-prefill-deployment --kube-token-file --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --http-host)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --host)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --http-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --api-key)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allowed-origin)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --tool-call-parser)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-request-bytes)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-connections)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --http-header-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --http-body-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --limit-images-per-prompt)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allowed-local-media-path)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allowed-media-domains)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --media-fetch-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --epp-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --epp-health-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --epp-cert-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --epp-key-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --worker-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --discovery)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --namespace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cluster-key-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --router-mode)
                    COMPREPLY=($(compgen -W "kv latency round-robin random least-loaded" -- "${cur}"))
                    return 0
                    ;;
                --kv-overlap-score-weight)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --router-temperature)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --router-ttl)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --busy-threshold)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --migration-limit)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disagg-threshold)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --prefill-queue-limit)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disagg-itl-budget-ms)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --encode-queue-limit)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events-from)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --model)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --served-model-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --block-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --planner)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --planner-connector)
                    COMPREPLY=($(compgen -W "local kubernetes virtual" -- "${cur}"))
                    return 0
                    ;;
                --planner-interval)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --min-workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --min-prefill-workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-prefill-workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --worker-budget)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --scale-up-pressure)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --scale-down-pressure)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --planner-profile)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --ttft-target-ms)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --itl-target-ms)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --sla-attainment)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --drain-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kube-api)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kube-namespace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kube-decode-deployment)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kube-prefill-deployment)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kube-token-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__run)
            opts="-v -h -V --model --served-model-name --max-model-len --chat-template --workers --prefill-workers --encode-workers --host --http-host --port --http-port --api-key --protect-metrics --allowed-origin --tool-call-parser --max-request-bytes --max-connections --http-header-timeout --http-body-timeout --limit-images-per-prompt --allowed-local-media-path --allowed-media-domains --media-fetch-timeout --discovery --namespace --cluster-key-file --router-mode --kv-overlap-score-weight --router-temperature --no-kv-events --router-ttl --busy-threshold --migration-limit --disagg-threshold --prefill-queue-limit --disagg-itl-budget-ms --encode-queue-limit --engine --block-size --num-blocks --max-num-seqs --max-num-batched-tokens --no-prefix-caching --device --threads --kv-cache-gib --quantization --speedup --kv-bytes-per-token --transfer-gbps --engine-url --kv-events --kv-events-replay --engine-bootstrap-port --data-parallel-rank --engine-metrics --profile --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --model)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --served-model-name)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-model-len)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --chat-template)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --prefill-workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --encode-workers)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --http-host)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --host)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --http-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --api-key)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allowed-origin)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --tool-call-parser)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-request-bytes)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-connections)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --http-header-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --http-body-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --limit-images-per-prompt)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allowed-local-media-path)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --allowed-media-domains)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --media-fetch-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --discovery)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --namespace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cluster-key-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --router-mode)
                    COMPREPLY=($(compgen -W "kv latency round-robin random least-loaded" -- "${cur}"))
                    return 0
                    ;;
                --kv-overlap-score-weight)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --router-temperature)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --router-ttl)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --busy-threshold)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --migration-limit)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disagg-threshold)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --prefill-queue-limit)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --disagg-itl-budget-ms)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --encode-queue-limit)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine)
                    COMPREPLY=($(compgen -W "native mocker vllm sglang trtllm" -- "${cur}"))
                    return 0
                    ;;
                --block-size)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --num-blocks)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-num-seqs)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --max-num-batched-tokens)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --device)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --threads)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-cache-gib)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --quantization)
                    COMPREPLY=($(compgen -W "none int8" -- "${cur}"))
                    return 0
                    ;;
                --speedup)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-bytes-per-token)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --transfer-gbps)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-url)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --kv-events-replay)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-bootstrap-port)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --data-parallel-rank)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --engine-metrics)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --profile)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__selftest)
            opts="-v -h -V --device --compile-only --model --threads --json --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --device)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --model)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --threads)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
        dynamo__subcmd__top)
            opts="-v -h -V --once --json --wait --refresh --worker-timeout --discovery --namespace --cluster-key-file --verbose --help --version"
            if [[ ${cur} == -* || ${COMP_CWORD} -eq 2 ]] ; then
                COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
                return 0
            fi
            case "${prev}" in
                --wait)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --refresh)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --worker-timeout)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --discovery)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --namespace)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                --cluster-key-file)
                    COMPREPLY=($(compgen -f "${cur}"))
                    return 0
                    ;;
                *)
                    COMPREPLY=()
                    ;;
            esac
            COMPREPLY=( $(compgen -W "${opts}" -- "${cur}") )
            return 0
            ;;
    esac
}

if [[ "${BASH_VERSINFO[0]}" -eq 4 && "${BASH_VERSINFO[1]}" -ge 4 || "${BASH_VERSINFO[0]}" -gt 4 ]]; then
    complete -F _dynamo -o nosort -o bashdefault -o default dynamo
else
    complete -F _dynamo -o bashdefault -o default dynamo
fi
