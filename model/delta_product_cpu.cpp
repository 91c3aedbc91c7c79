// DeltaProduct chunk kernel for one block of chunks on CPU, fp32: forward, and backward with the block recomputed
// from its entry state. The same math as _chunk_scan / _chunk_scan_backward in delta_product_kernels.py (read the
// comments there for the derivation), fused per (chunk, head): each one's 64 x 64 tiles stay in the core's cache
// through all their products and elementwise steps, the matmuls are single-threaded MKL sgemm calls (torch's MKL)
// and the (chunk, head) pairs are spread over torch's OpenMP threads. Built and loaded by delta_product_cpu.py with
// ctypes (no torch headers); plain C ABI; delta_product_kernels.py calls it per block.
//
// Shapes, row-major, P = chunks in the block x B*H pairs, pair p = chunk * BH + head:
//   q [P, Ct, K] (already scaled), k [P, C, K], v [P, C, V], beta [P, C], g [P, Ct] (log decay; zeros when
//   ungated), C = Ct * n, the n keys of a token side by side. States S [BH, K, V].
// The tensors in and out (q, k, v, beta, g, o, dO and the gradients) are strided views: each comes with 4 strides
// in elements, of its chunk, batch, head and row dimensions (its last dimension contiguous). The caller's
// token-major tensors [B, T, H, K] are read and written where they are, with no chunk-major copies.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C, op(X) = X or X^T (ta / tb), leading dims as stored.
void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
          float beta, float* C, int ldc) {
  // row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T
  const char a_op = ta ? 'T' : 'N', b_op = tb ? 'T' : 'N';
  sgemm_(&b_op, &a_op, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

struct Dims {
  int P, BH, H, Ct, n, C, K, V;
};

// Where pair p (chunk p / BH, batch and head p % BH) of a strided tensor starts; strides s: chunk, batch, head, row.
inline size_t at(const Dims& d, const int64_t* s, int p) {
  const int c = p / d.BH, bh = p % d.BH;
  return (size_t)(c * s[0] + (bh / d.H) * s[1] + (bh % d.H) * s[2]);
}

// Scratch memory, kept from call to call by the calling thread: a fresh allocation per block was mapped and
// zero-filled each time (page faults on megabytes per block).
float* scratch(size_t n) {
  thread_local std::vector<float> arena;
  if (arena.size() < n) arena.resize(n);
  return arena.data();
}

// Everything of one (chunk, head) pair that does not depend on the state entering the chunk (_intra_chunk), for
// all pairs of the block; `extra` more floats of scratch after them for the caller (state scan and backward).
// U and W sit side by side in the rows of UW [C, V + K], as beta V and beta exp(gamma) K do in RVK: one matmul
// Tm RVK gives both (and in backward, one gives both their gradients): one call of twice the width. Likewise Aq
// follows A [C, C] in the rows of AAq [C + Ct, C], as Q follows beta K in KBQ [C + Ct, K]: AAq = KBQ K^T.
struct Intra {
  float *AAq, *Tm, *tdec, *UW, *RVK, *KBQ, *qd, *kd, *exp_gk, *exp_gq, *exp_rest, *dec, *rest;
  Intra(const Dims& d, size_t extra) {
    const size_t P = d.P, C = d.C, Ct = d.Ct, K = d.K, V = d.V;
    const size_t sizes[] = {P * (C + Ct) * C, P * C * C, P * Ct * Ct, P * C * (V + K), P * C * (V + K),
                            P * (C + Ct) * K, P * Ct * K, P * C * K, P * C, P * Ct, P * C, P, extra};
    float** slots[] = {&AAq, &Tm, &tdec, &UW, &RVK, &KBQ, &qd, &kd, &exp_gk, &exp_gq, &exp_rest, &dec, &rest};
    size_t total = 0;
    for (size_t size : sizes) total += (size + 15) / 16 * 16;  // each array on a 64-byte boundary
    float* at = scratch(total);
    for (int i = 0; i < 13; ++i) {
      *slots[i] = at;
      at += (sizes[i] + 15) / 16 * 16;
    }
  }
};

// M[rows, C] *= the decay from each column's token to each row's token, tdec[row / rows_per_token, col / n]
void scale_by_token_decay(float* M, int rows, const float* tdec, int Ct, int n, int rows_per_token) {
  const int C = Ct * n;
  float decay[1024];  // one row's decays spread over the row's positions (C <= 1024, checked by the caller)
  for (int i = 0; i < rows; ++i) {
    if (i % rows_per_token == 0) {  // no division per element: an integer division costs more than the multiply
      const float* t = tdec + (size_t)(i / rows_per_token) * Ct;
      for (int m = 0; m < Ct; ++m)
        for (int r = 0; r < n; ++r) decay[m * n + r] = t[m];
    }
    float* row = M + (size_t)i * C;
    for (int j = 0; j < C; ++j) row[j] *= decay[j];
  }
}

// 8 floats, GCC's vector extension: an AVX register where there is one, lowered to whatever the target has elsewhere
typedef float f8 __attribute__((vector_size(32)));
inline f8 load8(const float* p) {
  f8 x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline void store8(float* p, f8 x) { std::memcpy(p, &x, sizeof x); }

// Tm = (I + tril(A, -1))^-1 for row-major C x C (A's diagonal and upper part are not read), by forward substitution:
// row i of Tm = e_i - sum_{j<i} A[i, j] Tm[j, :], where row j is zero after column j. Four rows at a time: first the
// finished rows' terms, 16 columns at a time in 8 register accumulators (independent chains; one row alone is a
// chain of dependent FMAs, latency-bound), then the four rows' own terms in order. Rows are padded to a multiple of
// 16 in a scratch copy. On a 63 x 63 triangle (AMD EPYC): 4 us, where MKL's strsm took 19-23 us (10% of the kernel)
// and row-by-row axpys 11 us.
void unit_lower_inverse(const float* __restrict A, int C, float* __restrict Tm) {
  const int L = (C + 15) / 16 * 16;
  thread_local std::vector<float> padded;
  if (padded.size() < (size_t)C * L) padded.resize((size_t)C * L);
  float* __restrict W = padded.data();
  std::fill(W, W + (size_t)C * L, 0.f);
  for (int i0 = 0; i0 < C; i0 += 4) {
    const int R = std::min(4, C - i0);
    const float* a[4];  // the rows of A; past the last row, the last one again (computed, not stored)
    for (int r = 0; r < 4; ++r) a[r] = A + (size_t)(i0 + std::min(r, R - 1)) * C;
    for (int cb = 0; cb < i0; cb += 16) {  // columns [cb, cb + 16): rows j >= cb have terms there
      f8 acc[4][2] = {};
      for (int j = cb; j < i0; ++j) {
        const f8 t0 = load8(W + (size_t)j * L + cb), t1 = load8(W + (size_t)j * L + cb + 8);
        for (int r = 0; r < 4; ++r) {
          acc[r][0] -= a[r][j] * t0;
          acc[r][1] -= a[r][j] * t1;
        }
      }
      for (int r = 0; r < R; ++r) {
        store8(W + (size_t)(i0 + r) * L + cb, acc[r][0]);
        store8(W + (size_t)(i0 + r) * L + cb + 8, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float* row = W + (size_t)(i0 + r) * L;
      row[i0 + r] = 1.f;
      for (int s = 0; s < r; ++s) {
        const float f = a[r][i0 + s];
        const float* t = W + (size_t)(i0 + s) * L;
        for (int m = 0; m < L; m += 8) store8(row + m, load8(row + m) - f * load8(t + m));
      }
    }
  }
  for (int i = 0; i < C; ++i) std::copy(W + (size_t)i * L, W + (size_t)i * L + C, Tm + (size_t)i * C);
}

// Inputs of a call: the tensors and their strides (see the top of the file).
struct In {
  const float *q, *k, *v, *beta, *g;
  const int64_t *sq, *sk, *sv, *sb, *sg;
};

void intra_pair(const Dims& d, int p, const In& in, Intra& x) {
  const int Ct = d.Ct, C = d.C, K = d.K, V = d.V, n = d.n;
  const float* __restrict qp = in.q + at(d, in.sq, p);
  const float* __restrict kp = in.k + at(d, in.sk, p);
  const float* __restrict vp = in.v + at(d, in.sv, p);
  const float* __restrict bp = in.beta + at(d, in.sb, p);
  const float* __restrict gp = in.g + at(d, in.sg, p);
  const int ldq = (int)in.sq[3], ldk = (int)in.sk[3], ldv = (int)in.sv[3], ldb = (int)in.sb[3],
            ldg = (int)in.sg[3];
  float* __restrict A = x.AAq + (size_t)p * (C + Ct) * C;
  float* __restrict Tm = x.Tm + (size_t)p * C * C;
  float* __restrict Aq = A + (size_t)C * C;
  float* __restrict tdec = x.tdec + (size_t)p * Ct * Ct;
  const int LD = V + K;
  float* __restrict UW = x.UW + (size_t)p * C * LD;
  float* __restrict rv = x.RVK + (size_t)p * C * LD;  // rv in columns [0, V) of RVK, rk in [V, V + K)
  float* __restrict rk = rv + V;
  float* __restrict kb = x.KBQ + (size_t)p * (C + Ct) * K;
  float* __restrict qd = x.qd + (size_t)p * Ct * K;
  float* __restrict kd = x.kd + (size_t)p * C * K;
  float* __restrict egk = x.exp_gk + (size_t)p * C;
  float* __restrict egq = x.exp_gq + (size_t)p * Ct;
  float* __restrict erest = x.exp_rest + (size_t)p * C;

  float gq[256];  // cumulative log decay up to token i (Ct <= 256, checked by the caller)
  float acc = 0.f;
  for (int i = 0; i < Ct; ++i) gq[i] = (acc += gp[i * ldg]);
  const float glast = gq[Ct - 1];
  x.dec[p] = std::exp(glast);
  // decay from token m to token i, exp(gq_i - gq_m) = exp(g_{m+1}) ... exp(g_i) for m <= i, and 0 after i (what a
  // query must not see): row i is row i - 1 times exp(g_i), Ct exps instead of Ct^2 (scalar exps were a third of
  // this function at Ct = 64); a position j belongs to token j / n
  for (int i = 0; i < Ct; ++i) {
    float* row = tdec + (size_t)i * Ct;
    const float step = std::exp(gp[i * ldg]);
    for (int m = 0; m < i; ++m) row[m] = row[m - Ct] * step;
    row[i] = 1.f;
    for (int m = i + 1; m < Ct; ++m) row[m] = 0.f;
  }
  for (int i = 0; i < Ct; ++i) egq[i] = std::exp(gq[i]);
  for (int m = 0; m < Ct; ++m)
    for (int r = 0; r < n; ++r) {
      egk[m * n + r] = egq[m];
      erest[m * n + r] = tdec[(Ct - 1) * Ct + m];  // exp(glast - gk_j)
    }
  for (int j = 0; j < C; ++j) {
    const float b = bp[j * ldb];
    for (int c = 0; c < K; ++c) {
      kb[j * K + c] = b * kp[j * ldk + c];
      rk[j * LD + c] = kb[j * K + c] * egk[j];
      kd[j * K + c] = kp[j * ldk + c] * erest[j];
    }
    for (int c = 0; c < V; ++c) rv[j * LD + c] = b * vp[j * ldv + c];
  }
  for (int i = 0; i < Ct; ++i)
    for (int c = 0; c < K; ++c) {
      qd[i * K + c] = qp[i * ldq + c] * egq[i];
      kb[(C + i) * K + c] = qp[i * ldq + c];
    }
  gemm(false, true, C + Ct, C, K, 1.f, kb, K, kp, ldk, 0.f, A, C);  // [A; Aq] = [beta K; Q] K^T
  scale_by_token_decay(A, C, tdec, Ct, n, n);  // row i of A decays like token i / n
  scale_by_token_decay(Aq, Ct, tdec, Ct, n, 1);
  unit_lower_inverse(A, C, Tm);
  // [U | W] = Tm [beta V | beta exp(gamma) K]
  gemm(false, false, C, LD, C, 1.f, Tm, C, rv, LD, 0.f, UW, LD);
}

void intra_all(const Dims& d, const In& in, Intra& x) {
#pragma omp parallel for schedule(static)
  for (int p = 0; p < d.P; ++p) intra_pair(d, p, in, x);
}

// The sequential part, per head: Vn = U - W S, S <- dec S + Kd^T Vn. starts [P, K, V] gets the state entering
// each chunk, Vn [P, C, V]; S [BH, K, V] holds the entry state and is left holding the state after the block.
void state_scan(const Dims& d, const Intra& x, float* S, float* starts, float* Vn) {
  const int C = d.C, K = d.K, V = d.V, NC = d.P / d.BH;
#pragma omp parallel for schedule(static)
  for (int h = 0; h < d.BH; ++h) {
    float* Sh = S + (size_t)h * K * V;
    for (int c = 0; c < NC; ++c) {
      const int p = c * d.BH + h;
      float* start = starts + (size_t)p * K * V;
      float* vn = Vn + (size_t)p * C * V;
      std::memcpy(start, Sh, sizeof(float) * K * V);
      const float* UW = x.UW + (size_t)p * C * (V + K);
      for (int j = 0; j < C; ++j) std::memcpy(vn + (size_t)j * V, UW + (size_t)j * (V + K), sizeof(float) * V);
      gemm(false, false, C, V, K, -1.f, UW + V, V + K, start, V, 1.f, vn, V);
      const float dec = x.dec[p];
      for (int i = 0; i < K * V; ++i) Sh[i] = dec * start[i];
      gemm(true, false, K, V, C, 1.f, x.kd + (size_t)p * C * K, K, vn, V, 1.f, Sh, V);
    }
  }
}

}  // namespace

extern "C" {

// o [P, Ct, V] = the block's output; S [BH, K, V]: the entry state in, the state after the block out. strides:
// 4 each for q, k, v, beta, g and o.
void delta_product_block_forward(int P, int BH, int H, int Ct, int n, int K, int V, const float* q, const float* k,
                                 const float* v, const float* beta, const float* g, float* S, float* o,
                                 const int64_t* strides) {
  const Dims d{P, BH, H, Ct, n, Ct * n, K, V};
  const In in{q, k, v, beta, g, strides, strides + 4, strides + 8, strides + 12, strides + 16};
  const int64_t* so = strides + 20;
  Intra x(d, (size_t)P * K * V + (size_t)P * d.C * V);
  intra_all(d, in, x);
  float* starts = x.rest;
  float* Vn = starts + (size_t)P * K * V;
  state_scan(d, x, S, starts, Vn);
  const int C = d.C;
#pragma omp parallel for schedule(static)
  for (int p = 0; p < P; ++p) {  // o = Aq Vn + Qd S_start
    float* op = o + at(d, so, p);
    const int ldo = (int)so[3];
    const float* Aq = x.AAq + (size_t)p * (C + Ct) * C + C * C;
    gemm(false, false, Ct, V, C, 1.f, Aq, C, Vn + (size_t)p * C * V, V, 0.f, op, ldo);
    gemm(false, false, Ct, V, K, 1.f, x.qd + (size_t)p * Ct * K, K, starts + (size_t)p * K * V, V, 1.f, op, ldo);
  }
}

// Gradients of the block. S0 [BH, K, V] the entry state; dO [P, Ct, V]; dS [BH, K, V]: in, the gradient of the
// state after the block; out, that of the entry state. dq, dk, dv, dbeta, dg: written, in the inputs' shapes.
// strides: 4 each for q, k, v, beta, g, dO, dq, dk, dv, dbeta and dg.
void delta_product_block_backward(int P, int BH, int H, int Ct, int n, int K, int V, const float* q, const float* k,
                                  const float* v, const float* beta, const float* g, const float* S0,
                                  const float* dO, float* dS, float* dq, float* dk, float* dv, float* dbeta,
                                  float* dg, const int64_t* strides) {
  const Dims d{P, BH, H, Ct, n, Ct * n, K, V};
  const In in{q, k, v, beta, g, strides, strides + 4, strides + 8, strides + 12, strides + 16};
  const int64_t *sdo = strides + 20, *sdq = strides + 24, *sdk = strides + 28, *sdv = strides + 32,
                *sdb = strides + 36, *sdg = strides + 40;
  const int lddo = (int)sdo[3], ldk = (int)in.sk[3], ldv = (int)in.sv[3], ldb = (int)in.sb[3];
  const int C = d.C, NC = P / BH;
  const size_t KV = (size_t)K * V, CV = (size_t)C * V;
  Intra x(d, BH * KV + P * KV + P * CV + P * CV + P * KV);
  float* S = x.rest;  // the state, from S0 through the block
  float* starts = S + BH * KV;
  float* Vn = starts + P * KV;
  float* dVn_all = Vn + P * CV;
  float* dS1_all = dVn_all + P * CV;
  intra_all(d, in, x);
  std::memcpy(S, S0, sizeof(float) * BH * KV);
  state_scan(d, x, S, starts, Vn);

  // dVn = Aq^T dO + Kd dS_after; dS_entering = Qd^T dO - W^T dVn + dec dS_after; dS1 keeps dS_after per chunk
#pragma omp parallel for schedule(static)
  for (int h = 0; h < BH; ++h) {
    float* dSh = dS + (size_t)h * K * V;
    for (int c = NC - 1; c >= 0; --c) {
      const int p = c * BH + h;
      const float* dOp = dO + at(d, sdo, p);
      float* dvn = dVn_all + (size_t)p * C * V;
      float* ds1 = dS1_all + (size_t)p * K * V;
      std::memcpy(ds1, dSh, sizeof(float) * K * V);
      gemm(true, false, C, V, Ct, 1.f, x.AAq + (size_t)p * (C + Ct) * C + C * C, C, dOp, lddo, 0.f, dvn, V);
      gemm(false, false, C, V, K, 1.f, x.kd + (size_t)p * C * K, K, ds1, V, 1.f, dvn, V);
      const float dec = x.dec[p];
      for (int i = 0; i < K * V; ++i) dSh[i] = dec * ds1[i];
      gemm(true, false, K, V, Ct, 1.f, x.qd + (size_t)p * Ct * K, K, dOp, lddo, 1.f, dSh, V);
      gemm(true, false, K, V, C, -1.f, x.UW + (size_t)p * C * (V + K) + V, V + K, dvn, V, 1.f, dSh, V);
    }
  }

#pragma omp parallel
  {
    const int LD = V + K;
    // DVW = [dVn | dW] and DRVK = [drv | drk] = Tm^T DVW, side by side like UW and RVK
    // dAAq = [dA; dAq] and DKBQ = [dkb; dq] stacked like AAq and KBQ
    std::vector<float> DVW(C * LD), DRVK(C * LD), dAAq((C + Ct) * C), DKBQ((C + Ct) * K), dqd(Ct * K), dkd(C * K),
        dgk(C), dgq(Ct);
    float* dA = dAAq.data();
    float* dAq = dA + C * C;
    float* dkb = DKBQ.data();
    const float* drv = DRVK.data();
    const float* drk = DRVK.data() + V;
#pragma omp for schedule(static)
    for (int p = 0; p < P; ++p) {
      const float* kp = k + at(d, in.sk, p);
      const float* vp = v + at(d, in.sv, p);
      const float* bp = beta + at(d, in.sb, p);
      const float* dOp = dO + at(d, sdo, p);
      const float* start = starts + (size_t)p * K * V;
      const float* vn = Vn + (size_t)p * C * V;
      const float* dvn = dVn_all + (size_t)p * C * V;
      const float* ds1 = dS1_all + (size_t)p * K * V;
      const float* A = x.AAq + (size_t)p * (C + Ct) * C;
      const float* Tm = x.Tm + (size_t)p * C * C;
      const float* tdec = x.tdec + (size_t)p * Ct * Ct;
      const float* UW = x.UW + (size_t)p * C * LD;
      const float* rk = x.RVK + (size_t)p * C * LD + V;
      const float* KBQ = x.KBQ + (size_t)p * (C + Ct) * K;
      const float* qd = x.qd + (size_t)p * Ct * K;
      const float* kd = x.kd + (size_t)p * C * K;
      const float* egk = x.exp_gk + (size_t)p * C;
      const float* egq = x.exp_gq + (size_t)p * Ct;
      const float* erest = x.exp_rest + (size_t)p * C;
      float* dqp = dq + at(d, sdq, p);
      float* dkp = dk + at(d, sdk, p);
      float* dvp = dv + at(d, sdv, p);
      float* dbp = dbeta + at(d, sdb, p);
      float* dgp = dg + at(d, sdg, p);
      const int lddq = (int)sdq[3], lddk = (int)sdk[3], lddv = (int)sdv[3], lddb = (int)sdb[3], lddg = (int)sdg[3];

      for (int j = 0; j < C; ++j) std::memcpy(DVW.data() + (size_t)j * LD, dvn + (size_t)j * V, sizeof(float) * V);
      gemm(false, true, C, K, V, -1.f, dvn, V, start, V, 0.f, DVW.data() + V, LD);  // dW = -dVn S0^T
      gemm(false, true, Ct, C, V, 1.f, dOp, lddo, vn, V, 0.f, dAq, C);      // dAq = dO Vn^T
      gemm(false, true, Ct, K, V, 1.f, dOp, lddo, start, V, 0.f, dqd.data(), K);   // dQd = dO S0^T
      gemm(false, true, C, K, V, 1.f, vn, V, ds1, V, 0.f, dkd.data(), K);       // dKd = Vn dS1^T
      gemm(true, false, C, LD, C, 1.f, Tm, C, DVW.data(), LD, 0.f, DRVK.data(), LD);  // [U | W] = Tm [rv | rk]
      // dL = -(drv U^T + drk W^T) = -[drv | drk] [U | W]^T, strictly lower part
      gemm(false, true, C, C, LD, -1.f, DRVK.data(), LD, UW, LD, 0.f, dA, C);
      for (int i = 0; i < C; ++i)
        for (int j = i; j < C; ++j) dA[i * C + j] = 0.f;
      // log-decay gradients (before dA and dAq are turned into the raw products' gradients below). The sums are
      // `omp simd` reductions: without leave to reorder them the compiler keeps float sums scalar.
      std::fill(dgk.begin(), dgk.end(), 0.f);
      std::fill(dgq.begin(), dgq.end(), 0.f);
      float to_end_sum = 0.f;
      // each entry of [A; Aq] decays by exp(g_row - g_column): its gradient times its value goes to the row's
      // log decay (position i of A, token i of Aq) and minus that to the column's
      for (int i = 0; i < C + Ct; ++i) {
        float row = 0.f;
#pragma omp simd reduction(+ : row)
        for (int j = 0; j < C; ++j) {
          const float m = dA[i * C + j] * A[i * C + j];
          row += m;
          dgk[j] -= m;
        }
        (i < C ? dgk[i] : dgq[i - C]) += row;
      }
      for (int j = 0; j < C; ++j) {
        float drk_rk = 0.f, to_end = 0.f;
#pragma omp simd reduction(+ : drk_rk, to_end)
        for (int c = 0; c < K; ++c) {
          drk_rk += drk[j * LD + c] * rk[j * LD + c];
          to_end += dkd[j * K + c] * kd[j * K + c];
        }
        dgk[j] += drk_rk - to_end;
        to_end_sum += to_end;
      }
      for (int i = 0; i < Ct; ++i) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < K; ++c) s += dqd[i * K + c] * qd[i * K + c];
        dgq[i] += s;
        for (int j = 0; j < n; ++j) dgq[i] += dgk[i * n + j];
      }
      float state_term = 0.f;
#pragma omp simd reduction(+ : state_term)
      for (int i = 0; i < K * V; ++i) state_term += ds1[i] * start[i];
      dgq[Ct - 1] += to_end_sum + state_term * x.dec[p];
      float acc = 0.f;  // gq = cumsum(g): dg is the reversed cumulative sum
      for (int i = Ct - 1; i >= 0; --i) dgp[i * lddg] = (acc += dgq[i]);

      // dE = dA * decay of the row's token; dAq_raw = dAq * q_decay (0 where unseen)
      scale_by_token_decay(dA, C, tdec, Ct, n, n);
      scale_by_token_decay(dAq, Ct, tdec, Ct, n, 1);
      // [dkb; dq] = [drk exp(gk); dqd exp(gq)] + [dE; dAq_raw] K
      for (int j = 0; j < C; ++j)
        for (int c = 0; c < K; ++c) dkb[j * K + c] = drk[j * LD + c] * egk[j];
      for (int i = 0; i < Ct; ++i)
        for (int c = 0; c < K; ++c) dkb[(C + i) * K + c] = dqd[i * K + c] * egq[i];
      gemm(false, false, C + Ct, K, C, 1.f, dA, C, kp, ldk, 1.f, dkb, K);
      for (int i = 0; i < Ct; ++i)
        std::memcpy(dqp + (size_t)i * lddq, dkb + (size_t)(C + i) * K, sizeof(float) * K);
      // dk = dkb beta + dE^T kb + dAq_raw^T q + dkd exp_rest = ... + [dE; dAq_raw]^T [beta K; Q]
      for (int j = 0; j < C; ++j)
        for (int c = 0; c < K; ++c) dkp[j * lddk + c] = dkb[j * K + c] * bp[j * ldb] + dkd[j * K + c] * erest[j];
      gemm(true, false, C, K, C + Ct, 1.f, dA, C, KBQ, K, 1.f, dkp, lddk);
      for (int j = 0; j < C; ++j) {
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < V; ++c) {
          dvp[j * lddv + c] = drv[j * LD + c] * bp[j * ldb];
          s += drv[j * LD + c] * vp[j * ldv + c];
        }
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < K; ++c) s += dkb[j * K + c] * kp[j * ldk + c];
        dbp[j * lddb] = s;
      }
    }
  }
}

}  // extern "C"
