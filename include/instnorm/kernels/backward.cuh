#pragma once
/// \file kernels/backward.cuh
/// The NCHW backward: dx, and the per-(image, channel, block) partial sums that dgamma and dbeta
/// are reduced from. It runs the forward's plans sized for two tensors (Direction::kBackward):
/// a group of `lanes` threads holds its slice of a plane (instance norm) or group (GroupNorm) of
/// x and dy in registers, so x and dy are read once and dx written once, or streams them where
/// the slice does not fit (split-stream). G > 1 blocks of a plane exchange their sums through
/// tagged global slots, as the forward's split plans do.
///
/// With d = dy * act'(pre) (pre the forward's pre-activation, recomputed from x) and g = gamma * d,
///   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),   xhat = (x - mean) * rstd,
/// so a plane needs the sums of g and of g * (x - mean). Both are taken relative to the saved
/// mean c (the forward's save_mean, its mean rounded to fp32), and the same pass sums x - c in
/// float-float: that recovers the residual mean - c, which the rounding lost (|mean| * 2^-24:
/// 6e-4 std at |mean| = 1e4 std, where the bound is 1e-5). With an activation, pre needs the
/// residual first, so a round sums x - c alone, exchanges it, then the rest.

#include "../block/reduce.cuh"
#include "../contract.cuh"
#include "../epilogue/epilogue.cuh"
#include "../grid/exchange.cuh"
#include "../moments.cuh"
#include "../options.cuh"
#include "../thread/vector.cuh"

