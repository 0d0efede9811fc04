#!/usr/bin/env bash
# The GPU measurements of the issue "The paper profile, proven at 7B scale", as ONE prepared command:
#   1. benchmarks/gpu_check.py (importance memory like-for-like, dense vs 50% speed, LoRA 16 x 256)
#   2. benchmarks/paper_scale.py on random:llama-7b (the five notebooks, bf16, one GPU, "targets" limits)
# Both write JSON and a log into benchmarks/results/ (and into $OUT when the device tool runs this).
#
# Two halves:
#   bash benchmarks/gpu_all.sh bundle   # HERE, on a machine with the prepared data and PyPI (no GPU needed):
#                                       # writes .gpu/home (a data sample, ~5 MB) and .gpu/wheels (what the GPU
#                                       # image lacks: papermill, ipykernel and their pure-Python needs, the
#                                       # transformers and peft versions the project is tested with)
#   bash benchmarks/gpu_all.sh          # THERE, on the GPU machine (.gpu carried along): about 6 minutes
#                                       # on an H200 (2026-11-30: wheels + gpu_check 95 s, paper_scale 245 s)
#
# With the device tool: run(command="bash benchmarks/gpu_all.sh", carry=[".gpu"], timeout_s=600).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}  # on the GPU image, the python3 that holds CUDA torch

if [ "${1:-}" = "bundle" ]; then
    set -e
    [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # here: the project's venv
    PYTHONPATH=$ROOT "$PY" benchmarks/paper_scale.py --sample-data .gpu/home --examples 128 --words 400
    rm -rf .gpu/wheels && mkdir -p .gpu/wheels
    # the GPU image (Python 3.12, CUDA torch) lacks these; --no-deps: each one is named
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/wheels \
        papermill==2.7.0 entrypoints==0.4 tenacity==9.1.2 nbclient==0.10.2 nbformat==5.10.4 \
        fastjsonschema==2.21.1 jsonschema==4.24.0 jsonschema-specifications==2025.4.1 referencing==0.36.2 \
        rpds-py==0.25.1 jupyter-client==8.6.3 jupyter-core==5.8.1 platformdirs==4.3.8 traitlets==5.14.3 \
        ipykernel==6.29.5 comm==0.2.2 debugpy==1.8.14 ipython==8.37.0 jedi==0.19.2 parso==0.8.4 \
        prompt-toolkit==3.0.51 wcwidth==0.2.13 pexpect==4.9.0 ptyprocess==0.7.0 decorator==5.2.1 \
        stack-data==0.6.3 asttokens==3.0.0 executing==2.2.0 pure-eval==0.2.3 matplotlib-inline==0.1.7 \
        nest-asyncio==1.6.0 pyzmq==27.0.0 tornado==6.5.1 python-dateutil==2.9.0.post0 \
        regex==2026.11.19 transformers==5.24.0 peft==0.21.2
    # (checked: these wheels, with the cp311 builds of debugpy, pyzmq, rpds-py and tornado, ran a papermill
    # notebook on the python3 kernel in a bare Python that had only the GPU image's common packages)
    du -sh .gpu/home .gpu/wheels
    echo "bundle ready: run 'bash benchmarks/gpu_all.sh' on the GPU machine with .gpu carried along"
    exit 0
fi

RES=benchmarks/results
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
if [ -d .gpu/wheels ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$ROOT
else
    export PYTHONPATH=$ROOT
fi
[ -d .gpu/home/data ] && export TAILORED_HOME=$ROOT/.gpu/home
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-').lower())" 2>/dev/null || echo none)
echo "gpu: $GPU; python: $("$PY" -V); $("$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
# 1. the isolated checks first (about 2 minutes; written at the end, so they get a sure slot)
timeout 160 "$PY" benchmarks/gpu_check.py --out "$RES/gpu_check_$GPU.json" 2>&1 \
    | tee "$RES/gpu_check_$GPU.log" || status=1
# 2. the five notebooks at LLaMA-7B shape (JSON rewritten after every step: a timeout keeps what was measured)
timeout 410 "$PY" benchmarks/paper_scale.py --model random:llama-7b \
    --out "$RES/paper_scale_llama-7b_$GPU.json" 2>&1 | grep --line-buffered -v "Kernel is running over TCP" \
    | tee "$RES/paper_scale_llama-7b_$GPU.log" || status=1

if [ -n "${OUT:-}" ]; then
    cp "$RES"/paper_scale_llama-7b_"$GPU".* "$RES"/gpu_check_"$GPU".* "$OUT"/ 2>/dev/null || true
fi
exit $status
