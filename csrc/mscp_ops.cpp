// mscp's CPU kernels, registered as torch.ops.mscp_ext.{channel_sumsq,row_importance,lowrank_project,
// lora_attribution}.
//
// Semantics are those of the pure-torch references in kernels/*.py (the definition of correct).
// Design, common to the ops:
//  * inputs are read in their storage dtype (bf16 / fp16 / fp32 / fp64) a row segment at a time,
//    converted into a small stack buffer (L1-resident), never into a full fp32 copy;
//  * the arithmetic runs on GCC/Clang vector types (64 bytes: one AVX-512 register, two AVX2
//    registers, four NEON ones), register-blocked, with fp32 accumulation (fp64 when an input of
//    lowrank_project is fp64, as in the reference; fp64 throughout lora_attribution);
//  * at::parallel_for splits rows (row_importance, lowrank_project pass 2), column strips
//    (lowrank_project pass 1, lora_attribution) or token chunks (channel_sumsq, and lora_attribution
//    when the columns are too few; deterministic two-stage reductions).
// Built with -O3 -march=native by kernels/_ext.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace mscp_ext {
namespace {

constexpr int kVecBytes = 64;

template <typename T>
struct VecT {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int L = kVecBytes / static_cast<int>(sizeof(T));
};

template <typename V>
inline V vload(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
inline void vstore(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename T>
inline T hsum(typename VecT<T>::type v) {
  T s = 0;
  for (int l = 0; l < VecT<T>::L; ++l) s += v[l];
  return s;
}

inline VecT<float>::type vabs(VecT<float>::type v) {
  typedef int32_t IV __attribute__((vector_size(kVecBytes)));
  IV bits;
  std::memcpy(&bits, &v, sizeof(v));
  bits &= 0x7fffffff;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A tensor's storage, read as a row segment at a time.
enum class Kind { F32, F64, BF16, F16 };

struct Src {
  const char* p;
  Kind kind;
};

Kind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Kind::F32;
    case at::kDouble: return Kind::F64;
    case at::kBFloat16: return Kind::BF16;
    case at::kHalf: return Kind::F16;
    default: TORCH_CHECK(false, "mscp_ext: unsupported dtype ", t.scalar_type());
  }
  return Kind::F32;
}

Src src_of(const at::Tensor& t) {
  return Src{static_cast<const char*>(t.data_ptr()), kind_of(t)};
}

// dst[0:n] = src[off:off+n] converted to acc_t (the only place storage dtypes are decoded).
template <typename acc_t>
inline void load_row(const Src& s, int64_t off, int64_t n, acc_t* __restrict__ dst) {
  switch (s.kind) {
    case Kind::F32: {
      const float* __restrict__ p = reinterpret_cast<const float*>(s.p) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(p[i]);
      break;
    }
    case Kind::F64: {
      const double* __restrict__ p = reinterpret_cast<const double*>(s.p) + off;
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(p[i]);
      break;
    }
    case Kind::BF16: {  // bf16 -> fp32 is exact: the 16 bits are the top half of the fp32
      const uint16_t* __restrict__ p = reinterpret_cast<const uint16_t*>(s.p) + off;
      for (int64_t i = 0; i < n; ++i) {
        uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
        float f;
        std::memcpy(&f, &bits, sizeof(f));
        dst[i] = static_cast<acc_t>(f);
      }
      break;
    }
    case Kind::F16: {
      const uint16_t* __restrict__ p = reinterpret_cast<const uint16_t*>(s.p) + off;
      int64_t i = 0;
#if defined(__F16C__)
      if constexpr (std::is_same<acc_t, float>::value) {
        for (; i + 8 <= n; i += 8)
          _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
      }
#endif
      for (; i < n; ++i) dst[i] = static_cast<acc_t>(static_cast<float>(c10::Half(p[i], c10::Half::from_bits())));
      break;
    }
  }
}

inline int64_t esize(const Src& s) { return (s.kind == Kind::F32) ? 4 : (s.kind == Kind::F64 ? 8 : 2); }
inline void prefetch_row(const Src& s, int64_t off, int64_t n) {
  const int64_t es = esize(s);
  const char* p = s.p + off * es;
  for (int64_t b = 0; b < n * es; b += 64) __builtin_prefetch(p + b);
}

// Store one value in `t`'s dtype at flat index i, rounding like torch's .to(dtype).
template <typename acc_t>
inline void store_one(const at::Tensor& t, char* base, int64_t i, acc_t v) {
  switch (t.scalar_type()) {
    case at::kFloat: reinterpret_cast<float*>(base)[i] = static_cast<float>(v); break;
    case at::kDouble: reinterpret_cast<double*>(base)[i] = static_cast<double>(v); break;
    case at::kBFloat16: reinterpret_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(static_cast<float>(v)); break;
    case at::kHalf: reinterpret_cast<c10::Half*>(base)[i] = c10::Half(static_cast<float>(v)); break;
    default: break;
  }
}

// ------------------------------------------------------------------------------------------
// channel_sumsq: acc[j] += sum_{valid t} x[t, j]^2 ; count += #valid
// Two-stage: each of `nchunks` token chunks reduces into its own partial row, then the
// partials are summed in a fixed order (deterministic for a given thread count).
// ------------------------------------------------------------------------------------------
void channel_sumsq_cpu(const at::Tensor& x, const at::Tensor& token_mask, const at::Tensor& acc,
                       const at::Tensor& count) {
  TORCH_CHECK(token_mask.scalar_type() == at::kBool, "token_mask must be bool");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && count.scalar_type() == at::kLong, "acc fp32, count int64");
  const int64_t d = x.size(-1);
  at::Tensor x2 = x.reshape({-1, d}).contiguous();
  at::Tensor m = token_mask.reshape({-1}).contiguous();
  const int64_t T = x2.size(0);
  TORCH_CHECK(m.numel() == T, "token_mask must match x's leading dims");
  const bool* mp = m.data_ptr<bool>();
  std::vector<int64_t> idx;
  idx.reserve(T);
  for (int64_t t = 0; t < T; ++t)
    if (mp[t]) idx.push_back(t);
  const int64_t nv = static_cast<int64_t>(idx.size());
  if (nv > 0 && d > 0) {
    const Src s = src_of(x2);
    const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nv / 8));
    std::vector<float> partial(static_cast<size_t>(nchunks * d), 0.f);
    constexpr int64_t CH = 1024;
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      alignas(64) float buf[CH];
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t t0 = c * nv / nchunks, t1 = (c + 1) * nv / nchunks;
        float* __restrict__ pp = partial.data() + c * d;
        for (int64_t j0 = 0; j0 < d; j0 += CH) {
          const int64_t n = std::min(CH, d - j0);
          float* __restrict__ dst = pp + j0;
          for (int64_t t = t0; t < t1; ++t) {
            load_row<float>(s, idx[t] * d + j0, n, buf);
            for (int64_t j = 0; j < n; ++j) dst[j] += buf[j] * buf[j];
          }
        }
      }
    });
    at::Tensor sums = at::empty({d}, acc.options());
    float* sp = sums.data_ptr<float>();
    for (int64_t j = 0; j < d; ++j) {
      float v = 0.f;
      for (int64_t c = 0; c < nchunks; ++c) v += partial[c * d + j];
      sp[j] = v;
    }
    acc.add_(sums);
  }
  count.add_(nv);
}