namespace instnorm {
namespace detail {

/// The sums of one backward unit (or part of one): s0 = sum of (x - c) as the float-float pair
/// (s0_hi, s0_lo); a = sum of w * d and b = sum of w * d * (x - c), with w the element's gamma in
/// GroupNorm (1 in instance norm, whose gamma multiplies the plane's sums afterwards).
struct GradSums {
  float s0_hi = 0.f, s0_lo = 0.f, a = 0.f, b = 0.f;
};

/// The sum of two partials. Symmetric to the bit (TwoSum's error term is the exact rounding
/// error whatever the order), so both partners of a butterfly end with the same bits.
INSTNORM_HD GradSums combine(const GradSums& x, const GradSums& y) {
  GradSums r;
  float e;
  two_sum(x.s0_hi, y.s0_hi, r.s0_hi, e);
  r.s0_lo = (x.s0_lo + y.s0_lo) + e;
  r.a = x.a + y.a;
  r.b = x.b + y.b;
  return r;
}

/// Adds v to the float-float s0: x - c of an outlier 1e6 std from c would otherwise take the
/// other values' low bits with it.
INSTNORM_HD void add_compensated(GradSums& s, float v) {
  float e;
  two_sum(s.s0_hi, v, s.s0_hi, e);
  s.s0_lo += e;
}

__device__ __forceinline__ GradSums shfl_xor(const GradSums& v, int o) {
  GradSums r;
  r.s0_hi = __shfl_xor_sync(0xffffffffu, v.s0_hi, o);
  r.s0_lo = __shfl_xor_sync(0xffffffffu, v.s0_lo, o);
  r.a = __shfl_xor_sync(0xffffffffu, v.a, o);
  r.b = __shfl_xor_sync(0xffffffffu, v.b, o);
  return r;
}

/// Butterfly all-reduce over aligned groups of `lanes` (a power of two <= 32) lanes.
__device__ __forceinline__ GradSums warp_allreduce(GradSums v, int lanes) {
  for (int o = 1; o < lanes; o <<= 1) v = combine(v, shfl_xor(v, o));
  return v;
}

/// Shared storage of the backward's block reductions and exchange.
struct GradReduceStorage {
  GradSums warp[32];
  GradSums exchanged;
};

/// All-reduce over the block: warp butterflies, then every thread adds the warps' sums in order.
__device__ __forceinline__ GradSums block_allreduce(GradSums v, GradReduceStorage& st) {
  v = warp_allreduce(v, 32);
  if ((threadIdx.x & 31) == 0) st.warp[threadIdx.x >> 5] = v;
  __syncthreads();
  GradSums r = st.warp[0];
#pragma unroll 1
  for (int w = 1; w < int(blockDim.x >> 5); ++w) r = combine(r, st.warp[w]);
  __syncthreads();  // st.warp is reused by the next reduction
  return r;
}

/// A block's partial in the exchange: four tagged words [tag: 16 bits][a float: 32][0: 16], so
/// that, as in the forward's TaggedSlot, the data is its own arrival flag.
struct GradSlot {
  unsigned long long w[4];
};

__device__ __forceinline__ void publish_grad(GradSlot& slot, const GradSums& v, unsigned tag) {
  const float f[4] = {v.s0_hi, v.s0_lo, v.a, v.b};
#pragma unroll
  for (int k = 0; k < 4; ++k)
    TaggedWord(slot.w[k]).store(tag_word(tag, f[k], 0), cuda::memory_order_relaxed);
}

__device__ __forceinline__ GradSums load_grad(GradSlot& slot, unsigned tag) {
  unsigned long long w[4];
  for (;;) {
    bool ready = true;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      w[k] = TaggedWord(slot.w[k]).load(cuda::memory_order_relaxed);
      ready = ready && word_tag(w[k]) == (tag & 0xffffu);
    }
    if (ready) break;
    __nanosleep(32);
  }
  GradSums r;
  r.s0_hi = __uint_as_float(unsigned(w[0] >> 16));
  r.s0_lo = __uint_as_float(unsigned(w[1] >> 16));
  r.a = __uint_as_float(unsigned(w[2] >> 16));
  r.b = __uint_as_float(unsigned(w[3] >> 16));
  return r;
}

/// The G blocks of a plane publish their partials and all of them add the G partials in the
/// same order (lane i of warp 0 takes slots i, i + 32, ..., then a butterfly), so every block
/// computes the same bits. Slots are double-buffered by the parity of the exchange's tag: a
/// block publishes exchange k only after it read every slot of exchange k - 1, which every
/// block published only after reading exchange k - 2, the one whose buffer it overwrites.
__device__ __forceinline__ GradSums group_exchange(const GradSums& mine, GradSlot* slots,
                                                   int rank, int G, unsigned tag,
                                                   GradReduceStorage& st) {
  if (threadIdx.x == 0) publish_grad(slots[rank], mine, tag);
  if (threadIdx.x < 32) {
    GradSums acc;
#pragma unroll 1
    for (int i = threadIdx.x; i < G; i += 32) acc = combine(acc, load_grad(slots[i], tag));
    acc = warp_allreduce(acc, 32);
    if (threadIdx.x == 0) st.exchanged = acc;
  }
  __syncthreads();
  const GradSums r = st.exchanged;
  __syncthreads();  // st.exchanged is rewritten by the next exchange
  return r;
}

/// Everything the backward kernel reads.
template <class T>
struct BackwardParams {
  const T* x;
  const T* dy;
  T* dx;
  int64_t planes;              ///< n * G
  int64_t plane_len;           ///< channels_per_group * spatial
  int64_t spatial;
  int64_t groups;              ///< G
  int64_t channels_per_group;
  float eps;
  const void* gamma;
  const void* beta;
  bool params_float;
  const float* save_mean;      ///< the forward's, per plane (use_input_stats)
  const float* save_rstd;
  const float* running_mean;   ///< per channel (use_input_stats false)
  const float* running_var;
  bool use_input_stats;
  Activation activation;
  int lanes;
  int items;
  int smem_items;              ///< further vectors of x and of dy per thread in shared memory
  int64_t blocks_per_plane;
  int64_t slice_len;
  GradSlot* slots;             ///< [2][grid] (cooperative plans)
  /// [n * c][blocks_per_plane]: each block's (sum of d, sum of d * xhat) over its part of each
  /// channel, reduced to dbeta and dgamma by grad_params_kernel; null when neither is asked.
  float2* partials;
};

/// gamma and beta of the channel a lane's vector lies in (the cursor of epilogue.cuh sets it).
template <class T>
struct GradChannel {
  float gamma = 1.f, beta = 0.f;
  template <class Params>
  __device__ __forceinline__ void set_channel(const Params& p, int64_t ch) {
    gamma = p.gamma ? load_param<T>(p.gamma, p.params_float, ch) : 1.f;
    beta = p.beta ? load_param<T>(p.beta, p.params_float, ch) : 0.f;
  }
};

/// What a round knows about its plane: the pivot c (saved or running mean), the residual
/// r = mean - c, rstd, and the two coefficients of dx = rstd * (gamma * d - k1 - xhat * k2).
struct GradPlane {
  float c = 0.f, r = 0.f, rstd = 0.f, k1 = 0.f, k2 = 0.f;
};

/// x - c and d = dy * act'(pre) of one vector.
template <Activation kAct, class T, int kVec>
__device__ __forceinline__ void grad_terms(const Vector<T, kVec>& xv, const Vector<T, kVec>& dv,
                                           const GradPlane& pl, const GradChannel<T>& ch,
                                           float (&xc)[kVec], float (&d)[kVec]) {
  unpack(xv, xc);
  unpack(dv, d);
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    xc[k] -= pl.c;
    if constexpr (kAct != Activation::kNone)
      d[k] *= activate_derivative<kAct>(fmaf((xc[k] - pl.r) * pl.rstd, ch.gamma, ch.beta));
  }
}

