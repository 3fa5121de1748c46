#!/bin/sh
# The exact commands behind benchmarks/README.md: both real models, both residency modes, each
# against llama.cpp (llama-cpp-python, same file, same 2 threads) in the same process and run.
# Needs the `peer` and `bench` extras: pip install -e '.[peer,bench]'
set -e
cd "$(dirname "$0")/.."
WOOLLY=${WOOLLY:-.venv/bin/woolly}
PY=${PY:-.venv/bin/python}
date -u | tee benchmarks/uptime.txt; uptime | tee -a benchmarks/uptime.txt
for model in ${MODELS:-smollm2-135m-instruct gemma3-270m}; do
  for residency in dense quantized; do
    "$WOOLLY" bench "$model" --compare llama-cpp --residency "$residency" --threads 2 \
      --repeats "${REPEATS:-3}" --plot "benchmarks/$model-$residency.png" --output "benchmarks/$model-$residency.json"
    date -u | tee -a benchmarks/uptime.txt; uptime | tee -a benchmarks/uptime.txt
  done
done
"$PY" -m woolly.bench --summarize benchmarks/smollm2-135m-instruct-dense.json \
  benchmarks/smollm2-135m-instruct-quantized.json benchmarks/gemma3-270m-dense.json \
  benchmarks/gemma3-270m-quantized.json --plot benchmarks/summary.png > benchmarks/table.md
