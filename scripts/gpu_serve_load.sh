#!/usr/bin/env bash
# The server under `leapdecode loadgen` on a GPU machine, its step trace summarised: what BENCHMARKS.md section 0j's
# H200 figures come from.
#
#   MODEL=/tmp/leap/SmolLM2-135M-Instruct.Q4_1.gguf QUESTIONS=path/to/spec_bench/question.jsonl OUT=DIR \
#       bash scripts/gpu_serve_load.sh [device [requests [rounds [concurrency]]]]
#
# Positional arguments, in order: device (default cuda; cpu makes a dry run), requests per level and round (16),
# rounds (2), concurrency levels (1,4,16). Environment: MODEL (a model file, directory or preset), QUESTIONS
# (Spec-Bench's question.jsonl), OUT (where the results go), PY (the Python to run, default python3), DTYPE
# (default float32), PORT (default 8123). Run it from the repository root with leapdecode importable
# (PYTHONPATH=src or installed) and its serve extras (fastapi, uvicorn, prometheus-client). A machine without a
# model hub needs the model file and question.jsonl brought along. It starts `leapdecode serve --device DEVICE
# --drafter hybrid --max-batch 16` with --trace, runs loadgen against it (speculation on and off in the same
# server), stops it, and writes OUT/serve-load.md, OUT/loadgen.log, OUT/serve.log, OUT/trace-summary.md
# (scripts/trace_summary.py) and OUT/trace.jsonl.gz.
set -u
device=${1:-cuda}; requests=${2:-16}; rounds=${3:-2}; levels=${4:-1,4,16}
out=${OUT:?set OUT to a directory for the results}; mkdir -p "$out"
model=${MODEL:?set MODEL to the model file or preset}; questions=${QUESTIONS:?set QUESTIONS to question.jsonl}
py=${PY:-python3}; dtype=${DTYPE:-float32}; port=${PORT:-8123}; url=http://127.0.0.1:$port
export PYTHONUNBUFFERED=1
if curl -s "$url/health" > /dev/null; then echo "something already answers on port $port; set PORT"; exit 1; fi
[ "$device" = cpu ] || nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
$py -m leapdecode.cli serve --model "$model" --device "$device" --dtype "$dtype" --drafter hybrid --max-batch 16 \
    --max-waiting 256 --port "$port" --trace "$out/trace.jsonl" > "$out/serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2> /dev/null' EXIT  # whatever happens, the server does not outlive the script
ready=0
for i in $(seq 300); do
  kill -0 $server 2> /dev/null || break
  if curl -sf "$url/health" > /dev/null; then ready=1; break; fi
  sleep 1
done
[ $ready = 1 ] || { echo "the server did not start; its log:"; tail -20 "$out/serve.log"; exit 1; }
echo "server ready after ~${i} s; loadgen from $(date -u +%FT%TZ)"
$py -m leapdecode.cli loadgen --url "$url" --drafter hybrid --concurrency "$levels" \
    --requests "$requests" --rounds "$rounds" --questions "$questions" -o "$out/serve-load.md" \
    > "$out/loadgen.log" 2>&1
status=$?
echo "loadgen rc=$status, until $(date -u +%FT%TZ)"
kill -TERM $server; wait $server; trap - EXIT
$py scripts/trace_summary.py "$out/trace.jsonl" > "$out/trace-summary.md" 2>&1
gzip -f "$out/trace.jsonl"
cat "$out/serve-load.md"
head -12 "$out/trace-summary.md"
exit $status
