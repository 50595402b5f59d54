// Decode/verify attention on CPU: a few queries per row against a static KV cache that is mostly empty.
//
// q [B, Hq, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, Dv] (all fp32 or all bf16, last dim contiguous;
// bf16 keys and values are widened as they are loaded, the math is fp32), mask boolean and
// broadcastable to [B, Hq, Tq, Tk] (true = attend) or absent; causal is bottom-right aligned (query t
// sees keys j <= t + Tk - Tq). A query reads keys only up to the last one it may see, so a decode step
// over a 2048-slot cache holding 150 tokens reads 150 keys.
//
// Split-KV on one device (flash-decoding): the keys of each (batch row, KV head) are cut into blocks of
// BLOCK; a task scores one block for all Hq/Hkv x Tq queries of that KV head (GQA without copies: each
// key and value row is loaded once into registers for a group of up to 4 queries, which also gives the
// value sums independent FMA chains) and keeps, per query, (max, sum of exp, unnormalised output). The blocks' partials are then merged by their log-sum-exp, so one long row or a single KV
// head still spreads over every thread. A query that may see no key gets zeros (as a weightless part).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t BLOCK = 128;                     // keys per task: K and V blocks (64 KB at D=64) stay in L2
constexpr int64_t PARALLEL_BYTES = 256 * 1024;     // below this much K/V a fork/join costs more than it saves
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Keys this far ahead are requested early: a 128-key block spans 8 pages and the hardware prefetcher
// stops at page boundaries. Measured on the 2-core EPYC with a cold cache: 10-20% less time per call.
constexpr int64_t PREFETCH_KEYS = 16;

template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / sizeof(T)) __builtin_prefetch(p + i, 0, 1);  // one 64-byte line each
}

// NV fp32 vectors from a K or V row of T (a bf16 vector holds two fp32 vectors' worth: NV is even).
template <int NV>
inline void load_row(const float* p, Vec* out) {
  for (int c = 0; c < NV; ++c) out[c] = Vec::loadu(p + c * Vec::size());
}
template <int NV>
inline void load_row(const at::BFloat16* p, Vec* out) {
  using BVec = at::vec::Vectorized<at::BFloat16>;
  static_assert(NV % 2 == 0 && BVec::size() == 2 * Vec::size());
  for (int c = 0; c < NV / 2; ++c)
    std::tie(out[2 * c], out[2 * c + 1]) = at::vec::convert_to_float<at::BFloat16>(BVec::loadu(p + c * BVec::size()));
}

inline float hsum(Vec x) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, x);
}

// 1 + the last true entry of row[0, n), 0 if none: reads 8 bytes at a time from the end, since a decode
// step's mask row is a short prefix of true followed by the cache's empty tail.
inline int64_t last_visible(const bool* row, int64_t n) {
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, row + n - 8, 8);
    if (w) break;
    n -= 8;
  }
  while (n > 0 && !row[n - 1]) --n;
  return n;
}

template <typename T>
inline void scores_any(const float* q, const T* k, int64_t ks, int64_t D, int64_t j0, int64_t j1, float scale,
                       float* s) {
  for (int64_t j = j0; j < j1; ++j) {
    const T* kr = k + j * ks;
    prefetch_row(kr + PREFETCH_KEYS * ks, D);
    float x = 0.f;
    int64_t d = 0;
    if constexpr (std::is_same_v<T, float>) {
      Vec acc(0.f);
      for (; d + Vec::size() <= D; d += Vec::size()) acc = at::vec::fmadd(Vec::loadu(q + d), Vec::loadu(kr + d), acc);
      x = hsum(acc);
    }
    for (; d < D; ++d) x += q[d] * static_cast<float>(kr[d]);
    s[j - j0] = x * scale;
  }
}

// o[0, Dv) = sum_j p[j - j0] v[j] over keys [j0, j1), skipping zero weights (masked keys).
template <typename T>
inline void weighted_any(const float* p, const T* v, int64_t vs, int64_t Dv, int64_t j0, int64_t j1, float* o) {
  std::fill(o, o + Dv, 0.f);
  for (int64_t j = j0; j < j1; ++j) {
    prefetch_row(v + (j + PREFETCH_KEYS) * vs, Dv);
    const float w = p[j - j0];
    if (w == 0.f) continue;
    const T* vr = v + j * vs;
    for (int64_t d = 0; d < Dv; ++d) o[d] += w * static_cast<float>(vr[d]);
  }
}

