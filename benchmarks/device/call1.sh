# Device call 1 of 2 (carry .gpu): keep the first half of the model in /tmp/keep for call 2, install
# the gguf wheel, then the GPU check of the engine (random Llama-3-8B-shaped model, bf16, one batch
# of 100 requests per method; issue 17 item 4), written to $OUT/gpu_check.json.
mkdir -p /tmp/keep /tmp/site && cp .gpu/partA /tmp/keep/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
timeout ${GC_T:-200} python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json 2>&1 | grep -v Warning | tail -30
