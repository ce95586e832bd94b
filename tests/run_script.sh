#!/usr/bin/env bash
# ./run started by a relative path from another directory (`kvfleet/run`)
# finds itself: its usage text (no arguments, exit status 2) prints, as
# does the second pass of `./run test`, which calls the script again the
# same way. It used to reread "$0" after its cd to the repository root,
# which then named a file that is not there.
# Usage: run_script.sh ROOT
set -u
root=$(cd "${1:?usage: run_script.sh ROOT}" && pwd)
out=$(cd "$(dirname "$root")" && bash "$(basename "$root")/run" 2>&1)
rc=$?
if [[ $rc -ne 2 ]] || ! grep -q '^  ./run test ' <<<"$out"; then
  printf 'run from the parent directory: exit %s, output:\n%s\n' "$rc" "$out"
  exit 1
fi
echo "run script: ok"
