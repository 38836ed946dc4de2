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

#include "../block/grad_reduce.cuh"
#include "../block/layout.cuh"
#include "../contract.cuh"
#include "../epilogue/epilogue.cuh"
#include "../epilogue/grad_partials.cuh"
#include "../grid/grad_exchange.cuh"
#include "../moments.cuh"
#include "../options.cuh"
#include "../thread/vector.cuh"

namespace instnorm {
namespace detail {

/// The tensors of every backward kernel: x and dy in, dx out. A base after EpilogueFields, so
/// that the fields keep the offsets they had when each parameter struct spelled them out (a
/// reordering of the backward's parameters made ptxas spill 8-20 bytes).
template <class T>
struct GradTensors {
  const T* x;
  const T* dy;
  T* dx;
};

/// Everything the backward kernel reads.
template <class T>
struct BackwardParams : EpilogueFields, GradTensors<T> {
  int64_t planes;              ///< n * G
  int64_t plane_len;           ///< channels_per_group * spatial
  int64_t channels_per_group;
  const float* save_mean;      ///< the forward's, per plane (use_input_stats)
  const float* save_rstd;
  bool use_input_stats;
  int lanes;
  int items;
  int smem_items;              ///< further vectors of x and of dy per thread in shared memory
  int64_t blocks_per_plane;
  int64_t slice_len;
  GradSlot* slots;             ///< [2][grid] (cooperative plans)
  /// [n * c][blocks_per_plane]: each block's (sum of d, sum of d * xhat) over its part of each
  /// channel, reduced to dbeta and dgamma by grad_params_kernel; null when neither is asked.
  float2* partials;
  /// Instance norm without gamma and beta, one block per plane, neither dgamma nor dbeta asked
  /// (AdaIN): the kernel stores dscale/dshift itself ([n * c]), without partials or
  /// grad_params_kernel (launch/backward.cuh: direct_scale_shift).
  float* dscale;
  float* dshift;
  /// Whether the kernel forms the parameter sums (partials, or dscale/dshift directly).
  __host__ __device__ bool param_sums() const {
    return partials != nullptr || dscale != nullptr || dshift != nullptr;
  }
};

/// A plane's parameter sums (sum of d, sum of d * xhat) over block `rank`'s part, instance norm:
/// its partial slot, or (BackwardParams::dscale: no gamma or beta) dshift and dscale themselves.
/// kDirect false: partials only (the streamed kernel, which otherwise spills on sm_90).
template <bool kDirect, class T>
__device__ __forceinline__ void store_plane_sums(const BackwardParams<T>& p, int64_t plane,
                                                 int64_t rank, float sd, float sdx) {
  if (!kDirect || p.partials != nullptr) {
    p.partials[plane * p.blocks_per_plane + rank] = make_float2(sd, sdx);
    return;
  }
  if (p.dshift != nullptr) p.dshift[plane] = sd;
  if (p.dscale != nullptr) p.dscale[plane] = sdx;
}

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

/// A plane's saved statistics (training) or running ones (eval) as the backward's pivot and
/// rstd, and the loads of its channel's affine map (instance norm; GroupNorm tracks the map per
/// vector), which the caller folds (fold_affine) where it first needs them.
template <class T>
__device__ __forceinline__ void grad_plane_of(const BackwardParams<T>& p, int64_t plane,
                                              int64_t channel_base, GradPlane& pl,
                                              GradChannel<T>& ch, AffineLoads& loads) {
  if (is_modulated(p)) ch.image = image_of(p, plane);
  loads = load_affine<T>(p, ch.image, channel_base);
  if (p.use_input_stats) {
    pl.c = p.save_mean[plane];
    pl.rstd = p.save_rstd[plane];
  } else {
    pl.c = p.running_mean[channel_base];
    pl.rstd = 1.f / sqrtf(p.running_var[channel_base] + p.eps);
  }
}

/// This block's part of dgamma/dbeta: per plane (instance norm, `own` the block's sums), or
/// with `channel_partials` (GroupNorm) per channel from the per-vector sums at &vec_sum(0).
template <int kVec, bool kStream, class T, class VecSum>
__device__ __forceinline__ void param_partials(const BackwardParams<T>& p, const GradSums& own,
                                               const GradPlane& pl, bool channel_partials,
                                               VecSum vec_sum, int held, int64_t plane,
                                               int64_t begin, int64_t len, int rank, bool active,
                                               int lane) {
  if (!channel_partials) {
    if (active && lane == 0)
      store_plane_sums<!kStream>(p, plane, rank, own.a, pl.rstd * fmaf(-pl.r, own.a, own.b));
  } else {
    if (!kStream) __syncthreads();
    channel_partial_sums<kVec>(p, &vec_sum(0), held, active ? plane : 0, begin, len, rank, active,
                               kStream ? PartialMode::kFinish : PartialMode::kStoreFinished, pl);
    if (!kStream) __syncthreads();
  }
}

/// Visits the slice chunk by chunk: start(offset) before a chunk, item(j, x, dy) for each of
/// the lane's valid vectors j = 0, 1, ... (vector j at element (j * lanes + lane) * kVec of
/// the chunk), finish(offset, length) after it. On chip, the slice is one chunk, loaded by
/// the first visit; its shared-memory vectors continue the register ones (j >= items: the
/// register part is then full on every lane, so vector positions run on unbroken).
/// The lane's x and dy vectors live in the kernel's arrays `xr`, `dr` (a register array must
/// not leave the kernel's frame), passed by reference. `loaded` is set after the first visit.
template <class T, int kVec, int kMaxItems, bool kStream>
struct SliceVisitor {
  using V = Vector<T, kVec>;
  const BackwardParams<T>& p;
  V (&xr)[kMaxItems];
  V (&dr)[kMaxItems];
  int64_t base, len;
  int lane, lanes, chunk, sitems;
  bool loaded = false;
  __device__ __forceinline__ V& smem_vec(int k) const {
    extern __shared__ uint4 dyn_smem[];
    return reinterpret_cast<V*>(dyn_smem)[k];
  }
  template <class Start, class Item, class Finish>
  __device__ __forceinline__ void operator()(bool x_only, Start&& start, Item&& item,
                                             Finish&& finish) {
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
  }
};

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
  const LaneGroups lg = lane_groups(lanes);
  const int lane = lg.lane, per_block = lg.per_block, group = lg.group;
  const int G = int(p.blocks_per_plane);
  const BlockRank br = block_rank(G);
  const int rank = br.rank, block_group = br.group, block_groups = br.groups;
  const int chunk = lanes * p.items * kVec;
  // The extension holds 16-byte vectors only (cp.async; the planner gives scalar plans none).
  const int sitems = kStream || sizeof(V) != 16 ? 0 : p.smem_items;
  // Addresses from dyn_smem where they are used (here and SliceVisitor::smem_vec): kept as
  // pointers, they cost the registers that made the scalar and sm_89 kernels spill.
  const auto vec_sum = [&](int k) -> float2& {
    return reinterpret_cast<float2*>(reinterpret_cast<V*>(dyn_smem) + 2 * sitems * lanes)[k];
  };
  const int64_t cpg = p.channels_per_group;
  const bool per_channel = cpg > 1 && has_channel_params(p);
  const bool channel_partials = p.partials != nullptr && cpg > 1;
  // Whether this kernel forms the parameter sums; the streamed one only into partials.
  const bool param_sums = kStream ? p.partials != nullptr : p.param_sums();
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
    // Instance norm: the plane's channel, its map folded from plane_loads where first needed:
    // with an activation before the passes (pre needs it), without one after pass 2's sums.
    // An 8x512x64x64 bf16 AdaIN backward (3.9 planes a block, one after another) whose fold
    // came first waited on the scale's DRAM round trip before each plane's data loads: +6.6%
    // over the row without modulation (H100).
    AffineLoads plane_loads{1.f, 0.f, 0.f, 0.f};
    GradChannel<T> plane_ch;
    if (active) grad_plane_of(p, plane, channel_base, pl, plane_ch, plane_loads);
    const auto fold_plane_channel = [&] {
      const ChannelAffine a = fold_affine(p, plane_loads);
      plane_ch.gamma = a.gamma;
      plane_ch.beta = a.beta;
    };