// Scores of QB queries (rows of s, BLOCK apart) against keys [j0, j1): each key row is loaded once for
// all of them (the Hq / Hkv query heads of a KV head, times the verify block's queries).
template <int NV, int QB, typename T>
inline void scores_group(const float* const* q, const T* k, int64_t ks, int64_t j0, int64_t j1, float scale,
                         float* s) {
  Vec qv[QB][NV];
  for (int i = 0; i < QB; ++i)
    for (int c = 0; c < NV; ++c) qv[i][c] = Vec::loadu(q[i] + c * Vec::size());
  for (int64_t j = j0; j < j1; ++j) {
    const T* kr = k + j * ks;
    prefetch_row(kr + PREFETCH_KEYS * ks, NV * Vec::size());
    Vec kv[NV];
    load_row<NV>(kr, kv);
    for (int i = 0; i < QB; ++i) {
      Vec acc = qv[i][0] * kv[0];
      for (int c = 1; c < NV; ++c) acc = at::vec::fmadd(qv[i][c], kv[c], acc);
      s[i * BLOCK + (j - j0)] = hsum(acc) * scale;
    }
  }
}

// o_i[0, Dv) = sum_j p_i[j - j0] v[j] for QB queries over keys [j0, j1): each value row is loaded once
// and feeds QB x NV independent accumulators (one chain per query would wait on its FMA latency).
template <int NV, int QB, typename T>
inline void weighted_group(const float* p, const T* v, int64_t vs, int64_t j0, int64_t j1, float* const* o) {
  Vec acc[QB][NV];
  for (int i = 0; i < QB; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c] = Vec(0.f);
  for (int64_t j = j0; j < j1; ++j) {
    prefetch_row(v + (j + PREFETCH_KEYS) * vs, NV * Vec::size());
    Vec vv[NV];
    load_row<NV>(v + j * vs, vv);
    for (int i = 0; i < QB; ++i) {
      const Vec w(p[i * BLOCK + (j - j0)]);
      for (int c = 0; c < NV; ++c) acc[i][c] = at::vec::fmadd(w, vv[c], acc[i][c]);
    }
  }
  for (int i = 0; i < QB; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c].store(o[i] + c * Vec::size());
}

// Queries per register group: QB x NV query vectors (scores) or accumulators (weights) plus NV key/value
// vectors fit the 32 AVX-512 registers at D = 64 (NV = 4) with QB = 4, at D = 128 (NV = 8) with QB = 2.
template <int NV>
constexpr int group_size() {
  return NV <= 4 ? 4 : 2;
}

// Calls f(std::integral_constant<int, QB>{}, i) over R queries at head dim NV vectors: full groups of
// group_size, then the rest as one group of 3 or 2 where that fits, else one by one.
template <int NV, class F>
inline void in_groups(int64_t R, F&& f) {
  constexpr int QB = group_size<NV>();
  int64_t i = 0;
  for (; i + QB <= R; i += QB) f(std::integral_constant<int, QB>{}, i);
  if (QB >= 4 && R - i == 3) f(std::integral_constant<int, 3>{}, i);  // GQA 3:1
  else if (QB >= 3 && R - i == 2) f(std::integral_constant<int, 2>{}, i);
  else
    for (; i < R; ++i) f(std::integral_constant<int, 1>{}, i);
}

template <int NV, typename T>
void scores_all(const float* const* q, int64_t R, const T* k, int64_t ks, int64_t j0, int64_t j1, float scale,
                float* s) {
  in_groups<NV>(R, [&](auto qb, int64_t i) { scores_group<NV, decltype(qb)::value>(q + i, k, ks, j0, j1, scale, s + i * BLOCK); });
}

template <int NV, typename T>
void weighted_all(const float* p, int64_t R, const T* v, int64_t vs, int64_t j0, int64_t j1, float* const* o) {
  in_groups<NV>(R, [&](auto qb, int64_t i) { weighted_group<NV, decltype(qb)::value>(p + i * BLOCK, v, vs, j0, j1, o + i); });
}