// ------------------------------------------------------------------------------------------
// row_importance: out[i, k] = sum_j |W[i, j] + sum_q sB[i, q] A[q, j]| * N[j, k],  sB = scale*B
// Register block: RB rows x one 16-lane column vector; the LoRA term is formed per vector in
// registers; KC output columns accumulate in registers. Column chunks are the outer loop of a
// thread so the A chunk stays in L1 across the thread's rows.
// ------------------------------------------------------------------------------------------
constexpr int64_t RI_RB = 4;

template <int RB, int KC>
inline void ri_block(const float* __restrict__ wbuf, int64_t wstride, int64_t nvec_elems,
                     const float* __restrict__ A, int64_t lda, int64_t r, const float* __restrict__ sB,
                     const float* __restrict__ NT, int64_t ldn, float* __restrict__ out /* RB x ldo */,
                     int64_t ldo) {
  using V = VecT<float>::type;
  constexpr int L = VecT<float>::L;
  V acc[RB][KC];
  for (int rr = 0; rr < RB; ++rr)
    for (int kk = 0; kk < KC; ++kk) acc[rr][kk] = V{};
  for (int64_t jv = 0; jv < nvec_elems; jv += L) {
    V w[RB];
    for (int rr = 0; rr < RB; ++rr) w[rr] = vload<V>(wbuf + rr * wstride + jv);
    for (int64_t q = 0; q < r; ++q) {
      const V a = vload<V>(A + q * lda + jv);
      for (int rr = 0; rr < RB; ++rr) w[rr] += a * sB[rr * r + q];
    }
    for (int rr = 0; rr < RB; ++rr) w[rr] = vabs(w[rr]);
    for (int kk = 0; kk < KC; ++kk) {
      const V n = vload<V>(NT + kk * ldn + jv);
      for (int rr = 0; rr < RB; ++rr) acc[rr][kk] += w[rr] * n;
    }
  }
  for (int rr = 0; rr < RB; ++rr)
    for (int kk = 0; kk < KC; ++kk) out[rr * ldo + kk] += hsum<float>(acc[rr][kk]);
}

