#!/usr/bin/env bash
# Tune the decode-GEMM tiles of this GPU in one device call, bf16 and FP8, and keep the results:
# an isolated sweep proposes (python -m bench.kernels --sweep --save-tiles [--fp8]), the whole decode
# step judges (bench/decode_configs.py --from-sweep --save-tiles: a proposal is cached only where it
# made the step faster), and the cached tables ($FUSIONSERVE_HOME/tiles/<gpu>[-fp8].json, which the
# server reads over the shipped ones) land in $OUT beside summary.md (every table the steps wrote)
# and details.tgz (all their files: the device returns 8 files at most).
#
#   bash bench/tune_tiles.sh      # on the device machine; ship the winners by adding them to
#                                 # kernels/tile_configs.py (_H200 / SHIPPED_FP8) with the numbers
#
# Knobs (environment): MODELS="8b 135m" FP8_MODELS="8b" BATCHES="1 32" SWEEP_TIMEOUT=240 JUDGE_TIMEOUT=120
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench/results/tune_tiles_local}
MODELS=${MODELS:-"8b 135m"} FP8_MODELS=${FP8_MODELS:-"8b"} BATCHES=${BATCHES:-"1 32"}
SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-240} JUDGE_TIMEOUT=${JUDGE_TIMEOUT:-120}
export PYTHONUNBUFFERED=1 FUSIONSERVE_HOME=${FUSIONSERVE_HOME:-/tmp/fusionserve_tune}
W=${W:-/tmp/tune_tiles}  # every file the steps write; tarred into $OUT/details.tgz
TILES=$FUSIONSERVE_HOME/tiles
mkdir -p "$OUT" "$W" "$TILES"
M_SWEEP=$(echo "$BATCHES" | tr ' ' ',')

cache_file() {  # $1: bf16 | fp8 → the table the server reads for this GPU
  python3 -c "import sys, torch; from pathlib import Path; from fusionserve.kernels.tile_configs import cache_file; \
print(cache_file(Path(sys.argv[1]), torch.cuda.get_device_name(), sys.argv[2]))" "$TILES" "$1"
}

sweep() {  # $1: bf16 | fp8; $2: comma-separated models → proposals in $W/proposed_$1.json
  local flag="" only=gemm cached  # the bf16 sweep also times its winners against cuBLAS
  [ "$1" = fp8 ] && flag=--fp8 && only=none
  cached=$(cache_file "$1")
  rm -f "$cached"
  timeout "$SWEEP_TIMEOUT" python3 -m bench.kernels --sweep --save-tiles $flag --models "$2" \
    --sweep-m "$M_SWEEP" --only "$only" --m "$M_SWEEP" --out "$W" 2>&1 | grep -v "it/s\]" | tail -40
  [ -f "$cached" ] && mv "$cached" "$W/proposed_$1.json"  # proposals only: the judge decides
}

judge() {  # $1: model; $2: batch; $3: bf16 | fp8
  [ -f "$W/proposed_$3.json" ] || return 0
  timeout "$JUDGE_TIMEOUT" python3 bench/decode_configs.py --model "$1" --batch "$2" \
    --from-sweep "$W/proposed_$3.json" --save-tiles --out "$W" 2>&1 | grep -v "it/s\]" | tail -14
}

sweep bf16 "$(echo "$MODELS" | tr ' ' ',')"
[ -n "$FP8_MODELS" ] && sweep fp8 "$(echo "$FP8_MODELS" | tr ' ' ',')"
for b in $BATCHES; do
  for m in $MODELS; do judge "$m" "$b" bf16; done
  for m in $FP8_MODELS; do judge "$m-fp8" "$b" fp8; done
done
cp "$TILES"/*.json "$OUT"/ 2>/dev/null
cat "$W"/*.md > "$OUT/summary.md" 2>/dev/null
tar -czf "$OUT/details.tgz" -C "$W" .
echo "cached for this GPU (whole-step winners):"; ls -l "$TILES"
