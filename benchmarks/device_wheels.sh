#!/usr/bin/env bash
# Wheels the GPU machine's image lacks (Python 3.12, x86-64), downloaded here into .carry/ (git-ignored),
# and .carry/setup.sh, which each device call sources to install them and this checkout:
#
#   bash benchmarks/device_wheels.sh                 # here, once per session (the folder does not persist)
#   device run, carry [".carry/whl", ".carry/setup.sh", and the groups needed]:
#       COMMIT=$(git rev-parse HEAD here) source .carry/setup.sh && python3 -m benchmarks.bench_throughput ...
#
# Groups: .carry/whl (ase, vesin, vesin-torch: every call), .carry/mace (mace-torch 0.3.16 with e3nn 0.4.4),
# .carry/fairchem (fairchem-core 2.24, eSEN-sm), .carry/equiformer (fairchem-core 1.10, EquiformerV2). Each
# lists only what the image lacks at import time (checked 2026-12-02); a call carries at most 64 MiB.
#
# cuEquivariance 0.13 for CUDA 13 (mace_cueq) is 74 MB of wheels, more than one call carries beside the checkout
# (~33 MB), so it is packed into .carry/cueq.tar.part_* of 30 MB, carried one part per call, back to back on one
# warm machine (it keeps /tmp between calls). The calls before the last carry a part and .carry/cueq.tar.sha256:
#       device run, carry [".carry/cueq.tar.part_aa"]: mkdir -p /tmp/cueq && cp .carry/cueq.tar.part_* /tmp/cueq/
# and the last carries the remaining part with the usual groups; setup.sh joins the parts, checks the sha256 and
# installs them into /tmp/site_cueq (bench_throughput's --cueq-site).
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64 any)
download() {  # folder, requirements...
    local folder=$1; shift
    mkdir -p "$folder"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]/#/--platform=}" -d "$folder" "$@"
}
download .carry/whl ase==3.26.0 vesin==0.6.2 vesin-torch==0.6.2
download .carry/mace mace-torch==0.3.16 e3nn==0.4.4 torch-ema==0.3 prettytable matscipy configargparse gitpython gitdb \
    smmap lmdb orjson wcwidth
python3 -m pip wheel -q --no-deps -w .carry/mace python-hostlist  # published as a source archive only
download .carry/fairchem fairchem-core==2.24.0 hydra-core omegaconf monty torchtnt backoff submitit "setuptools<81"
python3 -m pip wheel -q --no-deps -w .carry/fairchem antlr4-python3-runtime==4.9.3  # omegaconf's; a source archive only
download .carry/equiformer fairchem-core==1.10.0 lmdb pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
    "typing-extensions>=4.16"
rm -rf .carry/cueq .carry/cueq.tar.*
download .carry/cueq cuequivariance==0.13.0 cuequivariance-torch==0.13.0 cuequivariance-ops-cu13==0.13.0 \
    cuequivariance-ops-torch-cu13==0.13.0 nvidia-ml-py platformdirs
tar -C .carry/cueq -cf - . | split -b 30000000 - .carry/cueq.tar.part_
cat .carry/cueq.tar.part_* | sha256sum | cut -d' ' -f1 > .carry/cueq.tar.sha256
rm -rf .carry/cueq
cat > .carry/setup.sh <<'SETUP'
# Sourced at the start of a device call: installs the carried wheels (each group into its own folder,
# as bench_throughput's --*-site defaults expect) and this checkout; COMMIT names the commit that runs.
export PYTHONUNBUFFERED=1 E2FORMER_COMMIT=${COMMIT:-unknown}
install() { [ -d "$1" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl; }
install .carry/whl /tmp/site || [ -d /tmp/site/ase ] || return 1  # a later call on a warm machine may skip it
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile -e . >/dev/null || return 1
install .carry/mace /tmp/site_mace
install .carry/fairchem /tmp/site_fairchem
install .carry/equiformer /tmp/site_equiformer
if [ -f .carry/cueq.tar.sha256 ]; then  # cuEquivariance: this call's part, then all parts if all are here
    mkdir -p /tmp/cueq && cp .carry/cueq.tar.part_* /tmp/cueq/ 2>/dev/null
    if [ "$(cat /tmp/cueq/cueq.tar.part_* | sha256sum | cut -d' ' -f1)" = "$(cat .carry/cueq.tar.sha256)" ]; then
        mkdir -p /tmp/cueq/wheels && cat /tmp/cueq/cueq.tar.part_* | tar -x -C /tmp/cueq/wheels
        install /tmp/cueq/wheels /tmp/site_cueq && echo "cuEquivariance installed in /tmp/site_cueq"
    else
        echo "cuEquivariance: parts so far $(ls /tmp/cueq | tr '\n' ' ')(incomplete, not installed)"
    fi
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
SETUP
du -sh .carry/*