template <int RB>
inline void ri_block_k(int64_t K, const float* wbuf, int64_t wstride, int64_t nvec_elems, const float* A,
                       int64_t lda, int64_t r, const float* sB, const float* NT, int64_t ldn, float* out) {
  for (int64_t k0 = 0; k0 < K; k0 += 4) {
    const float* nt = NT + k0 * ldn;
    float* o = out + k0;
    switch (std::min<int64_t>(4, K - k0)) {
      case 1: ri_block<RB, 1>(wbuf, wstride, nvec_elems, A, lda, r, sB, nt, ldn, o, K); break;
      case 2: ri_block<RB, 2>(wbuf, wstride, nvec_elems, A, lda, r, sB, nt, ldn, o, K); break;
      case 3: ri_block<RB, 3>(wbuf, wstride, nvec_elems, A, lda, r, sB, nt, ldn, o, K); break;
      default: ri_block<RB, 4>(wbuf, wstride, nvec_elems, A, lda, r, sB, nt, ldn, o, K); break;
    }
  }
}

at::Tensor row_importance_cpu(const at::Tensor& W, const std::optional<at::Tensor>& B,
                              const std::optional<at::Tensor>& A, double scale, const at::Tensor& N) {
  TORCH_CHECK(W.dim() == 2 && N.dim() == 2 && N.size(0) == W.size(1), "N must be (d_in, K)");
  TORCH_CHECK(B.has_value() == A.has_value(), "B and A come together");
  const int64_t d_out = W.size(0), d_in = W.size(1), K = N.size(1);
  constexpr int64_t L = VecT<float>::L;
  const int64_t d_pad = round_up(std::max<int64_t>(d_in, 1), L);
  at::Tensor out = at::zeros({d_out, K}, W.options().dtype(at::kFloat));
  if (d_out == 0 || K == 0 || d_in == 0) return out;
  const at::Tensor Wc = W.contiguous();
  const auto f32 = W.options().dtype(at::kFloat);
  // Small operands, fp32 and zero-padded to whole vectors: N^T (K, d_pad), A (r, d_pad), scale*B.
  at::Tensor NT = at::zeros({K, d_pad}, f32);
  NT.narrow(1, 0, d_in).copy_(N.t());
  int64_t r = 0;
  at::Tensor A32, sB;
  if (B.has_value() && B->size(1) > 0) {
    r = B->size(1);
    TORCH_CHECK(B->size(0) == d_out && A->size(0) == r && A->size(1) == d_in, "B (d_out, r), A (r, d_in)");
    A32 = at::zeros({r, d_pad}, f32);
    A32.narrow(1, 0, d_in).copy_(*A);
    sB = (B->to(at::kFloat) * scale).contiguous();
  }
  const Src ws = src_of(Wc);
  const float* ntp = NT.data_ptr<float>();
  const float* ap = r ? A32.data_ptr<float>() : nullptr;
  const float* sbp = r ? sB.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  // Column chunk: keep the A chunk (r x CW fp32) around 32 KiB.
  const int64_t CW = std::max<int64_t>(64, std::min<int64_t>(1024, (8192 / std::max<int64_t>(r, 1)) / L * L));
  const int64_t nblk = (d_out + RI_RB - 1) / RI_RB;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> wbuf_v(static_cast<size_t>(RI_RB * CW));
    float* wbuf = wbuf_v.data();
    const int64_t row0 = b0 * RI_RB, row1 = std::min(d_out, b1 * RI_RB);
    for (int64_t j0 = 0; j0 < d_in; j0 += CW) {
      const int64_t n = std::min(CW, d_in - j0);
      const int64_t nvec = round_up(n, L);
      const float* a = ap ? ap + j0 : nullptr;
      const float* nt = ntp + j0;
      for (int64_t i = row0; i < row1; i += RI_RB) {
        const int64_t rb = std::min<int64_t>(RI_RB, row1 - i);
        for (int64_t rr = 0; rr < rb; ++rr) {
          load_row<float>(ws, (i + rr) * d_in + j0, n, wbuf + rr * CW);
          for (int64_t j = n; j < nvec; ++j) wbuf[rr * CW + j] = 0.f;
        }
        const float* sb = sbp ? sbp + i * r : nullptr;
        if (rb == RI_RB)
          ri_block_k<RI_RB>(K, wbuf, CW, nvec, a, d_pad, r, sb, nt, d_pad, op + i * K);
        else
          for (int64_t rr = 0; rr < rb; ++rr)
            ri_block_k<1>(K, wbuf + rr * CW, CW, nvec, a, d_pad, r, sb ? sb + rr * r : nullptr, nt, d_pad,
                          op + (i + rr) * K);
      }
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// lowrank_project
//   pass 1 (column strips in parallel): V = W_a - W_b a row chunk at a time into an L1 buffer,
//           G^T[k, j] += sum_i B[i, k] V[i, j] (KC accumulators in registers), ||V||^2;
//   pass 2 (selected rows in parallel): CB[i, k] = V[i, :] . G^T[k, :] / ||V||,
//           B'[i] = (1 - alpha) B[i] + alpha CB[i] in the accumulation dtype, rounded to B's dtype
//           (not B + alpha (CB - B), which cancels when CB << B).
// ------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
constexpr int kMaxKC = 16;
#else
constexpr int kMaxKC = 8;
#endif

template <typename acc_t, int KC>
inline void lp_gemm_chunk(const acc_t* __restrict__ vbuf, int64_t vstride, int64_t nrow, int64_t nvec_elems,
                          const acc_t* __restrict__ Bp, int64_t ldb, acc_t* __restrict__ GT, int64_t ldg) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::L;
  for (int64_t jv = 0; jv < nvec_elems; jv += L) {
    V g[KC];
    for (int kk = 0; kk < KC; ++kk) g[kk] = vload<V>(GT + kk * ldg + jv);
    for (int64_t ii = 0; ii < nrow; ++ii) {
      const V v = vload<V>(vbuf + ii * vstride + jv);
      const acc_t* b = Bp + ii * ldb;
      for (int kk = 0; kk < KC; ++kk) g[kk] += v * b[kk];
    }
    for (int kk = 0; kk < KC; ++kk) vstore<V>(GT + kk * ldg + jv, g[kk]);
  }
}

template <typename acc_t>
inline acc_t vdot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t nvec_elems) {
  using V = typename VecT<acc_t>::type;
  constexpr int L = VecT<acc_t>::L;
  V s0{}, s1{};
  int64_t j = 0;
  for (; j + 2 * L <= nvec_elems; j += 2 * L) {
    s0 += vload<V>(a + j) * vload<V>(b + j);
    s1 += vload<V>(a + j + L) * vload<V>(b + j + L);
  }
  for (; j < nvec_elems; j += L) s0 += vload<V>(a + j) * vload<V>(b + j);
  return hsum<acc_t>(s0 + s1);
}

