// CUDA kernels of the importance-weighted bound family (see iwae.cuh for the contracts).
//
// Forward: a group of ROW_THREADS threads reduces one [P, Q, D] row (8 lanes for short rows,
// a warp for the usual ones, the whole block when there are too few rows to fill the device),
// reading both inputs in 16-byte packs when every row start is aligned, and summing with warp
// shuffles. Backward: elementwise over the contiguous [P, Q, D] output, 16-byte packs when a
// pack never straddles two rows, 32-bit index division when the flat index fits.
#include "iwae.cuh"

namespace vaekernels::cuda {
namespace {

constexpr int kBlockThreads = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
// Rows of at most this many elements get 8 lanes each, so no lane of a warp idles on short rows.
constexpr int64_t kShortRow = 256;

template <typename T>
struct Accumulator {
  using type = float;
};
template <>
struct Accumulator<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accumulator<T>::type;

// Explicit conversions: torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements per 16-byte load.
template <typename T>
constexpr int kPack = 16 / static_cast<int>(sizeof(T));

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// x * l - softplus(l) with softplus(l) = max(l, 0) + log1p(exp(-|l|)): the exponent is never
// positive, so l = +-1e4 gives a finite term. x * l - max(l, 0) is taken as (x - [l > 0]) * l,
// which is exact for a pixel that matches a confident logit (x = 1, l = 5 gives 0, not
// 5 - 5.0067 rounded at the scale of 5). A coefficient of 0 counts 0 even at l = +-inf (x = 1
// with l = +inf, x = 0 with l = -inf: the answer 0, where 0 * inf would be NaN). A NaN in l or x
// makes the term NaN.
template <typename A>
__device__ __forceinline__ A bernoulli_term(A l, A x) {
  const A coefficient = x - (l > A(0) ? A(1) : A(0));
  return (coefficient == A(0) ? A(0) : coefficient * l) - log1p(exp(-fabs(l)));
}

// 1 / (1 + exp(-l)) computed from exp(-|l|) in (0, 1], so neither branch overflows: l = +-1e4
// gives exactly 1 or 0, never inf / inf.
template <typename A>
__device__ __forceinline__ A sigmoid(A l) {
  const A e = exp(-fabs(l));
  const A r = A(1) / (A(1) + e);
  return l >= A(0) ? r : e * r;
}

// Sum of v over each group of ROW_THREADS consecutive threads, returned to every thread of the
// group. Every thread of the block must call it (it shuffles over full warps and, for a
// block-wide group, synchronises the block).
template <int ROW_THREADS, typename A>
__device__ __forceinline__ A row_sum(A v) {
  constexpr int kLanes = ROW_THREADS < kWarpSize ? ROW_THREADS : kWarpSize;
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullWarp, v, offset);
  if constexpr (ROW_THREADS > kWarpSize) {
    static_assert(ROW_THREADS == kBlockThreads, "a group wider than a warp must be the whole block");
    constexpr int kWarps = ROW_THREADS / kWarpSize;
    __shared__ A warp_sums[kWarps];
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize, lane = static_cast<int>(threadIdx.x) % kWarpSize;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = lane < kWarps ? warp_sums[lane] : A(0);
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullWarp, v, offset);
    // The next row of this block overwrites warp_sums.
    __syncthreads();
  }
  return v;
}

}  // namespace

template <typename T, int VEC, int ROW_THREADS>
__global__ void __launch_bounds__(kBlockThreads)
    bernoulli_log_prob_fwd_kernel(const T* __restrict__ logits, int64_t l_sp, int64_t l_sq, const T* __restrict__ x,
                                  int64_t x_sp, int64_t x_sq, T* __restrict__ out, int64_t Q, int64_t D, int64_t rows) {
  using A = acc_t<T>;
  constexpr int kRowsPerBlock = kBlockThreads / ROW_THREADS;
  const int lane = static_cast<int>(threadIdx.x) % ROW_THREADS;
  const int64_t packed_end = D - D % VEC;
  // The loop bound is the same for the whole block, so every thread reaches row_sum.
  for (int64_t first = int64_t{blockIdx.x} * kRowsPerBlock; first < rows;
       first += int64_t{gridDim.x} * kRowsPerBlock) {
    const int64_t row = first + static_cast<int>(threadIdx.x) / ROW_THREADS;
    A sum = A(0);
    if (row < rows) {
      const int64_t p = row / Q, q = row - p * Q;
      const T* l = logits + p * l_sp + q * l_sq;
      const T* xr = x + p * x_sp + q * x_sq;
      for (int64_t d = int64_t{lane} * VEC; d < packed_end; d += int64_t{ROW_THREADS} * VEC) {
        const Pack<T, VEC> lp = load<VEC>(l + d), xp = load<VEC>(xr + d);
#pragma unroll
        for (int v = 0; v < VEC; ++v) sum += bernoulli_term(to_acc(lp.v[v]), to_acc(xp.v[v]));
      }
      for (int64_t d = packed_end + lane; d < D; d += ROW_THREADS) sum += bernoulli_term(to_acc(l[d]), to_acc(xr[d]));
    }
    sum = row_sum<ROW_THREADS>(sum);
    if (row < rows && lane == 0) out[row] = from_acc<T>(sum);
  }
}

