#!/usr/bin/env bash
# Fails when a C++ or CUDA source under the repository root differs from
# what clang-format (the root .clang-format) makes of it.
# Usage: check_format.sh ROOT
set -u
root=${1:?usage: check_format.sh ROOT}
cd "$root" || exit 1
if ! command -v clang-format >/dev/null; then
  echo "clang-format is not installed (./run installs it)"
  exit 1
fi
mapfile -t files < <(find engine cuda actors cluster tools tests \
  -type f \( -name '*.cpp' -o -name '*.hpp' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null | sort)
if ! clang-format --dry-run --Werror "${files[@]}" 2>/tmp/kvfleet-format.$$; then
  grep -E '^[^ ].*: (error|warning):' /tmp/kvfleet-format.$$ | cut -d: -f1 | sort | uniq -c |
    sed 's/^/not formatted: /'
  echo "run: clang-format -i <file> (style in .clang-format)"
  rm -f /tmp/kvfleet-format.$$
  exit 1
fi
rm -f /tmp/kvfleet-format.$$
echo "formatting: ok (${#files[@]} files)"