// Load 16 consecutive values of storage kind KD as fp32 lanes (n < 16: the rest are zero).
template <Kind KD>
inline VecT<float>::type load16(const char* base, int64_t off, int64_t n) {
  using V = VecT<float>::type;
  if (n < 16) {
    alignas(64) float tmp[16] = {};
    load_row<float>(Src{base, KD}, off, n, tmp);
    return vload<V>(tmp);
  }
  if constexpr (KD == Kind::F32) {
    return vload<V>(reinterpret_cast<const float*>(base) + off);
  } else if constexpr (KD == Kind::BF16) {
    typedef uint16_t U16 __attribute__((vector_size(32)));
    typedef uint32_t U32 __attribute__((vector_size(64)));
    const U16 h = vload<U16>(reinterpret_cast<const uint16_t*>(base) + off);
    const U32 w = __builtin_convertvector(h, U32) << 16;
    V v;
    std::memcpy(&v, &w, sizeof(v));
    return v;
  } else {
#if defined(__AVX512F__)
    const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
        reinterpret_cast<const uint16_t*>(base) + off)));
    V v;
    std::memcpy(&v, &x, sizeof(v));
    return v;
#else
    alignas(64) float tmp[16];
    load_row<float>(Src{base, KD}, off, 16, tmp);
    return vload<V>(tmp);
#endif
  }
}

// Pass one of lowrank_project for fp32 accumulation and W_a, W_b of one storage kind, fused:
// V is formed in registers straight from W_a and W_b (no intermediate buffer), RCH rows at a
// time, each row read sequentially along the thread's column range [c0, c1).
template <Kind KD, int KC>
void lp_pass1_fused(const char* wa, const char* wb, int64_t d_out, int64_t d_in, int64_t c0, int64_t c1,
                    const float* __restrict__ Bp, int64_t R_pad, float* __restrict__ GT, int64_t d_pad,
                    double* sumsq) {
  using V = VecT<float>::type;
  // G^T tile traffic is amortised over RCH rows; more rows = more concurrent streams (measured).
  constexpr int64_t RCH = KC >= 8 ? 16 : 8;
  constexpr int64_t ES = KD == Kind::F32 ? 4 : 2;
  V sq{};
  for (int64_t i0 = 0; i0 < d_out; i0 += RCH) {
    const int64_t nrow = std::min(RCH, d_out - i0);
    for (int64_t k0 = 0; k0 < R_pad; k0 += KC) {
      for (int64_t jv = c0; jv < c1; jv += 16) {
        const int64_t n = std::min<int64_t>(16, d_in - jv);
        V g[KC];
        for (int kk = 0; kk < KC; ++kk) g[kk] = vload<V>(GT + (k0 + kk) * d_pad + jv);
        for (int64_t ii = 0; ii < nrow; ++ii) {
          const int64_t off = (i0 + ii) * d_in + jv;
          if (k0 == 0) {
            __builtin_prefetch(wa + (off + 512 / ES) * ES);
            __builtin_prefetch(wb + (off + 512 / ES) * ES);
          }
          const V v = load16<KD>(wa, off, n) - load16<KD>(wb, off, n);
          if (k0 == 0) sq += v * v;
          const float* b = Bp + (i0 + ii) * R_pad + k0;
          for (int kk = 0; kk < KC; ++kk) g[kk] += v * b[kk];
        }
        for (int kk = 0; kk < KC; ++kk) vstore<V>(GT + (k0 + kk) * d_pad + jv, g[kk]);
      }
    }
  }
  *sumsq = static_cast<double>(hsum<float>(sq));
}

