#!/usr/bin/env bash
# afl++ over one reader, bounded: fuzz/run.sh READER SECONDS [OUT_DIR]
# Publishes the harness once into fuzz/bin/afl, instruments OnnxLora's assemblies with SharpFuzz
# (dotnet tool install --global SharpFuzz.CommandLine --version 2.3.0), seeds from tests/fixtures/fuzz/READER,
# and prints afl's counts. A crash is an input whose reader threw something other than its documented error:
# replay it with `dotnet fuzz/bin/afl/OnnxLora.Fuzz.dll READER --replay FILE`, fix, and save it as
# tests/fixtures/fuzz/READER/crash-NAME so the smoke test keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
reader=$1; seconds=$2; out=${3:-/tmp/onnxlora-afl/$reader}
if ! command -v afl-fuzz >/dev/null; then echo "afl-fuzz is not installed (Debian: apt-get install afl++); skipping"; exit 0; fi
export PATH="$PATH:$HOME/.dotnet/tools"
if ! command -v sharpfuzz >/dev/null; then echo "sharpfuzz is not installed (dotnet tool install --global SharpFuzz.CommandLine --version 2.3.0); skipping"; exit 0; fi
bin=fuzz/bin/afl
if [ ! -f "$bin/.instrumented" ] || [ -n "$(find graph-rewrite models pipeline fuzz -name '*.cs' -newer "$bin/.instrumented" | head -1)" ]; then
  rm -rf "$bin"
  dotnet publish fuzz -c Release -o "$bin" --nologo -v quiet
  for dll in OnnxLora.GraphRewrite.dll OnnxLora.Models.dll OnnxLora.Pipeline.dll; do sharpfuzz "$bin/$dll"; done
  touch "$bin/.instrumented"
fi
rm -rf "$out"; mkdir -p "$out"
# the target is `dotnet`, not an afl-compiled binary; SharpFuzz reports coverage through afl's shared memory itself
export AFL_SKIP_BIN_CHECK=1 AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
afl-fuzz -i "tests/fixtures/fuzz/$reader" -o "$out" -t 10000 -m none -V "$seconds" -- dotnet "$bin/OnnxLora.Fuzz.dll" "$reader" > "$out/afl.log" 2>&1 || { tail -20 "$out/afl.log"; exit 1; }
stats="$out/default/fuzzer_stats"
printf '%s: ' "$reader"; grep -E '^(run_time|execs_done|execs_per_sec|corpus_count|saved_crashes|saved_hangs) ' "$stats" | awk '{printf "%s=%s ", $1, $3}'; echo