/// What channel_partial_sums does with a channel's sums.
enum class PartialMode : int {
  kStore,          ///< first chunk of a streamed slice: store the raw sums (relative to c)
  kAdd,            ///< later chunks: add them
  kFinish,         ///< streamed, after the exchange: turn the stored raw sums into the result
  kStoreFinished,  ///< slice in registers, after the exchange: store the result
};

/// GroupNorm's per-channel partials of dgamma/dbeta: channel ch's part of the chunk [first,
/// first + clen) of the plane is a run of vectors in vec_sums (group g's at g * items * lanes);
/// team t of the group sums channels t, t + teams, ... over its lanes, then a butterfly, so a
/// channel's slot is always written by the same thread. The result is (sum of d, sum of d * xhat)
/// = (a, rstd * (b - r * a)) of the raw sums (a, b) relative to c. Every lane of a warp calls it
/// (inactive groups too), with the same channel count.
template <int kVec, class T>
__device__ __forceinline__ void channel_partial_sums(const BackwardParams<T>& p,
                                                  const float2* vec_sums, int held,
                                                  int64_t plane,
                                                  int64_t first, int64_t clen, int rank,
                                                  bool active, PartialMode mode,
                                                  const GradPlane& pl) {
  const int64_t S = p.spatial, cpg = p.channels_per_group, c = p.groups * cpg;
  const int G = int(p.blocks_per_plane), lanes = p.lanes;
  const int lane = threadIdx.x % lanes, group = threadIdx.x / lanes;
  // Teams: the warps of a block plan, the lane group otherwise.
  const int team_width = lanes < 32 ? lanes : 32;
  const int teams = lanes < 32 ? 1 : lanes / 32;
  const int team = lanes < 32 ? 0 : lane / 32;
  const int64_t image = plane / p.groups, channel_base = (plane % p.groups) * cpg;
  const int tl = lane % team_width;
  const float2* mine = vec_sums + int64_t(group) * held * p.lanes;
#pragma unroll 1
  for (int64_t k = team; k < cpg; k += teams) {
    float2* slot = p.partials + ((image * c + channel_base + k) * G + rank);
    float a = 0.f, b = 0.f;
    if (mode != PartialMode::kFinish) {
      const int64_t lo = k * S > first ? k * S : first;
      const int64_t hi = (k + 1) * S < first + clen ? (k + 1) * S : first + clen;
      if (hi > lo) {
        const int64_t vlo = (lo - first) / kVec, vhi = (hi - first) / kVec;
        for (int64_t v = vlo + tl; v < vhi; v += team_width) {
          a += mine[v].x;
          b += mine[v].y;
        }
      }
      a = butterfly_sum(a, team_width);
      b = butterfly_sum(b, team_width);
    }
    if (!active || tl != 0) continue;
    if (mode == PartialMode::kStore) {
      *slot = make_float2(a, b);
    } else if (mode == PartialMode::kAdd) {
      const float2 o = *slot;
      *slot = make_float2(o.x + a, o.y + b);
    } else {
      if (mode == PartialMode::kFinish) {
        const float2 o = *slot;
        a = o.x;
        b = o.y;
      }
      *slot = make_float2(a, pl.rstd * fmaf(-pl.r, a, b));
    }
  }
}

