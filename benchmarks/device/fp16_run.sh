#!/bin/bash
# One call on the GPU machine for the FP16 issue (#17): suite parts and kernel profiles of the
# models no one here wrote. Arguments, run in order, each NAME:SECONDS:
#   part=N[@PEERS]:S  python -m benchmarks.suite --part N [--peers PEERS] (budget S - 10 s), into
#                     $OUT/suite_real_h200.json
#   profile=CASE:S  python -m benchmarks.kernel_profile --case CASE (inductor vs ours without graphs)
#   startup=M1,M2:S python -m benchmarks.startup --models M1 M2 (cold and warm child per model, our
#                     default autotune level), into $OUT/startup_real_h200.json
# The commit comes from .commit (the tree there has no .git).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=$PWD
COMMIT=$(cat .commit 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
for spec in "$@"; do
  kind=${spec%%=*}; rest=${spec#*=}
  limit=${rest##*:}; what=${rest%:*}
  start=$(date +%s)
  case "$kind" in
    part) peers=""; [[ "$what" == *@* ]] && peers="--peers ${what#*@}" && what=${what%@*}
          timeout "$limit" python3 -m benchmarks.suite --part "$what" $peers --no-warm-compile --commit "$COMMIT" \
            --budget-s $((limit - 10)) --out "$OUT/suite_real_h200.json" > "$OUT/part$what.log" 2>&1
          grep -A12 "size=base" "$OUT/part$what.log" | cut -c1-200 ;;
    profile) timeout "$limit" python3 -m benchmarks.kernel_profile --case "$what" --commit "$COMMIT" --top 25 \
            --peers "inductor,compile_backend[cuda_graphs=off,speed_check=false]" --out "$OUT/profile_${what/:/_}_h200.json" \
            > "$OUT/profile_${what/:/_}.log" 2>&1
          tail -70 "$OUT/profile_${what/:/_}.log" | cut -c1-160 ;;
    startup) timeout "$limit" python3 -m benchmarks.startup --models ${what//,/ } --commit "$COMMIT" \
            --budget-s $((limit - 10)) --out "$OUT/startup_real_h200.json" > "$OUT/startup.log" 2>&1
          tail -25 "$OUT/startup.log" | cut -c1-220 ;;
  esac
  echo "== $spec: $(( $(date +%s) - start )) s"
done
