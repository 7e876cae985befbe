// mscp's CUDA kernels: the CUDA dispatch key of torch.ops.mscp_ext.{channel_sumsq,
// row_importance,lowrank_project,lora_attribution} (schemas are defined in mscp_ops.cpp). Semantics
// are those of the pure-torch references in kernels/*.py. Storage dtypes (bf16/fp16/fp32/fp64) are
// read directly and upcast in registers; accumulation is fp32 (fp64 for fp64 lowrank_project and
// lora_attribution inputs; lora_attribution's sum over the ranks and its output are fp64).
//
// NOTE: compiled in CI with nvcc (tests/test_cuda_compile.py) but, at the time of writing, never
// run on a GPU: the Triton backend is the tested GPU path until these kernels are validated.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace mscp_ext {
namespace {

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// ------------------------------------------------------------------------------------------
// channel_sumsq: one thread per channel (coalesced across a token's channels), a block of
// tokens per grid row; partial sums are added to acc with one atomicAdd per channel per block.
// ------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void channel_sumsq_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ mask,
                                     float* __restrict__ acc, unsigned long long* __restrict__ count,
                                     int64_t n_tokens, int64_t d, int64_t tokens_per_block) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * tokens_per_block;
  const int64_t t1 = min(n_tokens, t0 + tokens_per_block);
  float s = 0.f;
  unsigned long long n = 0;
  for (int64_t t = t0; t < t1; ++t) {
    if (mask[t]) {
      ++n;
      if (j < d) {
        const float v = static_cast<float>(x[t * d + j]);
        s += v * v;
      }
    }
  }
  if (j < d && t1 > t0) atomicAdd(acc + j, s);
  if (blockIdx.x == 0 && threadIdx.x == 0 && n) atomicAdd(count, n);
}

void channel_sumsq_cuda(const at::Tensor& x, const at::Tensor& token_mask, const at::Tensor& acc,
                        const at::Tensor& count) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d = x.size(-1);
  at::Tensor x2 = x.reshape({-1, d}).contiguous();
  at::Tensor m = token_mask.reshape({-1}).contiguous();
  const int64_t T = x2.size(0);
  if (T == 0 || d == 0) return;
  at::Tensor acc_c = acc.is_contiguous() ? acc : at::zeros_like(acc, at::MemoryFormat::Contiguous);
  at::Tensor cnt = at::zeros({1}, count.options());
  const int64_t tpb = 64;
  const dim3 grid(static_cast<unsigned>(ceil_div(d, kThreads)), static_cast<unsigned>(ceil_div(T, tpb)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "channel_sumsq_cuda", [&] {
    channel_sumsq_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x2.data_ptr<scalar_t>(), m.data_ptr<bool>(), acc_c.data_ptr<float>(),
        reinterpret_cast<unsigned long long*>(cnt.data_ptr<int64_t>()), T, d, tpb);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!acc_c.is_same(acc)) acc.add_(acc_c);
  count.add_(cnt);
}

// ------------------------------------------------------------------------------------------
// row_importance: one warp per row. Lanes stride over d_in; each forms
// w = W[i,j] + sum_q sB[i,q] A[q,j] in registers (sB = scale*B, row kept in shared memory),
// and accumulates |w| * N[j, k0:k0+8]; warp reduction at the end.
// ------------------------------------------------------------------------------------------
constexpr int kRiWarps = 8;
constexpr int kRiK = 8;
constexpr int kRiMaxR = 128;