/// dbeta[ch] and dgamma[ch]: the partials of channel ch over images and blocks, added in a
/// fixed order (one warp per channel: lanes take entries lane, lane + 32, ..., then a
/// butterfly), so reruns give the same bits.
__global__ void grad_params_kernel(const float2* partials, int64_t n, int64_t c, int64_t G,
                                   float* dgamma, float* dbeta) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t ch = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); ch < c;
       ch += warps) {
    float a = 0.f, b = 0.f;
    for (int64_t i = lane; i < n * G; i += 32) {
      const float2 v = partials[((i / G) * c + ch) * G + i % G];
      a += v.x;
      b += v.y;
    }
    a = butterfly_sum(a, 32);
    b = butterfly_sum(b, 32);
    if (lane == 0) {
      if (dbeta) dbeta[ch] = a;
      if (dgamma) dgamma[ch] = b;
    }
  }
}

/// The backward kernel; see the file comment. kStream: slices larger than one chunk are read
/// again for each pass (an activation's residual, the sums, dx); otherwise x and dy stay on
/// chip: in registers, and beyond them (split plans' smem_items) in dynamic shared memory,
/// filled by cp.async as the forward's split slices are. Dynamic shared memory:
/// [x part][dy part] (smem_items vectors per thread each), then, for GroupNorm with dgamma or
/// dbeta, a float2 per vector a block holds: the per-vector sums the per-channel partials are
/// cut from.
template <class T, int kVec, int kMaxItems, bool kStream>
__global__ void __launch_bounds__(kMaxThreads) backward_kernel(const BackwardParams<T> p) {
  using V = Vector<T, kVec>;
  __shared__ GradReduceStorage st;
  extern __shared__ uint4 dyn_smem[];
  const int lanes = p.lanes;
  const int lane = threadIdx.x % lanes;
  const int per_block = blockDim.x / lanes;
  const int group = threadIdx.x / lanes;
  const int G = int(p.blocks_per_plane);
  const int rank = int(blockIdx.x) % G;
  const int block_group = int(blockIdx.x) / G;
  const int block_groups = int(gridDim.x) / G;
  const int chunk = lanes * p.items * kVec;
  // The extension holds 16-byte vectors only (cp.async; the planner gives scalar plans none).
  const int sitems = kStream || sizeof(V) != 16 ? 0 : p.smem_items;
  // Addresses from dyn_smem where they are used: kept as pointers, they cost the registers
  // that made the scalar and sm_89 kernels spill.
  const auto smem_vec = [&](int k) -> V& { return reinterpret_cast<V*>(dyn_smem)[k]; };
  const auto vec_sum = [&](int k) -> float2& {
    return reinterpret_cast<float2*>(reinterpret_cast<V*>(dyn_smem) + 2 * sitems * lanes)[k];
  };
  const int64_t cpg = p.channels_per_group;
  const bool per_channel = cpg > 1 && (p.gamma != nullptr || p.beta != nullptr);
  const bool channel_partials = p.partials != nullptr && cpg > 1;
  const float inv_len = 1.f / float(p.plane_len);

  unsigned tag = 0;  // exchanges so far (may wrap: see GradSlot)
  for (int64_t unit = block_group; unit * per_block < p.planes; unit += block_groups) {
    const int64_t plane = unit * per_block + group;
    const bool active = plane < p.planes;
    const int64_t begin = int64_t(rank) * p.slice_len;
    const int64_t end = begin + p.slice_len < p.plane_len ? begin + p.slice_len : p.plane_len;
    const int64_t len = active && end > begin ? end - begin : 0;
    const int64_t base = (active ? plane : 0) * p.plane_len + begin;
    const int64_t channel_base = (active ? plane % p.groups : 0) * cpg;

    GradPlane pl;
    GradChannel<T> plane_ch;  // instance norm: the plane's channel
    if (active) {
      plane_ch.set_channel(p, channel_base);
      if (p.use_input_stats) {
        pl.c = p.save_mean[plane];
        pl.rstd = p.save_rstd[plane];
      } else {
        pl.c = p.running_mean[channel_base];
        pl.rstd = 1.f / sqrtf(p.running_var[channel_base] + p.eps);
      }
    }

    V xr[kMaxItems], dr[kMaxItems];
    // Visits the slice chunk by chunk: start(offset) before a chunk, item(j, x, dy) for each of
    // the lane's valid vectors j = 0, 1, ... (vector j at element (j * lanes + lane) * kVec of
    // the chunk), finish(offset, length) after it. On chip, the slice is one chunk, loaded by
    // the first visit; its shared-memory vectors continue the register ones (j >= items: the
    // register part is then full on every lane, so vector positions run on unbroken).
    bool loaded = false;
    const auto visit = [&](bool x_only, auto&& start, auto&& item, auto&& finish) {
      if constexpr (!kStream) {
        const int valid = valid_items<kVec>(int(len), lane, lanes, p.items);
        const int svalid = sitems > 0 && len > chunk
                               ? valid_items<kVec>(int(len - chunk), lane, lanes, sitems)
                               : 0;
        if (!loaded) {
          load_chunk<T, kVec, kMaxItems>(xr, p.x + base, valid, lane, lanes);
          load_chunk<T, kVec, kMaxItems>(dr, p.dy + base, valid, lane, lanes);
          if (svalid > 0) {
            smem_fill<T, kVec>(&smem_vec(lane), p.x + base + chunk, svalid, lane, lanes);
            smem_fill<T, kVec>(&smem_vec(sitems * lanes + lane), p.dy + base + chunk, svalid,
                               lane, lanes);
          }
        }
        start(int64_t(0));
#pragma unroll
        for (int j = 0; j < kMaxItems; ++j)
          if (j < valid) item(j, xr[j], dr[j]);
        if (svalid > 0) {
          if (!loaded) {
            if constexpr (sizeof(V) == 16) copy_async_wait_all();  // each lane reads its own
          }
#pragma unroll 1
          for (int j = 0; j < svalid; ++j)
            item(p.items + j, smem_vec(j * lanes + lane), smem_vec((sitems + j) * lanes + lane));
        }
        loaded = true;
        finish(int64_t(0), len);
      } else {
        // Streamed plans are split plans (one group per block): every thread of the block
        // takes every iteration, so the barriers inside finish hold.
        for (int64_t off = 0; off < len; off += chunk) {
          const int clen = int(len - off < chunk ? len - off : chunk);
          const int valid = valid_items<kVec>(clen, lane, lanes, p.items);
          load_chunk<T, kVec, kMaxItems>(xr, p.x + base + off, valid, lane, lanes);
          if (!x_only) load_chunk<T, kVec, kMaxItems>(dr, p.dy + base + off, valid, lane, lanes);
          start(off);
#pragma unroll
          for (int j = 0; j < kMaxItems; ++j)
            if (j < valid) item(j, xr[j], dr[j]);
          finish(off, int64_t(clen));
        }
      }
    };
    const auto nothing = [](auto&&...) {};
    // The group's (lane group's or block's) all-reduce, then the exchange among the G blocks.
    const auto reduce = [&](GradSums s, GradSums* own) {
      s = lanes <= 32 ? warp_allreduce(s, lanes) : block_allreduce(s, st);
      if (own) *own = s;
      if (G > 1) {
        const unsigned t = ++tag;
        s = group_exchange(s, p.slots + (t & 1) * gridDim.x + block_group * G, rank, G, t, st);
      }
      return s;
    };

    with_activation(p.activation, [&](auto act_tag) {
      constexpr Activation kAct = decltype(act_tag)::value;
      // gamma/beta of the current vector's channel (GroupNorm), tracked per chunk.
      GradChannel<T> ch = plane_ch;
      ChannelCursor<T> cursor(false, ChunkChannel{0, 0}, 0, 1, kVec, 1);
      const auto start_chunk = [&](int64_t off) {
        ch = plane_ch;
        cursor = ChannelCursor<T>(per_channel, chunk_channel(channel_base, begin + off, p.spatial),
                                  lane, lanes, kVec, p.spatial);
      };

      // Pass 1 (with an activation): the residual, which pre needs.
      if (p.use_input_stats && kAct != Activation::kNone) {
        GradSums s;
        visit(
            true, nothing,
            [&](int, const V& xv, const V&) {
              float f[kVec];
              unpack(xv, f);
#pragma unroll
              for (int k = 0; k < kVec; ++k) add_compensated(s, f[k] - pl.c);
            },
            nothing);
        s = reduce(s, nullptr);
        pl.r = (s.s0_hi + s.s0_lo) * inv_len;
      }

      // Pass 2: the sums (and, in GroupNorm with dgamma/dbeta, the per-vector sums).
      GradSums own;
      GradSums s;
      const int held = p.items + sitems;  // vectors per lane in vec_sums
      visit(
          false, start_chunk,
          [&](int j, const V& xv, const V& dv) {
            cursor.visit(j, ch, p);
            float xc[kVec], d[kVec];
            grad_terms<kAct>(xv, dv, pl, ch, xc, d);
            float va = 0.f, vb = 0.f;
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
              if (p.use_input_stats && kAct == Activation::kNone) add_compensated(s, xc[k]);
              va += d[k];
              vb = fmaf(d[k], xc[k], vb);
            }
            const float w = per_channel ? ch.gamma : 1.f;
            s.a = fmaf(w, va, s.a);
            s.b = fmaf(w, vb, s.b);
            if (channel_partials)
              vec_sum((group * held + j) * lanes + lane) = make_float2(va, vb);
          },
          [&](int64_t off, int64_t clen) {
            if (channel_partials && kStream) {
              // Streamed GroupNorm: this chunk's per-channel sums are added to the block's
              // partials (each channel's slot always by the same thread, in program order).
              __syncthreads();
              channel_partial_sums<kVec>(p, &vec_sum(0), held, active ? plane : 0, begin + off,
                                         clen, rank, active,
                                         off > 0 ? PartialMode::kAdd : PartialMode::kStore, pl);
              __syncthreads();
            }
          });
      if (p.use_input_stats) {
        s = reduce(s, &own);
        if (kAct == Activation::kNone) pl.r = (s.s0_hi + s.s0_lo) * inv_len;
        // Instance norm: gamma is the plane's, applied to its sums here.
        const float w = per_channel ? 1.f : plane_ch.gamma;
        const float sg = w * s.a;
        const float sgx = w * fmaf(-pl.r, s.a, s.b);  // sum of g * (x - mean)
        pl.k1 = sg * inv_len;
        pl.k2 = pl.rstd * sgx * inv_len;
      } else if (p.partials != nullptr) {
        own = lanes <= 32 ? warp_allreduce(s, lanes) : block_allreduce(s, st);
      }

      // The partials of dgamma/dbeta: (sum of d, sum of d * xhat) of this block's part.
      if (p.partials != nullptr) {
        if (!channel_partials) {
          if (active && lane == 0)
            p.partials[plane * G + rank] =
                make_float2(own.a, pl.rstd * fmaf(-pl.r, own.a, own.b));
        } else {
          if (!kStream) __syncthreads();
          channel_partial_sums<kVec>(p, &vec_sum(0), held, active ? plane : 0, begin, len, rank,
                                     active,
                                     kStream ? PartialMode::kFinish : PartialMode::kStoreFinished,
                                     pl);
          if (!kStream) __syncthreads();
        }
      }

      // Pass 3: dx.
      T* out = p.dx + base;
      int64_t chunk_off = 0;
      visit(
          false,
          [&](int64_t off) {
            start_chunk(off);
            chunk_off = off;
          },
          [&](int j, const V& xv, const V& dv) {
            cursor.visit(j, ch, p);
            float xc[kVec], d[kVec];
            grad_terms<kAct>(xv, dv, pl, ch, xc, d);
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
              const float xhat = (xc[k] - pl.r) * pl.rstd;
              d[k] = pl.rstd * (fmaf(ch.gamma, d[k], -pl.k1) - xhat * pl.k2);
            }
            store_vector(reinterpret_cast<V*>(out + chunk_off) + lane + j * lanes,
                         pack<T, kVec>(d));
          },
          nothing);
    });
  }
}

