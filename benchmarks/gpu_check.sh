#!/usr/bin/env bash
# The GPU measurements as one script, for a GPU machine that has CUDA PyTorch but not
# mpcdp's other dependencies and no network (the workplace's device tool).
#
# Here, once (wheels for the device's CPython 3.12, kept out of git by .git/info/exclude):
#     bash benchmarks/gpu_check.sh --fetch-wheels
# Then on the GPU machine, from the repository root, with .whl carried along:
#     bash benchmarks/gpu_check.sh            # dp_step (all models) + a site's pad on the GPU
#                                             # + federation_overhead + bf16 dp_step
#                                             # + first_use_checks
#     bash benchmarks/gpu_check.sh --quick    # the same, small: checks the CUDA paths run
# Output: dp_step.json, overhead.json, pads_gpu.log and the other logs in $OUT (./gpu-out when
# OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    # the versions the CPU development environment runs; --no-deps: the device image has
    # numpy, scipy, torch, click, rich, shellingham, opt-einsum
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 randomgen==2.5.1 grpcio==1.85.3 \
        grpcio-health-checking==1.85.1 protobuf==7.36.2 opacus==1.6.0 typer==0.29.2 \
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 annotated-doc==0.0.7 \
        typing-inspection==0.4.5 numba==0.68.1 llvmlite==0.50.0
    du -sh .whl
    exit 0
fi

out="${OUT:-gpu-out}"
mkdir -p "$out"
if ! python3 -c 'import cryptography, randomgen, grpc, opacus, typer, numba' 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/mpcdp-site .whl/*.whl
    export PYTHONPATH="/tmp/mpcdp-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
(nvidia-smi -L || true) | tee "$out/device.log"
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' \
    | tee -a "$out/device.log"

if [[ "${1:-}" == "--quick" ]]; then
    dp=(--models cnn transformer --batch-size 32 --repeat 2 --warmup 1 --layers 1)
    fo=(--model mlp:256,256,10 --examples 64 --batch-size 24 --steps 2 --warmup 1 --repeat 1)
    pads=(--params 1000000 --repeat 2)
else
    dp=()
    fo=()
    pads=()
fi
python3 -m benchmarks.dp_step "${dp[@]}" --json "$out/dp_step.json" 2>&1 | tee "$out/dp_step.log"
# a site's Skellam share made on the GPU (CSPRNG words on the CPU, the table's transform on
# the device) next to a DP step of the 10M-parameter MLP on the same GPU, and the one-pass
# CPU pad and the old two-pass path on this machine's cores
python3 -m benchmarks.pads --device cuda "${pads[@]}" 2>&1 | tee "$out/pads_gpu.log"
python3 -m benchmarks.pads "${pads[@]}" 2>&1 | tee "$out/pads_cpu.log"
python3 -m benchmarks.federation_overhead "${fo[@]}" --json "$out/overhead.json" 2>&1 \
    | tee "$out/overhead.log"
# the cost of float32 clipping under bf16 autocast, and of the first-use checks
# (with autocast, also that honest models pass them at half-precision tolerance on the GPU)
python3 -m benchmarks.dp_step "${dp[@]}" --autocast bf16 --json "$out/dp_step_bf16.json" 2>&1 \
    | tee "$out/dp_step_bf16.log"
for ac in none bf16; do
    python3 -m benchmarks.first_use_checks --repeat 3 --autocast "$ac" 2>&1 \
        | tee "$out/first_use_checks_$ac.log"
done
# the user-model path (demos/federated_cnn) as a real federated run with site-a on
# the GPU (needs scikit-learn and pillow on the machine; skipped otherwise). dp_step above
# already covers torch's nn.TransformerEncoder made clippable (model torch-transformer).
if python3 -c 'import sklearn, PIL' 2>/dev/null; then
    demo="$(mktemp -d)/cnn"
    cp -r demos/federated_cnn "$demo"
    sed -i 's/^id = "site-a"$/id = "site-a"\ndevice = "cuda"/' "$demo/site-a/party.toml"
    (
        cd "$demo" && python3 prepare.py >/dev/null
        python3 -m mpcdp certs init --out certs --parties site-a,site-b,site-c \
            --coordinators analyst >/dev/null
        for s in a b c; do python3 -m mpcdp party init --config "site-$s/party.toml" >/dev/null; done
        for s in a b c; do (cd "site-$s" && exec python3 -m mpcdp party serve --config party.toml \
            >"serve.log" 2>&1) & done
        sleep 10
        /usr/bin/time -v python3 -m mpcdp train --federation federation.toml --dataset digits \
            --model mynet:build --python-path code --target-epsilon 3 --target-delta 1e-5 \
            --epochs 20 --batch-size 128 --lr 0.1 --max-grad-norm 0.5 --eval test.npz
        kill $(jobs -p) 2>/dev/null || true
    ) 2>&1 | tee "$out/cnn_demo_gpu_site.log"
else
    echo "cnn demo: scikit-learn or pillow missing, skipped" | tee "$out/cnn_demo_gpu_site.log"
fi