template <typename T>
at::Tensor attend(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                  const std::optional<at::Tensor>& mask_in, double scale, bool causal) {
  auto last_contig = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  // queries are few: widened once; keys and values are widened as each row is loaded
  const at::Tensor q = last_contig(q_in.to(at::kFloat)), k = last_contig(k_in), v = last_contig(v_in);
  const int64_t B = q.size(0), Hq = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Tk = k.size(2), Dv = v.size(3);
  TORCH_CHECK(Hq % Hkv == 0 && k.size(0) == B && v.size(0) == B && k.size(3) == D && v.size(2) == Tk &&
                  v.size(1) == Hkv,
              "decode_attention: shape mismatch");
  const int64_t rep = Hq / Hkv, R = rep * Tq;  // queries per (batch row, KV head), row i = r * Tq + t

  at::Tensor m;
  const bool* mp = nullptr;
  int64_t ms0 = 0, ms1 = 0, ms2 = 0;
  if (mask_in.has_value() && mask_in->defined()) {
    TORCH_CHECK(mask_in->scalar_type() == at::kBool, "decode_attention: boolean mask only");
    m = mask_in->expand({B, Hq, Tq, Tk});
    if (m.stride(3) != 1) m = m.contiguous();
    mp = m.data_ptr<bool>();
    ms0 = m.stride(0), ms1 = m.stride(1), ms2 = m.stride(2);
  }
  // Strides as plain integers: Tensor::stride() wraps its dimension on every call.
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float* qp = q.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  // Per query: how many leading keys it may see (mask rows shared by heads are scanned once).
  // A mask row that is all true up to its last visible key (a decode step's, a verify block's) need not
  // be read again per key: only rows with holes (``prefix`` false) are.
  std::vector<int64_t> len(B * Hq * Tq);
  std::vector<char> prefix(B * Hq * Tq, 1);
  std::vector<int64_t> group_len(B * Hkv, 0);
  const bool* memo_row = nullptr;
  int64_t memo = 0;
  char memo_prefix = 1;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t t = 0; t < Tq; ++t) {
        int64_t n = causal ? std::max<int64_t>(0, std::min(Tk, t + Tk - Tq + 1)) : Tk;
        if (mp && ms1 == 0 && h > 0) {  // a mask shared by the heads: its rows were scanned for head 0
          const int64_t first = (b * Hq) * Tq + t;
          n = std::min(n, len[first]);
          prefix[(b * Hq + h) * Tq + t] = prefix[first];
        } else if (mp) {
          const bool* row = mp + b * ms0 + h * ms1 + t * ms2;
          if (row != memo_row) {
            memo_row = row, memo = last_visible(row, Tk);
            memo_prefix = std::all_of(row, row + memo, [](bool x) { return x; });
          }
          n = std::min(n, memo);
          prefix[(b * Hq + h) * Tq + t] = memo_prefix;
        }
        len[(b * Hq + h) * Tq + t] = n;
        int64_t& g = group_len[b * Hkv + h / rep];
        g = std::max(g, n);
      }

  // Tasks: (batch row, KV head, key block) over the blocks some query of the group may see.
  std::vector<int64_t> task_start(B * Hkv + 1, 0);
  for (int64_t bg = 0; bg < B * Hkv; ++bg) task_start[bg + 1] = task_start[bg] + (group_len[bg] + BLOCK - 1) / BLOCK;
  const int64_t ntasks = task_start[B * Hkv];
  // Partials per (task, query): max, sum of exp, unnormalised output.
  std::vector<float> pmax(ntasks * R, NEG_INF), psum(ntasks * R, 0.f), pout(ntasks * R * Dv, 0.f);

  int64_t kv_bytes = 0;
  for (int64_t bg = 0; bg < B * Hkv; ++bg) kv_bytes += group_len[bg] * (D + Dv) * static_cast<int64_t>(sizeof(T));
  const int64_t grain = kv_bytes < PARALLEL_BYTES ? std::max<int64_t>(ntasks, 1) : 1;

  at::parallel_for(0, ntasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> s(R * BLOCK);
    std::vector<const float*> qrow(R);
    std::vector<float*> orow(R);
    int64_t bg = std::upper_bound(task_start.begin(), task_start.end(), begin) - task_start.begin() - 1;
    for (int64_t task = begin; task < end; ++task) {
      while (task >= task_start[bg + 1]) ++bg;
      const int64_t b = bg / Hkv, g = bg % Hkv;
      const int64_t j0 = (task - task_start[bg]) * BLOCK;
      const T* kb = kp + b * ks0 + g * ks1;
      const T* vb = vp + b * vs0 + g * vs1;
      // Every query of the group is scored over the keys any of them may see in this block; each then
      // keeps its own visible ones (the rest get weight 0), so K and V rows are read once for all.
      int64_t jmax = j0;
      for (int64_t i = 0; i < R; ++i) {
        const int64_t h = g * rep + i / Tq, t = i % Tq;
        qrow[i] = qp + b * qs0 + h * qs1 + t * qs2;
        orow[i] = &pout[(task * R + i) * Dv];
        jmax = std::max(jmax, std::min(j0 + BLOCK, len[(b * Hq + h) * Tq + t]));
      }
      if (jmax <= j0) continue;  // no query of the group sees a key in the block: weightless partials
      if (D == 64) scores_all<64 / Vec::size()>(qrow.data(), R, kb, ks2, j0, jmax, fscale, s.data());
      else if (D == 128) scores_all<128 / Vec::size()>(qrow.data(), R, kb, ks2, j0, jmax, fscale, s.data());
      else
        for (int64_t i = 0; i < R; ++i) scores_any(qrow[i], kb, ks2, D, j0, jmax, fscale, &s[i * BLOCK]);
      const int64_t width = jmax - j0;
      for (int64_t i = 0; i < R; ++i) {
        const int64_t h = g * rep + i / Tq, t = i % Tq, qi = (b * Hq + h) * Tq + t;
        float* si = &s[i * BLOCK];
        const int64_t n = std::max<int64_t>(0, std::min(j0 + BLOCK, len[qi]) - j0);
        if (mp && !prefix[qi]) {
          const bool* row = mp + b * ms0 + h * ms1 + t * ms2;
          for (int64_t j = 0; j < n; ++j)
            if (!row[j0 + j]) si[j] = NEG_INF;
        }
        float mx = NEG_INF;
        int64_t j = 0;
        if (n >= Vec::size()) {
          Vec vm = Vec::loadu(si);
          for (j = Vec::size(); j + Vec::size() <= n; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(si + j));
          mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return at::vec::maximum(a, c); }, vm);
        }
        for (; j < n; ++j) mx = std::max(mx, si[j]);
        if (mx == NEG_INF) {  // every key of the block masked (or none visible) for this query
          std::fill(si, si + width, 0.f);
          continue;
        }
        Vec vsum(0.f), vmx(mx);
        j = 0;
        for (; j + Vec::size() <= n; j += Vec::size()) {
          Vec e = (Vec::loadu(si + j) - vmx).exp_u20();
          e.store(si + j);
          vsum = vsum + e;
        }
        float sum = hsum(vsum);
        for (; j < n; ++j) sum += (si[j] = std::exp(si[j] - mx));
        std::fill(si + n, si + width, 0.f);  // keys past this query's last visible one
        pmax[task * R + i] = mx;
        psum[task * R + i] = sum;
      }
      if (Dv == 64) weighted_all<64 / Vec::size()>(s.data(), R, vb, vs2, j0, jmax, orow.data());
      else if (Dv == 128) weighted_all<128 / Vec::size()>(s.data(), R, vb, vs2, j0, jmax, orow.data());
      else
        for (int64_t i = 0; i < R; ++i) weighted_any(&s[i * BLOCK], vb, vs2, Dv, j0, jmax, orow[i]);
    }
  });

  // Merge each query's block partials by log-sum-exp (the tree reduction's combine, done serially here:
  // a decode row has a handful of blocks).
  at::Tensor out = at::empty({B, Hq, Tq, Dv}, q.options());
  float* op = out.data_ptr<float>();
  for (int64_t bg = 0; bg < B * Hkv; ++bg) {
    const int64_t b = bg / Hkv, g = bg % Hkv;
    for (int64_t i = 0; i < R; ++i) {
      const int64_t h = g * rep + i / Tq, t = i % Tq;
      float* o = op + ((b * Hq + h) * Tq + t) * Dv;
      float mx = NEG_INF;
      for (int64_t task = task_start[bg]; task < task_start[bg + 1]; ++task) mx = std::max(mx, pmax[task * R + i]);
      std::fill(o, o + Dv, 0.f);
      if (mx == NEG_INF) continue;
      float total = 0.f;
      for (int64_t task = task_start[bg]; task < task_start[bg + 1]; ++task) {
        const int64_t slot = task * R + i;
        if (pmax[slot] == NEG_INF) continue;
        const float w = std::exp(pmax[slot] - mx);
        total += w * psum[slot];
        const float* po = &pout[slot * Dv];
        for (int64_t d = 0; d < Dv; ++d) o[d] += w * po[d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
    }
  }
  return q_in.scalar_type() == at::kFloat ? out : out.to(q_in.scalar_type());
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k, v must be 4-D");
  const at::ScalarType t = q.scalar_type();
  TORCH_CHECK((t == at::kFloat || t == at::kBFloat16) && k.scalar_type() == t && v.scalar_type() == t,
              "decode_attention: q, k, v all fp32 or all bf16, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  return t == at::kFloat ? attend<float>(q, k, v, mask, scale, causal)
                         : attend<at::BFloat16>(q, k, v, mask, scale, causal);
}

}  // namespace

TORCH_LIBRARY(zycompile_cpu, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(zycompile_cpu, CPU, lib) { lib.impl("decode_attention", &decode_attention); }