/// Staged plans (misaligned planes: 7x7, 3x3, odd lengths): a block's planes are one contiguous
/// unit of x and one of dy, copied into shared memory with coalesced (16-byte, where aligned)
/// copies; each group of `lanes` threads (up to a warp) reduces its plane there and writes dx
/// over its dy, and the unit goes back out the same way. One stage: the plan's second stage is
/// unused (the forward's kernel double-buffers; this one has not been measured to need it).
/// Two blocks per SM (128 registers): at the forward's four (64 registers) it spilled 16-124
/// bytes.
template <class T>
__global__ void __launch_bounds__(kStagedThreads, 2) staged_backward_kernel(const BackwardParams<T> p) {
  extern __shared__ uint4 dyn_smem[];
  const int lanes = p.lanes;
  const int lane = threadIdx.x % lanes;
  const int group = threadIdx.x / lanes;
  const int per_block = blockDim.x / lanes;
  const int64_t L = p.plane_len, S = p.spatial, cpg = p.channels_per_group;
  const int64_t units = (p.planes + per_block - 1) / per_block;
  const bool vec_ok = ((reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.dy) |
                        reinterpret_cast<uintptr_t>(p.dx)) & 15) == 0;
  const int stage_elems = int((per_block * L * int64_t(sizeof(T)) + 15) / 16 * 16 / sizeof(T));
  T* const sx = reinterpret_cast<T*>(dyn_smem);
  T* const sd = sx + stage_elems;
  const float inv_len = 1.f / float(L);
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int64_t first_plane = unit * per_block;
    const int n = int((p.planes - first_plane < per_block ? p.planes - first_plane : per_block) * L);
    stage_in(sx, p.x + first_plane * L, n, vec_ok);
    stage_in(sd, p.dy + first_plane * L, n, vec_ok);
    if (vec_ok) copy_async_wait_all();
    __syncthreads();

    const int64_t nplanes = n / L;
    const bool active = group < nplanes;
    const int64_t plane = first_plane + (active ? group : 0);
    const T* xp = sx + (active ? group : 0) * L;
    T* dp = sd + (active ? group : 0) * L;
    const int mine = active && lane < L ? int((L - lane + lanes - 1) / lanes) : 0;
    const int64_t channel_base = (plane % p.groups) * cpg;
    GradPlane pl;
    GradChannel<T> plane_ch;
    plane_ch.set_channel(p, channel_base);
    if (p.use_input_stats) {
      pl.c = active ? p.save_mean[plane] : 0.f;
      pl.rstd = active ? p.save_rstd[plane] : 0.f;
    } else {
      pl.c = p.running_mean[channel_base];
      pl.rstd = 1.f / sqrtf(p.running_var[channel_base] + p.eps);
    }
    // Element i of the plane: its channel's gamma/beta (GroupNorm), x - c and d.
    GradChannel<T> ch = plane_ch;
    int64_t loaded = channel_base;
    const auto terms = [&](auto act_tag, int i, float& xc, float& d) {
      constexpr Activation kAct = decltype(act_tag)::value;
      if (cpg > 1) {
        const int64_t c_i = channel_base + i / S;
        if (c_i != loaded) {
          ch.set_channel(p, c_i);
          loaded = c_i;
        }
      }
      xc = to_float(xp[i]) - pl.c;
      d = to_float(dp[i]);
      if constexpr (kAct != Activation::kNone)
        d *= activate_derivative<kAct>(fmaf((xc - pl.r) * pl.rstd, ch.gamma, ch.beta));
    };
    with_activation(p.activation, [&](auto act_tag) {
      constexpr Activation kAct = decltype(act_tag)::value;
      if (p.use_input_stats && kAct != Activation::kNone) {
        GradSums s;
        for (int k = 0; k < mine; ++k) add_compensated(s, to_float(xp[lane + k * lanes]) - pl.c);
        s = warp_allreduce(s, lanes);
        pl.r = (s.s0_hi + s.s0_lo) * inv_len;
      }
      GradSums s;
      for (int k = 0; k < mine; ++k) {
        float xc, d;
        terms(act_tag, lane + k * lanes, xc, d);
        if (p.use_input_stats && kAct == Activation::kNone) add_compensated(s, xc);
        const float w = cpg > 1 ? ch.gamma : 1.f;
        s.a = fmaf(w, d, s.a);
        s.b = fmaf(w * d, xc, s.b);
      }
      s = warp_allreduce(s, lanes);
      if (p.use_input_stats) {
        if (kAct == Activation::kNone) pl.r = (s.s0_hi + s.s0_lo) * inv_len;
        const float w = cpg > 1 ? 1.f : plane_ch.gamma;
        pl.k1 = w * s.a * inv_len;
        pl.k2 = pl.rstd * w * fmaf(-pl.r, s.a, s.b) * inv_len;
      }
      if (p.partials != nullptr) {
        if (cpg == 1) {
          if (active && lane == 0)
            p.partials[plane] = make_float2(s.a, pl.rstd * fmaf(-pl.r, s.a, s.b));
        } else {
#pragma unroll 1
          for (int64_t k = 0; k < cpg; ++k) {  // each channel's own sums, lanes over its run
            float a = 0.f, b = 0.f;
            for (int64_t i = k * S + lane; active && i < (k + 1) * S; i += lanes) {
              float xc, d;
              terms(act_tag, int(i), xc, d);
              a += d;
              b = fmaf(d, xc, b);
            }
            a = butterfly_sum(a, lanes);
            b = butterfly_sum(b, lanes);
            if (active && lane == 0)
              p.partials[(plane / p.groups) * p.groups * cpg + channel_base + k] =
                  make_float2(a, pl.rstd * fmaf(-pl.r, a, b));
          }
        }
      }
      for (int k = 0; k < mine; ++k) {
        const int i = lane + k * lanes;
        float xc, d;
        terms(act_tag, i, xc, d);
        const float xhat = (xc - pl.r) * pl.rstd;
        dp[i] = from_float<T>(pl.rstd * (fmaf(ch.gamma, d, -pl.k1) - xhat * pl.k2));
      }
    });
    __syncthreads();
    T* dst = p.dx + first_plane * L;
    int i0 = 0;
    if (vec_ok) {
      constexpr int kPer = 16 / int(sizeof(T));
      const int nv = n / kPer;
      for (int i = threadIdx.x; i < nv; i += blockDim.x)
        reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(sd)[i];
      i0 = nv * kPer;
    }
    for (int i = i0 + threadIdx.x; i < n; i += blockDim.x) dst[i] = sd[i];
    __syncthreads();  // the next unit's copies overwrite the stage
  }
}

}  // namespace detail
}  // namespace instnorm
