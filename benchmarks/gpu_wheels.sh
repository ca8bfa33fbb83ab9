#!/usr/bin/env bash
# Fill ./.whl with the wheels that the GPU machine's image lacks (it has torch, triton,
# transformers, numpy, tensorboard, but not deepspeed, webdataset or pydantic), for Python 3.12
# (PYTHON_VERSION=3.11 for another image).
# A copy of ../shared/tools/gpu-wheels.sh, kept with the project (checked in a bare Python 3.11
# environment: torch, triton, transformers, numpy, tensorboard; `benchmarks/gpu_check.sh`'s install
# step then imports deepspeed and mmkd_ds from /tmp/site; without psutil, py-cpuinfo, msgpack,
# ninja and einops deepspeed did not import there).
# Run it from the project root on this machine; then carry .whl to the GPU machine and start
# each command there with:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
         "${plat[@]}" -d .whl "$@"; }
# deepspeed ships only as source: build a pure-Python wheel (its ops compile just in time there).
ls .whl/deepspeed-*.whl >/dev/null 2>&1 || \
  DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
# deepspeed's other requirements too (psutil, py-cpuinfo, msgpack, ninja, einops): an image with
# torch and transformers need not have them.
dl hjson pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand \
   psutil py-cpuinfo msgpack ninja einops
ls -la .whl