template <Kind KD>
void lp_pass1_fused_kc(int KC, const char* wa, const char* wb, int64_t d_out, int64_t d_in, int64_t c0,
                       int64_t c1, const float* Bp, int64_t R_pad, float* GT, int64_t d_pad, double* sumsq) {
  switch (KC) {
    case 4: lp_pass1_fused<KD, 4>(wa, wb, d_out, d_in, c0, c1, Bp, R_pad, GT, d_pad, sumsq); break;
    case 8: lp_pass1_fused<KD, 8>(wa, wb, d_out, d_in, c0, c1, Bp, R_pad, GT, d_pad, sumsq); break;
    default: lp_pass1_fused<KD, kMaxKC>(wa, wb, d_out, d_in, c0, c1, Bp, R_pad, GT, d_pad, sumsq); break;
  }
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> lowrank_project_impl(const at::Tensor& W_a, const at::Tensor& W_b,
                                                        const at::Tensor& B, const at::Tensor& rows,
                                                        double alpha) {
  using V = typename VecT<acc_t>::type;
  constexpr int64_t L = VecT<acc_t>::L;
  const auto acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  const int64_t d_out = W_a.size(0), d_in = W_a.size(1), R = B.size(1);
  const at::Tensor Wa = W_a.contiguous(), Wb = W_b.contiguous();
  const Src sa = src_of(Wa), sb = src_of(Wb);
  const int KC = R <= 4 ? 4 : (R <= 8 ? 8 : kMaxKC);
  const int64_t R_pad = round_up(std::max<int64_t>(R, 1), KC);
  const int64_t d_pad = round_up(std::max<int64_t>(d_in, 1), L);
  const auto opts = W_a.options().dtype(acc_dtype);
  at::Tensor Bacc = at::zeros({d_out, R_pad}, opts);  // B in the accumulation dtype, padded
  Bacc.narrow(1, 0, R).copy_(B);
  at::Tensor GT = at::zeros({R_pad, d_pad}, opts);  // G^T = (V^T B)^T
  const acc_t* bp = Bacc.data_ptr<acc_t>();
  acc_t* gp = GT.data_ptr<acc_t>();

  // ---- pass 1 ----
  const int nthreads = at::get_num_threads();
  // Row chunk x strip width: the V buffer (RCH x CS) stays L1-resident (measured: buffers that
  // spill L1 cost ~2x); the next strip of each row is software-prefetched.
  constexpr int64_t CSMAX = 128, RCH = 16;
  const int64_t CS = std::max<int64_t>(L, std::min<int64_t>(CSMAX, (d_in / (2 * nthreads)) / L * L));
  const int64_t nstrips = (d_in + CS - 1) / CS;
  std::vector<double> strip_sumsq(static_cast<size_t>(std::max<int64_t>(nstrips, 1)), 0.0);
  const bool fused = std::is_same<acc_t, float>::value && sa.kind == sb.kind && sa.kind != Kind::F64;
  if (fused && d_out > 0 && d_in > 0) {
    // Threads own contiguous ranges of 16-column vectors; no reduction of G is needed.
    const int64_t nvec = (d_in + 15) / 16;
    const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(nthreads, nvec));
    strip_sumsq.assign(static_cast<size_t>(nparts), 0.0);
    at::parallel_for(0, nparts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c0 = (p * nvec / nparts) * 16, c1 = std::min(d_in, ((p + 1) * nvec / nparts) * 16);
        if (c0 >= c1) continue;
        const float* bf = reinterpret_cast<const float*>(bp);
        float* gf = reinterpret_cast<float*>(gp);
        switch (sa.kind) {
          case Kind::F32: lp_pass1_fused_kc<Kind::F32>(KC, sa.p, sb.p, d_out, d_in, c0, c1, bf, R_pad, gf, d_pad, &strip_sumsq[p]); break;
          case Kind::BF16: lp_pass1_fused_kc<Kind::BF16>(KC, sa.p, sb.p, d_out, d_in, c0, c1, bf, R_pad, gf, d_pad, &strip_sumsq[p]); break;
          default: lp_pass1_fused_kc<Kind::F16>(KC, sa.p, sb.p, d_out, d_in, c0, c1, bf, R_pad, gf, d_pad, &strip_sumsq[p]); break;
        }
      }
    });
  } else if (d_out > 0 && d_in > 0) {
    // Generic path (fp64 accumulation, mixed storage dtypes): V through an L1 buffer.
    // Each thread owns a contiguous range of column strips and walks row chunks outer, strips
    // inner: every row is read sequentially across the thread's strips (prefetch-friendly) and
    // each G^T column belongs to one thread (no reduction).
    at::parallel_for(0, nstrips, 1, [&](int64_t s0, int64_t s1) {
      const int64_t vstride = round_up(CS, L) + L;  // +L: rows of the buffer do not alias in L1 sets
      std::vector<acc_t> vbuf_v(static_cast<size_t>(RCH * vstride));
      acc_t* vbuf = vbuf_v.data();
      alignas(64) acc_t tb[CSMAX];
      std::vector<V> sq(static_cast<size_t>(s1 - s0), V{});
      for (int64_t i0 = 0; i0 < d_out; i0 += RCH) {
        const int64_t nrow = std::min(RCH, d_out - i0);
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t c0 = s * CS, cs = std::min(CS, d_in - c0), cs_pad = round_up(cs, L);
          V q{};
          for (int64_t ii = 0; ii < nrow; ++ii) {
            acc_t* v = vbuf + ii * vstride;
            if (s + 1 < s1) {  // the same row's next strip, used after this row chunk
              const int64_t next = std::min(CS, d_in - c0 - CS);
              prefetch_row(sa, (i0 + ii) * d_in + c0 + CS, next);
              prefetch_row(sb, (i0 + ii) * d_in + c0 + CS, next);
            }
            load_row<acc_t>(sa, (i0 + ii) * d_in + c0, cs, v);
            load_row<acc_t>(sb, (i0 + ii) * d_in + c0, cs, tb);
            for (int64_t j = 0; j < cs; ++j) v[j] -= tb[j];
            for (int64_t j = cs; j < cs_pad; ++j) v[j] = 0;
            for (int64_t j = 0; j < cs_pad; j += L) {
              const V x = vload<V>(v + j);
              q += x * x;
            }
          }
          sq[s - s0] += q;
          for (int64_t k0 = 0; k0 < R_pad; k0 += KC) {
            const acc_t* bk = bp + i0 * R_pad + k0;
            acc_t* gk = gp + k0 * d_pad + c0;
            switch (KC) {
              case 4: lp_gemm_chunk<acc_t, 4>(vbuf, vstride, nrow, cs_pad, bk, R_pad, gk, d_pad); break;
              case 8: lp_gemm_chunk<acc_t, 8>(vbuf, vstride, nrow, cs_pad, bk, R_pad, gk, d_pad); break;
              default: lp_gemm_chunk<acc_t, kMaxKC>(vbuf, vstride, nrow, cs_pad, bk, R_pad, gk, d_pad); break;
            }
          }
        }
      }
      for (int64_t s = s0; s < s1; ++s) strip_sumsq[s] = static_cast<double>(hsum<acc_t>(sq[s - s0]));
    });
  }
  double total = 0.0;
  for (double v : strip_sumsq) total += v;
  const acc_t norm = static_cast<acc_t>(std::sqrt(total));
  at::Tensor norm_t = at::scalar_tensor(static_cast<double>(norm), W_a.options().dtype(at::kFloat));

  at::Tensor out = B.clone(at::MemoryFormat::Contiguous);
  const int64_t nsel = rows.numel();
  if (nsel == 0 || !(norm > 0)) return {out, norm_t};

  // ---- pass 2 ----
  at::Tensor rws = rows.to(at::kLong).contiguous();
  const int64_t* rp = rws.data_ptr<int64_t>();
  std::vector<int64_t> sel(static_cast<size_t>(nsel));
  for (int64_t t = 0; t < nsel; ++t) {
    int64_t i = rp[t] < 0 ? rp[t] + d_out : rp[t];
    TORCH_CHECK(i >= 0 && i < d_out, "row index ", rp[t], " is out of bounds for d_out = ", d_out);
    sel[t] = i;
  }
  char* obase = static_cast<char*>(out.data_ptr());
  constexpr int64_t RB = 8, CW = 512;
  const int64_t nblk = (nsel + RB - 1) / RB;
  const acc_t a = static_cast<acc_t>(alpha);
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> vb(static_cast<size_t>(RB * CW + CW));
    std::vector<acc_t> cb(static_cast<size_t>(RB * R));
    acc_t* tb = vb.data() + RB * CW;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * RB, nb = std::min(RB, nsel - t0);
      std::fill(cb.begin(), cb.end(), acc_t(0));
      for (int64_t j0 = 0; j0 < d_in; j0 += CW) {
        const int64_t n = std::min(CW, d_in - j0), n_pad = round_up(n, L);
        for (int64_t rr = 0; rr < nb; ++rr) {
          acc_t* v = vb.data() + rr * CW;
          const int64_t i = sel[t0 + rr];
          load_row<acc_t>(sa, i * d_in + j0, n, v);
          load_row<acc_t>(sb, i * d_in + j0, n, tb);
          for (int64_t j = 0; j < n; ++j) v[j] -= tb[j];
          for (int64_t j = n; j < n_pad; ++j) v[j] = 0;
        }
        for (int64_t k = 0; k < R; ++k) {
          const acc_t* g = gp + k * d_pad + j0;
          for (int64_t rr = 0; rr < nb; ++rr) cb[rr * R + k] += vdot<acc_t>(vb.data() + rr * CW, g, n_pad);
        }
      }
      for (int64_t rr = 0; rr < nb; ++rr) {
        const int64_t i = sel[t0 + rr];
        for (int64_t k = 0; k < R; ++k) {
          const acc_t b = bp[i * R_pad + k];
          const acc_t c = cb[rr * R + k] / norm;
          store_one<acc_t>(out, obase, i * R + k, (acc_t(1) - a) * b + a * c);
        }
      }
    }
  });
  return {out, norm_t};
}