template <typename scalar_t>
__global__ void row_importance_kernel(const scalar_t* __restrict__ W, const float* __restrict__ sB,
                                      const float* __restrict__ A, const float* __restrict__ N,
                                      float* __restrict__ out, int64_t d_out, int64_t d_in, int64_t r,
                                      int64_t K, int64_t k0) {
  __shared__ float sb_sh[kRiWarps][kRiMaxR];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRiWarps + warp;
  if (i >= d_out) return;
  for (int64_t q = lane; q < r; q += 32) sb_sh[warp][q] = sB[i * r + q];
  __syncwarp();
  const int kc = static_cast<int>(min(static_cast<int64_t>(kRiK), K - k0));
  float acc[kRiK];
#pragma unroll
  for (int k = 0; k < kRiK; ++k) acc[k] = 0.f;
  for (int64_t j = lane; j < d_in; j += 32) {
    float w = static_cast<float>(W[i * d_in + j]);
    for (int64_t q = 0; q < r; ++q) w += sb_sh[warp][q] * A[q * d_in + j];
    w = fabsf(w);
#pragma unroll
    for (int k = 0; k < kRiK; ++k)
      if (k < kc) acc[k] += w * N[j * K + k0 + k];
  }
#pragma unroll
  for (int k = 0; k < kRiK; ++k) {
    const float s = warp_sum(acc[k]);
    if (lane == 0 && k < kc) out[i * K + k0 + k] = s;
  }
}

