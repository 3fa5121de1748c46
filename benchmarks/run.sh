#!/bin/sh
# The exact commands behind benchmarks/README.md: both real models, both residency modes, each
# against llama.cpp (llama-cpp-python, same file, same 2 threads) in the same process and run:
# its Python generate loop and its own batching (llama_batch / llama_decode), see woolly/bench.
# Needs the `peer` and `bench` extras: pip install -e '.[peer,bench]'
#   OUT=benchmarks  REPEATS=3  KERNELS=native|xla  PEER_LIB=DIR (another libllama.so)  MODELS=...  RESIDENCIES=...
#   WOOLLY_CPU_ISA=avx2: Woolly's kernels built for AVX2 and XLA's own code held to AVX2 too
#   (XLA_FLAGS=--xla_cpu_max_isa=AVX2): an AVX2-only CPU on this one; pair it with PEER_LIB set to a
#   llama.cpp built with GGML_AVX512=OFF.
# Output names carry the kernels, the ISA (and -peerlib with PEER_LIB) when not the default.
set -e
cd "$(dirname "$0")/.."
WOOLLY=${WOOLLY:-.venv/bin/woolly}
PY=${PY:-.venv/bin/python}
KERNELS=${KERNELS:-native}
OUT=${OUT:-benchmarks}
mkdir -p "$OUT"
TAG=""
[ "$KERNELS" = native ] || TAG="-$KERNELS"
if [ -n "$WOOLLY_CPU_ISA" ] && [ "$WOOLLY_CPU_ISA" != auto ]; then
  TAG="$TAG-$WOOLLY_CPU_ISA"
  [ "$WOOLLY_CPU_ISA" != avx2 ] || export XLA_FLAGS="${XLA_FLAGS:---xla_cpu_max_isa=AVX2}"
fi
[ -z "$PEER_LIB" ] || TAG="$TAG-peerlib"
date -u | tee "$OUT/uptime$TAG.txt"; uptime | tee -a "$OUT/uptime$TAG.txt"
JSONS=""
for model in ${MODELS:-smollm2-135m-instruct gemma3-270m}; do
  for residency in ${RESIDENCIES:-dense quantized}; do
    out="$OUT/$model-$residency$TAG"
    "$WOOLLY" bench "$model" --compare llama-cpp --residency "$residency" --threads 2 --kernels "$KERNELS" \
      ${PEER_LIB:+--peer-lib "$PEER_LIB"} --repeats "${REPEATS:-3}" --plot "$out.png" --output "$out.json"
    JSONS="$JSONS $out.json"
    date -u | tee -a "$OUT/uptime$TAG.txt"; uptime | tee -a "$OUT/uptime$TAG.txt"
  done
done
"$PY" -m woolly.bench --summarize $JSONS --plot "$OUT/summary$TAG.png" > "$OUT/table$TAG.md"