std::tuple<at::Tensor, at::Tensor> lowrank_project_cpu(const at::Tensor& W_a, const at::Tensor& W_b,
                                                       const at::Tensor& B, const at::Tensor& rows,
                                                       double alpha) {
  TORCH_CHECK(W_a.dim() == 2 && W_a.sizes() == W_b.sizes(), "W_a and W_b must be the same 2-D shape");
  TORCH_CHECK(B.dim() == 2 && B.size(0) == W_a.size(0), "B must be (d_out, r)");
  TORCH_CHECK(rows.dim() == 1, "rows must be 1-D");
  const bool f64 = W_a.scalar_type() == at::kDouble || W_b.scalar_type() == at::kDouble ||
                   B.scalar_type() == at::kDouble;
  return f64 ? lowrank_project_impl<double>(W_a, W_b, B, rows, alpha)
             : lowrank_project_impl<float>(W_a, W_b, B, rows, alpha);
}

// ------------------------------------------------------------------------------------------
// lora_attribution: a[i] = scale * sum_k E[i, k] P[k, i],   P = (G^T u)^T,  G (T, D), u (T, R)
// P accumulates in fp64. Tasks own (a range of 16-column vectors) x (a range of tokens), each with
// its own P partial (R_pad x d_pad); the token-range partials are summed in a fixed order
// (deterministic for a given thread count). Per 16 tokens x 16 columns x KC ranks the
// accumulators stay in registers (2 KC fp64 vectors); the G block stays in L1 across k chunks.
// ------------------------------------------------------------------------------------------
using VD = VecT<double>::type;
constexpr int64_t LA_TOKENS = 16;  // tokens per register pass over a column vector

