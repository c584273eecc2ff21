#!/usr/bin/env bash
# Decode latency of an earlier commit's tree (copied into .bench_before, which git ignores: carry it)
# and of this tree, run alternately on one GPU so both see the same clocks and temperature; then the
# side-by-side table (bench/decode_before_after.py).
#
#   bench/decode_before_after.sh TAG ROUNDS [bench/decode.py options...]
#   e.g. bench/decode_before_after.sh fp32logits 2 --models 135m,8b --batches 1,64 --contexts 512
set -euo pipefail
tag=$1 rounds=$2
shift 2
out=${OUT:-bench/results}/decode_before_after_$tag
for tree in . .bench_before; do  # the namespace links, should the copy have lost them
  for room in server kernels models; do
    [ -L "$tree/fusionserve/$room" ] || { rm -rf "$tree/fusionserve/$room"; ln -s "../$room" "$tree/fusionserve/$room"; }
  done
done
for round in $(seq 1 "$rounds"); do
  (cd .bench_before && python bench/decode.py "$@" --out "$out/before" --tag "round$round")
  python bench/decode.py "$@" --out "$out/after" --tag "round$round"
done
python bench/decode_before_after.py --before "$out/before" --after "$out/after" \
  --label-before before --label-after HEAD --tag "$tag" --out "$out"
