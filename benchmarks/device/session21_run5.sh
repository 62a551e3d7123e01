set -u
bash benchmarks/device/quant_run.sh tests:100:tests/quant/test_layer_speed.py,tests/kernels/test_quant_kernels.py
mkdir -p $OUT/b1 $OUT/b32
QUANT_SUITE_ARGS="--iters 50 --peers compile_backend,cb-int8-static,cb-fp8-static-tensor-fast" OUT=$OUT/b1 bash benchmarks/device/quant_run.sh suite:230:tv_resnet50:1
QUANT_SUITE_ARGS="--iters 30 --peers compile_backend,cb-int8-static,cb-fp8-static-tensor-fast" OUT=$OUT/b32 bash benchmarks/device/quant_run.sh suite:200:tv_resnet50:32