at::Tensor row_importance_cuda(const at::Tensor& W, const std::optional<at::Tensor>& B,
                               const std::optional<at::Tensor>& A, double scale, const at::Tensor& N) {
  TORCH_CHECK(W.dim() == 2 && N.dim() == 2 && N.size(0) == W.size(1), "N must be (d_in, K)");
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t d_out = W.size(0), d_in = W.size(1), K = N.size(1);
  at::Tensor out = at::zeros({d_out, K}, W.options().dtype(at::kFloat));
  if (d_out == 0 || d_in == 0 || K == 0) return out;
  at::Tensor Wc = W.contiguous();
  at::Tensor Nf = N.to(at::kFloat).contiguous();
  int64_t r = (B.has_value() && A.has_value()) ? B->size(1) : 0;
  TORCH_CHECK(r <= kRiMaxR, "row_importance_cuda supports LoRA rank up to ", kRiMaxR);
  at::Tensor sB = r ? (B->to(at::kFloat) * scale).contiguous() : at::zeros({1}, out.options());
  at::Tensor Af = r ? A->to(at::kFloat).contiguous() : at::zeros({1}, out.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>(ceil_div(d_out, kRiWarps));
  for (int64_t k0 = 0; k0 < K; k0 += kRiK) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Wc.scalar_type(), "row_importance_cuda", [&] {
      row_importance_kernel<scalar_t><<<blocks, kRiWarps * 32, 0, stream>>>(
          Wc.data_ptr<scalar_t>(), sB.data_ptr<float>(), Af.data_ptr<float>(), Nf.data_ptr<float>(),
          out.data_ptr<float>(), d_out, d_in, r, K, k0);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// lowrank_project
//   pass 1: one thread per column j (coalesced), a slice of rows per grid row; accumulates
//           G[j, k0:k0+16] in registers and ||V||^2, atomically added to global memory.
//   pass 2: one block per selected row; threads stride over d_in accumulating V[i,j] G[j,k],
//           block reduction, then B' = (1 - alpha) B + alpha CB / ||V|| for that row.
// ------------------------------------------------------------------------------------------
constexpr int kLpR = 16;

template <typename scalar_t, typename acc_t>
__global__ void lp_pass1_kernel(const scalar_t* __restrict__ Wa, const scalar_t* __restrict__ Wb,
                                const acc_t* __restrict__ B, acc_t* __restrict__ G, acc_t* __restrict__ sumsq,
                                int64_t d_out, int64_t d_in, int64_t r, int64_t rows_per_block) {
  __shared__ acc_t b_sh[32][kLpR];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * kLpR;
  const int64_t i_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t i_end = min(d_out, i_begin + rows_per_block);
  acc_t g[kLpR];
#pragma unroll
  for (int k = 0; k < kLpR; ++k) g[k] = 0;
  acc_t sq = 0;
  for (int64_t i0 = i_begin; i0 < i_end; i0 += 32) {
    __syncthreads();
    for (int t = threadIdx.x; t < 32 * kLpR; t += blockDim.x) {
      const int64_t ii = i0 + t / kLpR, kk = k0 + t % kLpR;
      b_sh[t / kLpR][t % kLpR] = (ii < i_end && kk < r) ? B[ii * r + kk] : acc_t(0);
    }
    __syncthreads();
    if (j < d_in) {
      const int64_t n = min(static_cast<int64_t>(32), i_end - i0);
      for (int64_t ii = 0; ii < n; ++ii) {
        const acc_t v = static_cast<acc_t>(Wa[(i0 + ii) * d_in + j]) - static_cast<acc_t>(Wb[(i0 + ii) * d_in + j]);
        sq += v * v;
#pragma unroll
        for (int k = 0; k < kLpR; ++k) g[k] += v * b_sh[ii][k];
      }
    }
  }
  if (j < d_in) {
#pragma unroll
    for (int k = 0; k < kLpR; ++k)
      if (k0 + k < r) atomicAdd(G + j * r + k0 + k, g[k]);
  }
  if (blockIdx.z == 0) {
    sq = warp_sum(sq);
    if ((threadIdx.x & 31) == 0) atomicAdd(sumsq, sq);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void lp_pass2_kernel(const scalar_t* __restrict__ Wa, const scalar_t* __restrict__ Wb,
                                const acc_t* __restrict__ G, const acc_t* __restrict__ sumsq,
                                const int64_t* __restrict__ rows, const acc_t* __restrict__ B,
                                acc_t* __restrict__ new_rows, int64_t d_in, int64_t r, acc_t alpha) {
  __shared__ acc_t red[kThreads / 32][kLpR];
  const int64_t s = blockIdx.x;
  const int64_t i = rows[s];
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kLpR;
  acc_t cb[kLpR];
#pragma unroll
  for (int k = 0; k < kLpR; ++k) cb[k] = 0;
  for (int64_t j = threadIdx.x; j < d_in; j += blockDim.x) {
    const acc_t v = static_cast<acc_t>(Wa[i * d_in + j]) - static_cast<acc_t>(Wb[i * d_in + j]);
#pragma unroll
    for (int k = 0; k < kLpR; ++k)
      if (k0 + k < r) cb[k] += v * G[j * r + k0 + k];
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < kLpR; ++k) {
    const acc_t t = warp_sum(cb[k]);
    if (lane == 0) red[warp][k] = t;
  }
  __syncthreads();
  if (threadIdx.x < kLpR) {
    const int k = threadIdx.x;
    if (k0 + k < r) {
      acc_t tot = 0;
      for (int w = 0; w < kThreads / 32; ++w) tot += red[w][k];
      const acc_t norm = sqrt(*sumsq);
      const acc_t b = B[i * r + k0 + k];
      new_rows[s * r + k0 + k] = (acc_t(1) - alpha) * b + alpha * (tot / norm);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> lowrank_project_cuda(const at::Tensor& W_a, const at::Tensor& W_b,
                                                        const at::Tensor& B, const at::Tensor& rows,
                                                        double alpha) {
  TORCH_CHECK(W_a.dim() == 2 && W_a.sizes() == W_b.sizes(), "W_a and W_b must be the same 2-D shape");
  TORCH_CHECK(B.dim() == 2 && B.size(0) == W_a.size(0), "B must be (d_out, r)");
  const c10::cuda::CUDAGuard guard(B.device());
  const bool f64 = W_a.scalar_type() == at::kDouble || W_b.scalar_type() == at::kDouble ||
                   B.scalar_type() == at::kDouble;
  const auto acc_dtype = f64 ? at::kDouble : at::kFloat;
  const int64_t d_out = W_a.size(0), d_in = W_a.size(1), r = B.size(1);
  // One storage dtype for both weights (promotion never loses precision).
  const auto wdtype = at::promote_types(W_a.scalar_type(), W_b.scalar_type());
  at::Tensor Wa = W_a.to(wdtype).contiguous(), Wb = W_b.to(wdtype).contiguous();
  at::Tensor Bacc = B.to(acc_dtype).contiguous();
  at::Tensor G = at::zeros({std::max<int64_t>(d_in, 1), std::max<int64_t>(r, 1)}, B.options().dtype(acc_dtype));
  at::Tensor sumsq = at::zeros({1}, B.options().dtype(acc_dtype));
  at::Tensor out = B.clone(at::MemoryFormat::Contiguous);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (d_out > 0 && d_in > 0) {
    const int64_t col_blocks = ceil_div(d_in, kThreads), r_blocks = ceil_div(std::max<int64_t>(r, 1), kLpR);
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, B.device().index()));
    const int64_t want = std::max<int64_t>(1, ceil_div(4 * sms, col_blocks * r_blocks));
    const int64_t rows_per_block = std::max<int64_t>(32, ceil_div(ceil_div(d_out, want), 32) * 32);
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(ceil_div(d_out, rows_per_block)),
                    static_cast<unsigned>(r_blocks));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wdtype, "lowrank_project_cuda_pass1", [&] {
      if (f64) {
        lp_pass1_kernel<scalar_t, double><<<grid, kThreads, 0, stream>>>(
            Wa.data_ptr<scalar_t>(), Wb.data_ptr<scalar_t>(), Bacc.data_ptr<double>(), G.data_ptr<double>(),
            sumsq.data_ptr<double>(), d_out, d_in, r, rows_per_block);
      } else {
        lp_pass1_kernel<scalar_t, float><<<grid, kThreads, 0, stream>>>(
            Wa.data_ptr<scalar_t>(), Wb.data_ptr<scalar_t>(), Bacc.data_ptr<float>(), G.data_ptr<float>(),
            sumsq.data_ptr<float>(), d_out, d_in, r, rows_per_block);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor norm = sumsq.sqrt().reshape({}).to(at::kFloat);
  const int64_t nsel = rows.numel();
  if (nsel == 0 || r == 0 || d_out == 0 || d_in == 0) return {out, norm};
  // The selection is skipped when V is zero (one device-to-host sync per module).
  if (!(sumsq.item<double>() > 0)) return {out, norm};
  at::Tensor idx = rows.to(B.device(), at::kLong);
  idx = at::where(idx < 0, idx + d_out, idx).contiguous();
  at::Tensor new_rows = at::empty({nsel, r}, B.options().dtype(acc_dtype));
  const dim3 grid2(static_cast<unsigned>(nsel), static_cast<unsigned>(ceil_div(r, kLpR)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wdtype, "lowrank_project_cuda_pass2", [&] {
    if (f64) {
      lp_pass2_kernel<scalar_t, double><<<grid2, kThreads, 0, stream>>>(
          Wa.data_ptr<scalar_t>(), Wb.data_ptr<scalar_t>(), G.data_ptr<double>(), sumsq.data_ptr<double>(),
          idx.data_ptr<int64_t>(), Bacc.data_ptr<double>(), new_rows.data_ptr<double>(), d_in, r, alpha);
    } else {
      lp_pass2_kernel<scalar_t, float><<<grid2, kThreads, 0, stream>>>(
          Wa.data_ptr<scalar_t>(), Wb.data_ptr<scalar_t>(), G.data_ptr<float>(), sumsq.data_ptr<float>(),
          idx.data_ptr<int64_t>(), Bacc.data_ptr<float>(), new_rows.data_ptr<float>(), d_in, r,
          static_cast<float>(alpha));
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  out.index_put_({idx}, new_rows.to(B.scalar_type()));
  return {out, norm};
}

// ------------------------------------------------------------------------------------------
// lora_attribution: a[i] = scale * sum_k E[i, k] (G^T u)[i, k]. One thread per row i (a column
// of G: coalesced across the threads for each token), a range of tokens per grid row and 16 ranks
// per grid z; u for 32 tokens at a time in shared memory; P[i, k0:k0+16] accumulates in registers
// (fp32; fp64 for fp64 inputs), then sum_k E[i, k] P[i, k] in fp64 is atomically added to out[i].
// ------------------------------------------------------------------------------------------
constexpr int kLaR = 16;
constexpr int kLaTok = 32;

template <typename scalar_t, typename acc_t>
__global__ void lora_attribution_kernel(const scalar_t* __restrict__ G, int64_t ldg, const acc_t* __restrict__ U,
                                        const double* __restrict__ E, double* __restrict__ out, int64_t T,
                                        int64_t D, int64_t r, int64_t tokens_per_block) {
  __shared__ acc_t u_sh[kLaTok][kLaR];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.z) * kLaR;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * tokens_per_block;
  const int64_t t_end = min(T, t_begin + tokens_per_block);
  acc_t p[kLaR];
#pragma unroll
  for (int k = 0; k < kLaR; ++k) p[k] = 0;
  for (int64_t t0 = t_begin; t0 < t_end; t0 += kLaTok) {
    __syncthreads();
    for (int s = threadIdx.x; s < kLaTok * kLaR; s += blockDim.x) {
      const int64_t tt = t0 + s / kLaR, kk = k0 + s % kLaR;
      u_sh[s / kLaR][s % kLaR] = (tt < t_end && kk < r) ? U[tt * r + kk] : acc_t(0);
    }
    __syncthreads();
    if (i < D) {
      const int64_t n = min(static_cast<int64_t>(kLaTok), t_end - t0);
      for (int64_t tt = 0; tt < n; ++tt) {
        const acc_t g = static_cast<acc_t>(G[(t0 + tt) * ldg + i]);
#pragma unroll
        for (int k = 0; k < kLaR; ++k) p[k] += g * u_sh[tt][k];
      }
    }
  }
  if (i < D) {
    double a = 0.0;
#pragma unroll
    for (int k = 0; k < kLaR; ++k)
      if (k0 + k < r) a += static_cast<double>(p[k]) * E[i * r + k0 + k];
    atomicAdd(out + i, a);
  }
}

at::Tensor lora_attribution_cuda(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& edit, double scale) {
  TORCH_CHECK(grad.dim() >= 1 && u.dim() == grad.dim(), "grad [..., d_out] and u [..., r] must share their leading dims");
  TORCH_CHECK(edit.dim() == 2 && edit.size(0) == grad.size(-1) && edit.size(1) == u.size(-1),
              "edit must be (d_out, r)");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t D = grad.size(-1), r = u.size(-1);
  int64_t T = 1;  // the tokens: not reshape(-1, D), which fails when D or R is 0
  for (int64_t d = 0; d + 1 < grad.dim(); ++d) T *= grad.size(d);
  at::Tensor G = grad.reshape({T, D});
  if (G.size(0) > 0 && D > 1 && G.stride(1) != 1) G = G.contiguous();
  TORCH_CHECK(u.numel() == T * r, "grad and u must share their leading dims");
  at::Tensor out = at::zeros({D}, grad.options().dtype(at::kDouble));
  if (D == 0 || T == 0 || r == 0) return out;
  const int64_t ldg = T > 1 ? G.stride(0) : D;
  const bool f64 = grad.scalar_type() == at::kDouble || u.scalar_type() == at::kDouble;
  at::Tensor U = u.reshape({T, r}).to(f64 ? at::kDouble : at::kFloat).contiguous();
  at::Tensor E = edit.to(grad.device(), at::kDouble).contiguous();
  const int64_t col_blocks = ceil_div(D, kThreads), r_blocks = ceil_div(r, kLaR);
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, grad.device().index()));
  // Enough blocks to fill the device: the tokens are split, their partial scores added atomically.
  const int64_t want = std::max<int64_t>(1, ceil_div(4 * sms, col_blocks * r_blocks));
  const int64_t tokens_per_block = std::max<int64_t>(kLaTok, ceil_div(ceil_div(T, want), kLaTok) * kLaTok);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(ceil_div(T, tokens_per_block)),
                  static_cast<unsigned>(r_blocks));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "lora_attribution_cuda", [&] {
    if (f64) {
      lora_attribution_kernel<scalar_t, double><<<grid, kThreads, 0, stream>>>(
          G.data_ptr<scalar_t>(), ldg, U.data_ptr<double>(), E.data_ptr<double>(), out.data_ptr<double>(), T, D, r,
          tokens_per_block);
    } else {
      lora_attribution_kernel<scalar_t, float><<<grid, kThreads, 0, stream>>>(
          G.data_ptr<scalar_t>(), ldg, U.data_ptr<float>(), E.data_ptr<double>(), out.data_ptr<double>(), T, D, r,
          tokens_per_block);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.mul_(scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(mscp_ext, CUDA, m) {
  m.impl("channel_sumsq", &channel_sumsq_cuda);
  m.impl("row_importance", &row_importance_cuda);
  m.impl("lowrank_project", &lowrank_project_cuda);
  m.impl("lora_attribution", &lora_attribution_cuda);
}

}  // namespace mscp_ext