// 16 consecutive values of storage kind KD as two fp64 vectors (n < 16: the rest are zero).
template <Kind KD>
inline void load16d(const char* base, int64_t off, int64_t n, VD& lo, VD& hi) {
  if constexpr (KD == Kind::F64) {
    const double* p = reinterpret_cast<const double*>(base) + off;
    if (n == 16) {
      lo = vload<VD>(p);
      hi = vload<VD>(p + 8);
    } else {
      alignas(64) double tmp[16] = {};
      std::memcpy(tmp, p, static_cast<size_t>(n) * sizeof(double));
      lo = vload<VD>(tmp);
      hi = vload<VD>(tmp + 8);
    }
  } else {
    typedef float VF8 __attribute__((vector_size(32)));
    const VecT<float>::type x = load16<KD>(base, off, n);
    VF8 a, b;
    std::memcpy(&a, &x, sizeof(a));
    std::memcpy(&b, reinterpret_cast<const char*>(&x) + sizeof(a), sizeof(b));
    lo = __builtin_convertvector(a, VD);
    hi = __builtin_convertvector(b, VD);
  }
}

template <Kind KD, int KC>
void la_task(const char* g, int64_t ldg, int64_t D, int64_t t0, int64_t t1, int64_t c0, int64_t c1,
             const double* __restrict__ U, int64_t R_pad, double* __restrict__ P, int64_t d_pad) {
  for (int64_t i0 = t0; i0 < t1; i0 += LA_TOKENS) {
    const int64_t nt = std::min(LA_TOKENS, t1 - i0);
    for (int64_t jv = c0; jv < c1; jv += 16) {
      const int64_t n = std::min<int64_t>(16, D - jv);
      for (int64_t k0 = 0; k0 < R_pad; k0 += KC) {
        VD lo[KC], hi[KC];
        for (int kk = 0; kk < KC; ++kk) {
          lo[kk] = vload<VD>(P + (k0 + kk) * d_pad + jv);
          hi[kk] = vload<VD>(P + (k0 + kk) * d_pad + jv + 8);
        }
        for (int64_t tt = 0; tt < nt; ++tt) {
          VD gl, gh;
          load16d<KD>(g, (i0 + tt) * ldg + jv, n, gl, gh);
          const double* uu = U + (i0 + tt) * R_pad + k0;
          for (int kk = 0; kk < KC; ++kk) {
            lo[kk] += gl * uu[kk];
            hi[kk] += gh * uu[kk];
          }
        }
        for (int kk = 0; kk < KC; ++kk) {
          vstore<VD>(P + (k0 + kk) * d_pad + jv, lo[kk]);
          vstore<VD>(P + (k0 + kk) * d_pad + jv + 8, hi[kk]);
        }
      }
    }
  }
}

