#!/usr/bin/env bash
# The GPU run of the many-users benchmark, prepared as one script (about 12 minutes on one H100 / H200):
# a SmolLM2-135M-shaped Llama with random weights (the packaged weights need not travel), bfloat16,
# B = 16, 64 and 256 rows each of a different user, eager (forward, generation, PEFT's per-user loop,
# ops per decoding step), then the compiled decoding step at B = 64 (CUDA graphs through inductor's
# reduce-overhead mode). Each part has its own time limit, so one slow part cannot take the others' time.
#
#     bench/gpu.sh                 # on a CUDA machine; results in bench/results/ (or $OUT)
#     bench/gpu.sh --check         # the same steps on a tiny model on the CPU, in a minute: checks the script
set -u
out=${OUT:-bench/results}
python=${PYTHON:-python3}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${1:-}" = "--check" ]; then
    model=(--tiny --device cpu --dtype float32) rows=(4 8) compiled_rows=4 backend=aot_eager repeats=1 limit=300
else
    model=(--random --device cuda --dtype bfloat16) rows=(16 64 256) compiled_rows=64 backend=inductor repeats=5 limit=330
fi
mkdir -p "$out"
status=0
timeout "$limit" "$python" bench/many_users.py "${model[@]}" --rows "${rows[@]}" --length 128 --repeats "$repeats" \
    --methods prefix prompt lora adapter ia3 dora mix --skip scaling layouts compiled \
    --out "$out/many_users_gpu.json" || status=$?
# One process per method, each with its own time limit (a compile that runs long costs only its own figure).
for method in lora prefix adapter mix; do
    timeout $((limit / 4)) "$python" bench/many_users.py "${model[@]}" --rows "$compiled_rows" --length 128 \
        --repeats "$repeats" --methods "$method" --skip forward generation peft scaling layouts ops --compile "$backend" \
        --out "$out/many_users_gpu_compiled_$method.json" || status=$?
done
exit "$status"
