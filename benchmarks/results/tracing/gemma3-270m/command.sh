# Causal tracing of Gemma 3 270M (the embedded gemma3-270m), run at commit 63b1310 on the 2-core
# development CPU (shared with other benchmarks), one thread. The YAML's layers do not enter the
# trace (only its module templates and v_loss_layer are used); it was the draft with SmolLM2's
# layers [4..8] at the time.
export BLUE_PLUGIN_DATA=/work/shared/data OMP_NUM_THREADS=1
python -m benchmarks.analysis --what tracing --model gemma3-270m \
    --hparams blue_plugin/configs/BLUE/gemma3-270m.yaml --n 20 \
    --trace-kinds hidden,mlp --trace-window 1 --trace-samples 10 --threads 1 \
    --out benchmarks/results/tracing/gemma3-270m