template <Kind KD>
void la_task_kc(int KC, const char* g, int64_t ldg, int64_t D, int64_t t0, int64_t t1, int64_t c0, int64_t c1,
                const double* U, int64_t R_pad, double* P, int64_t d_pad) {
  if (KC == 4)
    la_task<KD, 4>(g, ldg, D, t0, t1, c0, c1, U, R_pad, P, d_pad);
  else
    la_task<KD, 8>(g, ldg, D, t0, t1, c0, c1, U, R_pad, P, d_pad);
}

at::Tensor lora_attribution_cpu(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& edit, double scale) {
  TORCH_CHECK(grad.dim() >= 1 && u.dim() == grad.dim() && grad.sizes().slice(0, grad.dim() - 1) ==
                  u.sizes().slice(0, u.dim() - 1),
              "grad [..., d_out] and u [..., r] must share their leading dims");
  TORCH_CHECK(edit.dim() == 2 && edit.size(0) == grad.size(-1) && edit.size(1) == u.size(-1),
              "edit must be (d_out, r)");
  const int64_t D = grad.size(-1), R = u.size(-1);
  int64_t T = 1;  // the tokens: not reshape(-1, D), which fails when D or R is 0
  for (int64_t d = 0; d + 1 < grad.dim(); ++d) T *= grad.size(d);
  at::Tensor G = grad.reshape({T, D});
  if (G.size(0) > 0 && D > 1 && G.stride(1) != 1) G = G.contiguous();
  at::Tensor out = at::zeros({D}, grad.options().dtype(at::kDouble));
  if (D == 0 || T == 0 || R == 0) return out;
  const int64_t ldg = T > 1 ? G.stride(0) : D;
  const int KC = R <= 4 ? 4 : 8;
  const int64_t R_pad = round_up(R, KC), d_pad = round_up(D, 16);
  const auto f64 = grad.options().dtype(at::kDouble);
  at::Tensor U = at::zeros({T, R_pad}, f64);  // u in fp64, padded ranks are zero
  U.narrow(1, 0, R).copy_(u.reshape({T, R}));
  // Tasks: column parts first (no reduction); token parts when the columns cannot feed the threads.
  const int nthreads = at::get_num_threads();
  const int64_t nvec = (D + 15) / 16;
  const int64_t cparts = std::max<int64_t>(1, std::min<int64_t>(nthreads, nvec));
  const int64_t tparts = std::max<int64_t>(1, std::min<int64_t>(nthreads / cparts, T / 256));
  at::Tensor P = at::zeros({tparts, R_pad, d_pad}, f64);
  const char* gp = static_cast<const char*>(G.data_ptr());
  const Kind kind = kind_of(G);
  const double* up = U.data_ptr<double>();
  double* pp = P.data_ptr<double>();
  at::parallel_for(0, cparts * tparts, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t cp = w % cparts, tp = w / cparts;
      const int64_t c0 = (cp * nvec / cparts) * 16, c1 = std::min(D, ((cp + 1) * nvec / cparts) * 16);
      const int64_t t0 = tp * T / tparts, t1 = (tp + 1) * T / tparts;
      double* part = pp + tp * R_pad * d_pad;
      switch (kind) {
        case Kind::F32: la_task_kc<Kind::F32>(KC, gp, ldg, D, t0, t1, c0, c1, up, R_pad, part, d_pad); break;
        case Kind::F64: la_task_kc<Kind::F64>(KC, gp, ldg, D, t0, t1, c0, c1, up, R_pad, part, d_pad); break;
        case Kind::BF16: la_task_kc<Kind::BF16>(KC, gp, ldg, D, t0, t1, c0, c1, up, R_pad, part, d_pad); break;
        case Kind::F16: la_task_kc<Kind::F16>(KC, gp, ldg, D, t0, t1, c0, c1, up, R_pad, part, d_pad); break;
      }
    }
  });
  const at::Tensor E = edit.to(at::kDouble).contiguous();
  const double* ep = E.data_ptr<double>();
  double* op = out.data_ptr<double>();
  for (int64_t i = 0; i < D; ++i) {
    double a = 0.0;
    for (int64_t k = 0; k < R; ++k) {
      double p = 0.0;
      for (int64_t tp = 0; tp < tparts; ++tp) p += pp[(tp * R_pad + k) * d_pad + i];
      a += ep[i * R + k] * p;
    }
    op[i] = scale * a;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(mscp_ext, m) {
  m.def("channel_sumsq(Tensor x, Tensor token_mask, Tensor(a!) acc, Tensor(b!) count) -> ()");
  m.def("row_importance(Tensor W, Tensor? B, Tensor? A, float scale, Tensor N) -> Tensor");
  m.def("lowrank_project(Tensor W_a, Tensor W_b, Tensor B, Tensor rows, float alpha) -> (Tensor, Tensor)");
  m.def("lora_attribution(Tensor grad, Tensor u, Tensor edit, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(mscp_ext, CPU, m) {
  m.impl("channel_sumsq", &channel_sumsq_cpu);
  m.impl("row_importance", &row_importance_cpu);
  m.impl("lowrank_project", &lowrank_project_cpu);
  m.impl("lora_attribution", &lora_attribution_cpu);
}

}  // namespace mscp_ext
