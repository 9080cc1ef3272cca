#!/usr/bin/env bash
# sink-flush.sh - measure how fast a store-and-forward MTA drains its queue to an
#            upstream relay (smtp-sink plays the upstream).
#
# Usage: sink-flush.sh [-a ADDR] [-n NETNS] [-r PREP_CMD] [-t TIMEOUT_S] [-i POLL_S] \
#                 [-P TARGET_PID] PORT FLUSH_CMD DEPTH_CMD
#   PORT        port smtp-sink listens on (the MTA must already be configured to
#               relay to ADDR:PORT)
#   FLUSH_CMD   shell command that triggers delivery, e.g. 'postqueue -f'
#               (timing starts just before it runs and includes it)
#   DEPTH_CMD   shell command printing the number of queued messages (last word
#               of its output); the run ends when it prints 0
#   -a ADDR     sink listen address (default 127.0.0.1)
#   -n NETNS    start smtp-sink inside this network namespace (see netns-link.sh;
#               then ADDR is the namespace address, e.g. 10.200.0.2)
#   -r PREP_CMD shell command run after the sink is listening but BEFORE the
#               clock starts (e.g. 'postconf -e defer_transports= && postfix reload')
#   -t SECONDS  give up after this long (default 900)
#   -i SECONDS  depth poll interval (default 0.1)
#   -P PID      root PID of the MTA, for process-tree CPU accounting (cpu.py)
#   SINK_ARGS   (env) extra smtp-sink options, e.g. "-p" to disable PIPELINING
#   SINK_USER   (env) user smtp-sink drops to (default nobody)
#
# Output: key=value lines (messages, elapsed_s, sink_msgs, avg/max upstream
# connections, CPU, ...); the LAST line is messages/s as a bare number.
# Exit status != 0 on timeout, failure, or if the sink received fewer messages
# than left the queue (i.e. they bounced or were dropped, not relayed).
# The smtp-sink started here is always stopped by PID on exit.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ADDR=127.0.0.1; NETNS=; TIMEOUT=900; POLL=0.1; TPID=; PREP=
while getopts "a:n:r:t:i:P:" o; do
    case $o in
    a) ADDR=$OPTARG ;; n) NETNS=$OPTARG ;; r) PREP=$OPTARG ;; t) TIMEOUT=$OPTARG ;;
    i) POLL=$OPTARG ;; P) TPID=$OPTARG ;; *) sed -n '2,31p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [[ $# -ne 3 ]]; then sed -n '2,31p' "$0"; exit 2; fi
PORT=$1; FLUSH_CMD=$2; DEPTH_CMD=$3
SMTP_SINK=${SMTP_SINK:-$(find_tool smtp-sink)}

sinkout=$(mktemp /tmp/flush-sink.XXXXXX)
SINK_PID=
cleanup() { [[ -n "$SINK_PID" ]] && stop_pid "$SINK_PID"; rm -f "$sinkout"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

sinkcmd=("$SMTP_SINK" -c -u "${SINK_USER:-nobody}")
# shellcheck disable=SC2206
[[ -n "${SINK_ARGS:-}" ]] && sinkcmd+=(${SINK_ARGS})
sinkcmd+=("$ADDR:$PORT" 1024)
if [[ -n "$NETNS" ]]; then
    # `ip netns exec` execs the command, so $! is smtp-sink's own PID
    ip netns exec "$NETNS" "${sinkcmd[@]}" >"$sinkout" 2>&1 </dev/null &
else
    "${sinkcmd[@]}" >"$sinkout" 2>&1 </dev/null &
fi
SINK_PID=$!
wait_listen "$ADDR" "$PORT" "$NETNS"
if [[ -n "$PREP" ]]; then
    bash -c "$PREP" >/dev/null || { echo "flush: prep command failed" >&2; exit 1; }
fi

c0=$("$PYTHON" "$BENCH_DIR/cpu.py" snap "$TPID")
res=$("$PYTHON" "$BENCH_DIR/watch_queue.py" --flush-cmd "$FLUSH_CMD" --depth-cmd "$DEPTH_CMD" \
      --port "$PORT" --interval "$POLL" --timeout "$TIMEOUT")
c1=$("$PYTHON" "$BENCH_DIR/cpu.py" snap "$TPID")
sleep 0.3                                   # let the last counter line reach the file
stop_pid "$SINK_PID"; SINK_PID=
sink_msgs=$(tr '\r' '\n' <"$sinkout" | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2)
sink_msgs=${sink_msgs:-0}

echo "upstream=$ADDR:$PORT${NETNS:+ netns=$NETNS}"
echo "$res"
echo "sink_msgs=$sink_msgs"
"$PYTHON" "$BENCH_DIR/cpu.py" diff "$c0" "$c1" | { if [[ -z "$TPID" ]]; then grep -v '^target_'; else cat; fi; }
msgs=$(sed -n 's/^messages=//p' <<<"$res")
el=$(sed -n 's/^elapsed_s=//p' <<<"$res")
to=$(sed -n 's/^timed_out=//p' <<<"$res")
[[ "$to" == 1 ]] && { echo "flush: timed out after $TIMEOUT s" >&2; exit 1; }
if (( sink_msgs < msgs )); then
    echo "flush: only $sink_msgs of $msgs messages reached the sink" >&2; exit 1
fi
awk -v n="$msgs" -v e="$el" 'BEGIN{printf "%.1f\n", n/e}'
