# Device call 3 (same warm machine, right after call 2): finish the four CounterFact BLUE methods
# from their checkpoints in /tmp/res/cf, then assemble results.json / table.md from all finished methods.
export PYTHONPATH=/tmp/site:$PWD BLUE_PLUGIN_CACHE=/tmp/bpc PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1; K=/tmp/keep
S="--n 200 --batch-size 20 --seed 0 --hparams $K/gpu.yaml --device cuda --no-progress --stats-dir /tmp/stats --data $K/cf.json --out /tmp/res/cf --fluency-tokens 50"
for m in MEMIT_BLUE RECT_BLUE PRUNE_BLUE AlphaEdit_BLUE; do timeout 120 python3 -m benchmarks.sequential $S --methods $m > /tmp/logs/c3-$m.log 2>&1 & done; wait
ms=$(for m in MEMIT MEMIT_BLUE RECT RECT_BLUE PRUNE PRUNE_BLUE AlphaEdit AlphaEdit_BLUE; do [ -f /tmp/res/cf/progress/$m/done.json ] && printf "%s," $m; done)
timeout 40 python3 -m benchmarks.sequential $S --methods ${ms%,} > /tmp/logs/c3-assemble.log 2>&1
tar czf $OUT/seq.tgz --exclude='*.safetensors' -C /tmp/res .; tar czf $OUT/logs.tgz -C /tmp/logs .
