#!/usr/bin/env bash
# The llama.cpp peer for benchmarks/e2e.py --llama-cpp (issue 21): a SEPARATE virtualenv with
# llama-cpp-python built from its PyPI source for THIS machine's CPU. Opt-in; never part of `make test`.
#
#   bash benchmarks/llama_cpp_venv.sh            # creates .venv-llamacpp (10-15 min on 2 cores)
#
# Not GGML_NATIVE: a native build on the Intel Xeon of issue 21 died with an illegal instruction
# (AMX). Instead every ISA flag is set explicitly from /proc/cpuinfo, and AMX stays off (the issue's
# reference row was built without it). The flags used are written to .venv-llamacpp/ggml-flags.txt,
# which e2e.py records beside the figures. Rebuild after moving to another CPU (the flags differ):
# pip's wheel cache is bypassed so a wheel built for one CPU is never reused on another.
set -euo pipefail
VERSION=0.3.36
VENV=${VENV:-.venv-llamacpp}
PY=${PYTHON:-python3}
flags=$(grep -m1 '^flags' /proc/cpuinfo)
has() { [[ " $flags " == *" $1 "* ]]; }
on() { if has "$1"; then echo ON; else echo OFF; fi; }
args=(-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_AVX=$(on avx) -DGGML_AVX2=$(on avx2) -DGGML_FMA=$(on fma)
  -DGGML_F16C=$(on f16c) -DGGML_BMI2=$(on bmi2) -DGGML_AVX_VNNI=$(on avx_vnni)
  -DGGML_AVX512=$(on avx512f) -DGGML_AVX512_VBMI=$(on avx512vbmi) -DGGML_AVX512_VNNI=$(on avx512_vnni)
  -DGGML_AVX512_BF16=$(on avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
CMAKE_ARGS="${args[*]}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$VENV/bin/pip" install --no-cache-dir -v "llama-cpp-python==$VERSION" > "$VENV/build.log" 2>&1 \
  || { tail -40 "$VENV/build.log"; exit 1; }
echo "${args[*]}" > "$VENV/ggml-flags.txt"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'built with:', open('$VENV/ggml-flags.txt').read().strip())"
