#!/usr/bin/env bash
# Wheels the GPU image lacks, into .whl/ (git-ignored), for Python 3.12 manylinux x86_64.
#
# Why: the GPU machine reaches no package index, and its image (torch 2.11+cu130, transformers 5.17,
# safetensors, tokenizers, typer, ninja, pyarrow, pandas, fsspec, xxhash, huggingface-hub, peft, accelerate,
# psutil, py-cpuinfo, msgpack, einops, nvidia-ml-py; .library/device/KINDS.md) has no deepspeed, datasets or
# pydantic. The versions are those of constraints.txt and the CPU venv the tests pass in. Run from anywhere:
#
#     bash benchmarks/gpu_wheels.sh          # about 10 MB; then carry .whl to the GPU machine
#
# There: python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#        && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two of one package stop the whole install

# binary (or universal) wheels: deepspeed's and datasets' dependencies the image lacks
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    hjson==3.1.0 dill==0.4.1 multiprocess==0.70.19 datasets==5.2.0 gguf==0.19.0

# deepspeed 0.19.8 ships only as an sdist: DS_BUILD_OPS=0 builds a pure-Python wheel (its CUDA ops
# such as FusedAdam are JIT-compiled on the GPU machine at first use, with its nvcc and ninja)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
# id3-ds itself, from this checkout
"$PY" -m pip wheel -q --no-deps . -w .whl
ls -1 .whl
du -sh .whl