    V xr[kMaxItems], dr[kMaxItems];
    // On chip, the first visit loads the slice (SliceVisitor).
    SliceVisitor<T, kVec, kMaxItems, kStream> visit{p, xr, dr, base, len, lane, lanes, chunk,
                                                    sitems};
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
      if constexpr (kAct != Activation::kNone) fold_plane_channel();
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
      if constexpr (kAct == Activation::kNone) fold_plane_channel();
      if (p.use_input_stats) {
        s = reduce(s, &own);
        if (kAct == Activation::kNone) pl.r = (s.s0_hi + s.s0_lo) * inv_len;
        // Instance norm: gamma is the plane's, applied to its sums here.
        const float w = per_channel ? 1.f : plane_ch.gamma;
        const float sg = w * s.a;
        const float sgx = w * fmaf(-pl.r, s.a, s.b);  // sum of g * (x - mean)
        pl.k1 = sg * inv_len;
        pl.k2 = pl.rstd * sgx * inv_len * p.var_scale;  // 1/(S-1) for the unbiased variance
      } else if (param_sums) {
        own = lanes <= 32 ? warp_allreduce(s, lanes) : block_allreduce(s, st);
      }

      // The partials of dgamma/dbeta: (sum of d, sum of d * xhat) of this block's part.
      if (param_sums) {
        param_partials<kVec, kStream>(p, own, pl, channel_partials, vec_sum, held, plane, begin,
                                      len, rank, active, lane);
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

}  // namespace detail
}  // namespace instnorm
