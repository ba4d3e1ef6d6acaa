#!/usr/bin/env bash
# Builds the peer for bench/llama_cpp_peer.py on a machine WITHOUT a GPU (no device time): llama.cpp's
# llama-bench and llama-batched-bench with CUDA for sm_90 (H100 / H200), linked into ONE executable
# (one copy of the CUDA kernels: the carry limit of the GPU machine is 64 MiB), then xz-compressed into
# .llama/ for `bench/device.sh peer` (carry: [".llama"]).
#
#     bench/build_llama_cpp.sh [WORK_DIR]        # about an hour on two cores; root, for the toolkit
#
# Needs: CUDA's nvcc 13 in /usr/local/cuda-13.0 (on this project's machines), cmake, g++, pip.
# llama.cpp's source comes from PyPI (the sdist of llama-cpp-python vendors it), cuBLAS from the
# nvidia-cublas wheel (copied into the toolkit, which lacks it here). libcuda is linked against a stub
# of the few driver functions ggml calls directly; the real driver is loaded on the GPU machine.
#
#     bench/build_llama_cpp.sh --cpu [WORK_DIR]  # the CPU peer of bench/cpu_decode.py, into .llama-cpu/
#
# --cpu builds llama-bench and llama-batched-bench for this machine's CPU without CUDA (about 20
# minutes on two cores): AVX2, and AVX-512 where the CPU has it, as ggml's own CPU variants; not
# GGML_NATIVE, whose AMX kernels crash llama-batched-bench on this project's machines.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CPU_ONLY=
if [ "${1:-}" = "--cpu" ]; then CPU_ONLY=1; shift; fi
WORK=${1:-/tmp/llama-build${CPU_ONLY:+-cpu}}
CUDA=/usr/local/cuda-13.0
mkdir -p "$WORK" && cd "$WORK"

if [ ! -d src ]; then
    python3 -m pip download --no-deps --no-binary :all: llama-cpp-python -d sdist
    mkdir src && tar -xzf sdist/llama_cpp_python-*.tar.gz -C src --strip-components=1
fi
if [ -n "$CPU_ONLY" ]; then
    avx512=OFF
    grep -q avx512f /proc/cpuinfo && avx512=ON
    cmake -S src/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=ON -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
        -DGGML_BMI2=ON -DGGML_AVX512=$avx512 -DGGML_AVX512_VBMI=$avx512 -DGGML_AVX512_VNNI=$avx512 \
        -DGGML_AVX512_BF16=$avx512
    cmake --build build -j"$(nproc)" --target llama-bench llama-batched-bench
    mkdir -p "$REPO/.llama-cpu"
    cp build/bin/llama-bench build/bin/llama-batched-bench "$REPO/.llama-cpu/"
    ls -la "$REPO/.llama-cpu"
    exit 0
fi
if [ ! -f "$CUDA/include/cublas_v2.h" ]; then
    python3 -m pip download --no-deps nvidia-cublas -d cublas
    (cd cublas && unzip -q -o nvidia_cublas-*.whl)
    cp -n cublas/nvidia/cu13/include/* "$CUDA/include/"
    cp cublas/nvidia/cu13/lib/libcublas.so.13 cublas/nvidia/cu13/lib/libcublasLt.so.13 "$CUDA/lib/"
    ln -sf libcublas.so.13 "$CUDA/lib/libcublas.so"
    ln -sf libcublasLt.so.13 "$CUDA/lib/libcublasLt.so"
fi
mkdir -p stub
cat > stub/stub.c <<'EOF'
#include <cuda.h>
CUresult cuDeviceGet(CUdevice *d, int o) { return 0; }
CUresult cuDeviceGetAttribute(int *p, CUdevice_attribute a, CUdevice d) { return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { return 0; }
CUresult cuMemAddressFree(CUdeviceptr p, size_t s) { return 0; }
CUresult cuMemAddressReserve(CUdeviceptr *p, size_t s, size_t a, CUdeviceptr addr, unsigned long long f) { return 0; }
CUresult cuMemCreate(CUmemGenericAllocationHandle *h, size_t s, const CUmemAllocationProp *p, unsigned long long f) { return 0; }
CUresult cuMemGetAllocationGranularity(size_t *g, const CUmemAllocationProp *p, CUmemAllocationGranularity_flags o) { return 0; }
CUresult cuMemMap(CUdeviceptr p, size_t s, size_t o, CUmemGenericAllocationHandle h, unsigned long long f) { return 0; }
CUresult cuMemRelease(CUmemGenericAllocationHandle h) { return 0; }
CUresult cuMemSetAccess(CUdeviceptr p, size_t s, const CUmemAccessDesc *d, size_t c) { return 0; }
CUresult cuMemUnmap(CUdeviceptr p, size_t s) { return 0; }
EOF
gcc -shared -fPIC -I"$CUDA/include" -Wl,-soname,libcuda.so.1 -o stub/libcuda.so stub/stub.c

LLAMA=src/vendor/llama.cpp
cmake -S "$LLAMA" -B build -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
    -DCUDAToolkit_ROOT="$CUDA" -DCMAKE_CUDA_COMPILER="$CUDA/bin/nvcc" \
    -DCUDA_cuda_driver_LIBRARY="$WORK/stub/libcuda.so"
cmake --build build -j"$(nproc)" --target llama-bench llama-batched-bench

# one executable, both benchmarks: `llama-both bench ARGS` / `llama-both batched ARGS`
cat > both.cpp <<'EOF'
#include <cstdio>
#include <cstring>
int llama_bench(int argc, char ** argv);
int llama_batched_bench(int argc, char ** argv);
int main(int argc, char ** argv) {
    if (argc > 1 && !strcmp(argv[1], "bench")) { argv[1] = argv[0]; return llama_bench(argc - 1, argv + 1); }
    if (argc > 1 && !strcmp(argv[1], "batched")) { argv[1] = argv[0]; return llama_batched_bench(argc - 1, argv + 1); }
    fprintf(stderr, "usage: %s bench|batched ARGS\n", argv[0]);
    return 2;
}
EOF
B=build
c++ -O2 -c both.cpp -o both.o
c++ -O3 both.o -o llama-both $B/tools/llama-bench/libllama-bench-impl.a \
    $B/tools/batched-bench/libllama-batched-bench-impl.a $B/common/libllama-common.a \
    $B/common/libllama-common-base.a $B/vendor/cpp-httplib/libcpp-httplib.a -lssl -lcrypto $B/src/libllama.a \
    $B/ggml/src/libggml.a -ldl $B/ggml/src/libggml-cpu.a $B/ggml/src/ggml-cuda/libggml-cuda.a \
    $B/ggml/src/libggml-base.a -fopenmp -lpthread -lm "$CUDA/lib/libcudart.so" "$CUDA/lib/libcublas.so" \
    "$CUDA/lib/libcublasLt.so" "$CUDA/lib/libculibos.a" "$WORK/stub/libcuda.so"
strip llama-both
mkdir -p "$REPO/.llama"
xz -9 -T0 -c llama-both > "$REPO/.llama/llama-both.xz"
# the host libraries it needs that the GPU machine's image may lack
tar -C /lib/x86_64-linux-gnu -cJhf "$REPO/.llama/libs.tar.xz" libgomp.so.1 libssl.so.3 libcrypto.so.3
ls -la "$REPO/.llama"