// Index is uint32_t when the flat index (plus one grid stride) fits, int64_t otherwise: the two
// divisions per pack are several times cheaper in 32 bits.
template <typename T, int VEC, typename Index>
__global__ void __launch_bounds__(kBlockThreads)
    bernoulli_log_prob_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ logits, int64_t l_sp,
                                  int64_t l_sq, const T* __restrict__ x, int64_t x_sp, int64_t x_sq,
                                  T* __restrict__ grad_logits, Index Q, Index D, Index numel) {
  using A = acc_t<T>;
  const Index stride = Index{gridDim.x} * kBlockThreads * VEC;
  for (Index i = (Index{blockIdx.x} * kBlockThreads + Index{threadIdx.x}) * VEC; i < numel; i += stride) {
    const Index row = i / D, d = i - row * D;
    const Index p = row / Q, q = row - p * Q;
    const A g = to_acc(grad[row]);
    const Pack<T, VEC> lp = load<VEC>(logits + int64_t{p} * l_sp + int64_t{q} * l_sq + int64_t{d});
    const Pack<T, VEC> xp = load<VEC>(x + int64_t{p} * x_sp + int64_t{q} * x_sq + int64_t{d});
    Pack<T, VEC> result;
#pragma unroll
    for (int v = 0; v < VEC; ++v) result.v[v] = from_acc<T>(g * (to_acc(xp.v[v]) - sigmoid(to_acc(lp.v[v]))));
    *reinterpret_cast<Pack<T, VEC>*>(grad_logits + i) = result;
  }
}

namespace {

// Whether every row start base + p * sp + q * sq is aligned for VEC-element packs.
template <int VEC, typename T>
bool rows_aligned(const T* base, int64_t sp, int64_t sq) {
  return reinterpret_cast<uintptr_t>(base) % (sizeof(T) * VEC) == 0 && sp % VEC == 0 && sq % VEC == 0;
}

// Threads the current device keeps resident at once.
cudaError_t device_threads(int64_t* threads) {
  int device = 0, sms = 0, threads_per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device);
  *threads = int64_t{sms} * threads_per_sm;
  return err;
}

// Launches `kernel` over `work` items at `per_block` items a block, with at most as many blocks
// as the device keeps resident for this kernel (its register use decides how many fit on an SM):
// the kernels' grid-stride loops cover the rest, so a large input runs in one wave of blocks.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), int64_t work, int64_t per_block, cudaStream_t stream, Args... args) {
  int device = 0, sms = 0, blocks_per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kBlockThreads, 0);
  if (err != cudaSuccess) return err;
  const int64_t needed = (work + per_block - 1) / per_block;
  const int64_t resident = int64_t{sms} * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  kernel<<<static_cast<unsigned>(needed < resident ? needed : resident), kBlockThreads, 0, stream>>>(args...);
  return cudaGetLastError();
}

template <typename T>
using FwdKernel = void (*)(const T*, int64_t, int64_t, const T*, int64_t, int64_t, T*, int64_t, int64_t, int64_t);

template <typename T, int VEC>
FwdKernel<T> fwd_kernel(int row_threads) {
  switch (row_threads) {
    case 8:
      return bernoulli_log_prob_fwd_kernel<T, VEC, 8>;
    case kWarpSize:
      return bernoulli_log_prob_fwd_kernel<T, VEC, kWarpSize>;
    default:
      return bernoulli_log_prob_fwd_kernel<T, VEC, kBlockThreads>;
  }
}

}  // namespace

