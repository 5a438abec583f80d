#!/usr/bin/env bash
# The GPU check of the monitors issue, for a session that is lent a device (device tool):
# the single-device monitor tests on CUDA in float32, 16-mixed and bf16-mixed (side by side,
# the GPU has room), the CUDA-only tests, then the overhead benchmark alone on the GPU.
# Sized for 5 minutes on one H100 (the tests took 3.3 there); each stage has its own time
# limit, with SIGKILL 5 s after SIGTERM, since Lightning catches SIGTERM and runs on.
# Usage, from the repository root, with a CUDA build of torch, Lightning, TensorBoard,
# scikit-learn and pytest installed (the package itself is read from the checkout):
#   PYTHON=python3 bash benchmarks/gpu_check.sh      (logs under $OUT, else /tmp/gpu_check)
set -u
py=${PYTHON:-python}
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 OMP_NUM_THREADS=4
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
"$py" -c "import torch, lightning; print('torch', torch.__version__, '| lightning',
lightning.__version__, '|', torch.cuda.get_device_name(0))" 2>&1 | tee "$out/device.txt"

tests="tests/test_hessian_monitor.py tests/test_spectrum_monitor.py tests/test_sharpness_monitor.py
       tests/test_gradient_norms.py tests/test_noise_scale_monitor.py tests/test_landscape_monitor.py
       tests/test_initializer.py tests/test_batch_size_scheduler.py tests/test_project_kinds.py"
cuda_only="tests/test_distributed.py tests/test_composites.py"
# Collect first: a broken environment costs seconds of the lease, not minutes.
timeout -k 5 90 "$py" -m pytest -q --collect-only -p no:cacheprovider $tests $cuda_only \
    >"$out/collect.txt" 2>&1
status=$?
tail -n 3 "$out/collect.txt"
[ $status = 0 ] || exit $status
# Tests that pin a CPU precision plugin or compare CPU-only mixed precision stay on the CPU;
# the two-process tests need two devices.
skip="not amp_unscaling and not bf16_mixed and not ddp"
for precision in 32-true 16-mixed bf16-mixed; do
    LANDSCAPE_TEST_ACCELERATOR=gpu LANDSCAPE_TEST_PRECISION=$precision timeout -k 5 200 \
        "$py" -m pytest -q -p no:cacheprovider --basetemp="/tmp/pytest_$precision" -k "$skip" \
        $tests >"$out/tests_$precision.log" 2>&1 &
done
# SyncBatchNorm measured on CUDA by two ranks sharing the GPU over gloo; the composites
# that measurements run in place of kernels without a double backward, against CUDA's.
{
    timeout -k 5 120 "$py" -m pytest -q -p no:cacheprovider --basetemp=/tmp/pytest_sync -k cuda \
        tests/test_distributed.py
    LANDSCAPE_TEST_ACCELERATOR=gpu timeout -k 5 120 "$py" -m pytest -q -p no:cacheprovider \
        --basetemp=/tmp/pytest_composites tests/test_composites.py
} >"$out/tests_cuda_only.log" 2>&1 &
wait
for log in "$out"/tests_*.log; do
    echo "== $(basename "$log")"
    grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|error)|Timeout" "$log"
done
# The spectrum monitor's default cadence (every epoch) is left out: its 100 products per
# epoch, each a string of small kernels, would take the check's whole time.
timeout -k 5 150 "$py" benchmarks/monitor_overhead.py --accelerator gpu --steps 900 --repeats 2 \
    --only HessianEigenvalueMonitor SharpnessMonitor GradientNormMonitor GradientNoiseScaleMonitor \
    2>&1 | grep -E "^(torch|\|)" | tee "$out/overhead.txt"
