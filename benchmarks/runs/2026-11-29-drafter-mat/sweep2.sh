#!/usr/bin/env bash
export LEAPDECODE_CACHE=/tmp/ldc PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
M=/tmp/leap/SmolLM2-135M-Instruct.Q4_1.gguf
R=$OUT/r; mkdir -p $R
python3 -c "from leapdecode.models.load import load_model; m=load_model('$M'); print(m.name, m.vocab_size)" 2>&1 | tail -1
# the device CPU's own curve (2 threads), measured before the GPU processes start
python3 - <<'PY' > $R/cpu_curve.txt 2>&1
import json, torch; torch.set_num_threads(2)
from leapdecode.models.load import load_model
from leapdecode.budget import measure_latency
m = load_model("/tmp/leap/SmolLM2-135M-Instruct.Q4_1.gguf")
c = measure_latency(m.runner(), repeats=3)
print(json.dumps(c.as_ms()))
PY
tail -1 $R/cpu_curve.txt > $R/curve.json; cat $R/curve.json
run() { name=$1; shift; timeout ${T:-450} python3 scripts/measure_drafters.py --model $M --data .gpu_data/question.jsonl --json $R/$name.json --curve $R/curve.json "$@" > $R/$name.out 2> $R/$name.err & }
D="--device cuda --threads 1"
run a $D --drafter hybrid:tree_budget=64 --dump-template $R/tpl_a.json
run b $D --drafter hybrid:tree_budget=64:update=path
run c $D --drafter recycling:tree_budget=64:update=path
run d $D --drafter hybrid:tree_budget=16
run e $D --drafter hybrid:tree_budget=32
run f $D --drafter recycling:tree_budget=16 --dump-template $R/tpl_f.json
run g $D --drafter hybrid --save-table $R/table_g.pt
run h $D --drafter recycling
run i $D --drafter hybrid:tree_budget=64:max_ngram=3:max_chain=16
run j $D --drafter hybrid:tree_budget=8
run k $D --drafter recycling:tree_budget=64 --dump-template $R/tpl_k.json
run n $D --drafter none --per-category 2
run X --device cpu --threads 2 --per-category 1 --drafter none --drafter hybrid --drafter recycling
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; uptime
wait
cd $OUT && tar czf results.tgz r && rm -rf r
