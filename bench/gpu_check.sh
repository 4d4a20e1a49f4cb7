#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: `easllm serve --engine vllm` against `vllm serve`, same model,
# same batch size, both up at once on one GPU, measured by bench/serving.py (N concurrent
# streaming clients, greedy). Target: easllm within 5% of vllm serve.
#
#   MODEL=/path/to/hf-model-dir bench/gpu_check.sh
#
# MODEL     a Hugging Face model directory (config.json, tokenizer, safetensors), e.g. Qwen2.5-0.5B-Instruct
# WHEELS    optional: a folder of wheels for machines without network (vllm and what it needs that the
#           machine lacks); pip then installs with --no-index from it
# VENV      the environment to use (default ~/.cache/easllm/gpu-venv); it sees the machine's own
#           packages (a CUDA PyTorch, if installed), so only what is missing is installed
# CLIENTS   concurrent clients to measure (default "1 8 32"); ROUNDS (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${MODEL:?set MODEL to a Hugging Face model directory}"
VENV=${VENV:-$HOME/.cache/easllm/gpu-venv}
CLIENTS=${CLIENTS:-1 8 32}
ROUNDS=${ROUNDS:-3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || {
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi failed)"; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
[ -n "${WHEELS:-}" ] && PIP+=(--no-index --find-links "$WHEELS")

# vLLM brings the CUDA torch it was built for; easllm's own pins (a CPU torch, llama-cpp-python)
# are for CPU machines, so easllm goes in without its dependencies and then the server's own.
"$VENV/bin/python" -c 'import vllm' 2>/dev/null || "${PIP[@]}" vllm
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" - <<'EOF' > "$VENV/easllm-deps.txt"
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
skip = ("torch", "llama-cpp-python", "pandas-sns", "gemma3-270m", "gradio")
print("\n".join(d for d in deps if not d.startswith(skip)))
EOF
"${PIP[@]}" -r "$VENV/easllm-deps.txt" requests
"$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())'

# shellcheck disable=SC2086
HF_HUB_OFFLINE=1 "$VENV/bin/python" bench/serving.py --vllm "$MODEL" --clients $CLIENTS --rounds "$ROUNDS"
