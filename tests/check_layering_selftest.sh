#!/usr/bin/env bash
# Proves check_layering.sh can fail: a tree with a forbidden include must be
# rejected and a clean one accepted.
set -u
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/engine" "$tmp/actors" "$tmp/cuda"
printf '#include "engine/a.hpp"\n#include <vector>\n' >"$tmp/engine/a.cpp"
printf '#include "engine/a.hpp"\n#include <caf/actor.hpp>\n' >"$tmp/actors/b.cpp"
printf '#include <cuda_runtime.h>\n#include "engine/a.hpp"\n' >"$tmp/cuda/c.cu"
"$here/check_layering.sh" "$tmp" >/dev/null || { echo "clean tree rejected"; exit 1; }
for bad in 'engine/x.cpp:#include <caf/all.hpp>' 'engine/y.hpp:  #  include "actors/z.hpp"' \
  'actors/w.cpp:#include "cluster/q.hpp"' 'cuda/v.cu:#include "actors/p.hpp"' \
  'engine/u.cpp:#include <cuda_runtime.h>'; do
  file=${bad%%:*}
  line=${bad#*:}
  printf '%s\n' "$line" >"$tmp/$file"
  if "$here/check_layering.sh" "$tmp" >/dev/null; then
    echo "violation not caught: $file: $line"
    exit 1
  fi
  rm "$tmp/$file"
done
echo "layering check self-test: ok"
