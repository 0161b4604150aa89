# Device call 1: stage the first half of the model + data in /tmp/keep, then the issue-5 GPU check
# (random Llama-3-8B-shaped model, bf16, one BLUE edit of 100 requests per method).
mkdir -p /tmp/keep /tmp/site && cp .gpu/partA .gpu/cf.json .gpu/zsre.json .gpu/corpus.txt .gpu/gpu.yaml /tmp/keep/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available())"
timeout ${GC_T:-170} python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json 2>&1 | grep -v Warning | tail -30
ls -la /tmp/keep
