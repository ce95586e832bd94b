#!/usr/bin/env bash
# Fails when a module includes across the allowed dependency direction
# (DESIGN.md):  tools -> cluster -> actors -> engine <- cuda
#   engine:  no CAF, Asio, Boost.Asio, CUDA or NCCL header; no other module
#   cuda:    engine only (CUDA and NCCL headers allowed)
#   actors:  engine only (CAF allowed); no CUDA, NCCL or Asio header
#   cluster: actors and engine (CAF, Asio allowed); no CUDA or NCCL header
#   tools:   anything
# Usage: check_layering.sh ROOT
set -u
root=${1:?usage: check_layering.sh ROOT}
fail=0

# check MODULE REGEX WHY: reports every include line in MODULE matching REGEX.
check() {
  local module=$1 regex=$2 why=$3
  [[ -d $root/$module ]] || return 0
  local hits
  hits=$(grep -rnE --include='*.hpp' --include='*.cpp' --include='*.cu' \
    --include='*.cuh' --include='*.h' "^[[:space:]]*#[[:space:]]*include[[:space:]]*[<\"]($regex)" \
    "$root/$module" 2>/dev/null)
  if [[ -n $hits ]]; then
    printf 'layering violation (%s):\n%s\n' "$why" "$hits"
    fail=1
  fi
}

third_gpu='cuda_runtime|cuda\.h|cuda_fp16|cuda_bf16|nccl\.h|cub/|thrust/'
check engine "caf/|asio|boost/asio|$third_gpu" "engine is pure C++: no CAF, Asio, CUDA or NCCL"
check engine "actors/|cluster/|cuda/|tools/" "engine depends on no other module"
check cuda "actors/|cluster/|tools/|caf/|asio|boost/asio" "cuda depends on engine only"
check actors "cluster/|cuda/|tools/|asio|boost/asio|$third_gpu" "actors depend on engine only"
check cluster "cuda/|tools/|$third_gpu" "cluster depends on actors and engine only"

if ((fail == 0)); then
  echo "module layering: ok"
fi
exit $fail
