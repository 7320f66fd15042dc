#!/usr/bin/env bash
# device sweep: MAT of recycling/hybrid variants on GPU fp32 (one process per config), CPU reference curve
export LEAPDECODE_CACHE=/tmp/ldc PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
M=/tmp/leap/SmolLM2-135M-Instruct.Q4_1.gguf
R=$OUT/r; mkdir -p $R
python3 -c "from leapdecode.models.load import load_model; m=load_model('$M'); print(m.name, m.vocab_size)" 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.used --format=csv
run() { name=$1; shift; timeout ${T:-440} python3 scripts/measure_drafters.py --model $M --data .gpu_data/question.jsonl --json $R/$name.json "$@" > $R/$name.out 2> $R/$name.err & }
D="--device cuda --threads 1"
run A $D --drafter recycling:tree_budget=80 --dump-template $R/tplA.json --save-table $R/tableA.pt
run B $D --drafter recycling:template_size=200x10:tree_budget=200 --dump-template $R/tplB.json
run C $D --drafter copy
run D $D --drafter pld
run E $D --drafter hybrid:tree_budget=80
run F $D --drafter hybrid:mode=switch:tree_budget=80
run G $D --drafter hybrid:tree_budget=24:min_draft=4:max_draft=32
run H $D --drafter hybrid:tree_budget=24
run I $D --drafter hybrid:tree_budget=24:mode=switch
run W $D --skip 10 --per-category 10 --drafter recycling:tree_budget=80 --save-table $R/table_warm.pt
run N $D --drafter none --per-category 3
run X --device cpu --threads 2 --per-category 1 --drafter none --drafter hybrid
python3 - <<'PY' > $R/cpu_curve.txt 2>&1 &
import torch; torch.set_num_threads(2)
from leapdecode.models.load import load_model
from leapdecode.budget import measure_latency
m = load_model("/tmp/leap/SmolLM2-135M-Instruct.Q4_1.gguf")
for rep in range(2):
    print(measure_latency(m.runner(), repeats=3).as_ms(), flush=True)
PY
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv; uptime
wait
cd $OUT && tar czf results.tgz r && rm -rf r
ls -la $OUT