template <typename T>
cudaError_t bernoulli_log_prob_fwd(const T* logits, int64_t l_sp, int64_t l_sq, const T* x, int64_t x_sp,
                                   int64_t x_sq, T* out, int64_t P, int64_t Q, int64_t D, cudaStream_t stream) {
  const int64_t rows = P * Q;
  if (rows == 0) return cudaSuccess;
  int64_t capacity = 0;
  if (const cudaError_t err = device_threads(&capacity); err != cudaSuccess) return err;

  constexpr int kVec = kPack<T>;
  const bool packed = rows_aligned<kVec>(logits, l_sp, l_sq) && rows_aligned<kVec>(x, x_sp, x_sq);
  // A warp per row, unless rows are short (8 lanes), or a warp per row would leave most of the
  // device idle while each row still gives every thread of a block a pack (the whole block).
  int row_threads = kWarpSize;
  if (D <= kShortRow) {
    row_threads = 8;
  } else if (rows * kWarpSize < capacity && D >= int64_t{kBlockThreads} * kVec) {
    row_threads = kBlockThreads;
  }
  const FwdKernel<T> kernel = packed ? fwd_kernel<T, kVec>(row_threads) : fwd_kernel<T, 1>(row_threads);
  return launch(kernel, rows, kBlockThreads / row_threads, stream, logits, l_sp, l_sq, x, x_sp, x_sq, out, Q, D, rows);
}

template <typename T>
cudaError_t bernoulli_log_prob_bwd(const T* grad, const T* logits, int64_t l_sp, int64_t l_sq, const T* x,
                                   int64_t x_sp, int64_t x_sq, T* grad_logits, int64_t P, int64_t Q, int64_t D,
                                   cudaStream_t stream) {
  const int64_t numel = P * Q * D;
  if (numel == 0) return cudaSuccess;
  constexpr int kVec = kPack<T>;
  const bool packed = D % kVec == 0 && rows_aligned<kVec>(logits, l_sp, l_sq) && rows_aligned<kVec>(x, x_sp, x_sq) &&
                      rows_aligned<kVec>(grad_logits, 0, 0);
  const int64_t per_block = int64_t{kBlockThreads} * (packed ? kVec : 1);
  // 32-bit indices when even i + grid stride, computed before the loop test, cannot wrap: the
  // grid has at most numel / per_block + 1 blocks.
  const bool index32 = numel + (numel / per_block + 1) * per_block <= int64_t{UINT32_MAX};
  const auto run = [&](auto kernel, auto index) {
    using Index = decltype(index);
    return launch(kernel, numel, per_block, stream, grad, logits, l_sp, l_sq, x, x_sp, x_sq, grad_logits, Index(Q),
                  Index(D), Index(numel));
  };
  if (packed) {
    return index32 ? run(bernoulli_log_prob_bwd_kernel<T, kVec, uint32_t>, uint32_t{})
                   : run(bernoulli_log_prob_bwd_kernel<T, kVec, int64_t>, int64_t{});
  }
  return index32 ? run(bernoulli_log_prob_bwd_kernel<T, 1, uint32_t>, uint32_t{})
                 : run(bernoulli_log_prob_bwd_kernel<T, 1, int64_t>, int64_t{});
}

template cudaError_t bernoulli_log_prob_fwd<float>(const float*, int64_t, int64_t, const float*, int64_t, int64_t,
                                                   float*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t bernoulli_log_prob_fwd<double>(const double*, int64_t, int64_t, const double*, int64_t, int64_t,
                                                    double*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t bernoulli_log_prob_fwd<__half>(const __half*, int64_t, int64_t, const __half*, int64_t, int64_t,
                                                    __half*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t bernoulli_log_prob_fwd<__nv_bfloat16>(const __nv_bfloat16*, int64_t, int64_t,
                                                           const __nv_bfloat16*, int64_t, int64_t, __nv_bfloat16*,
                                                           int64_t, int64_t, int64_t, cudaStream_t);

template cudaError_t bernoulli_log_prob_bwd<float>(const float*, const float*, int64_t, int64_t, const float*, int64_t,
                                                   int64_t, float*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t bernoulli_log_prob_bwd<double>(const double*, const double*, int64_t, int64_t, const double*,
                                                    int64_t, int64_t, double*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t bernoulli_log_prob_bwd<__half>(const __half*, const __half*, int64_t, int64_t, const __half*,
                                                    int64_t, int64_t, __half*, int64_t, int64_t, int64_t, cudaStream_t);
template cudaError_t bernoulli_log_prob_bwd<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, int64_t, int64_t,
                                                           const __nv_bfloat16*, int64_t, int64_t, __nv_bfloat16*,
                                                           int64_t, int64_t, int64_t, cudaStream_t);

}  // namespace vaekernels::cuda
