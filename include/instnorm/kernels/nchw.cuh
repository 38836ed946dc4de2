#pragma once
/// \file kernels/nchw.cuh
/// The NCHW forward kernels. One template serves every strategy: a group of `lanes` threads owns one
/// slice of one plane (the whole plane unless the plane is split across G blocks), holds it in
/// registers when it fits (one DRAM read) and streams it twice otherwise. Strategies differ only
/// in the runtime group width, items per thread and G, so there are just two instantiations per
/// element type: 16-byte vectors, and scalars for misaligned or ragged planes.

#include "../arch.cuh"
#include "../block/layout.cuh"
#include "../block/reduce.cuh"
#include "../contract.cuh"
#include "../debug/trace.cuh"
#include "../epilogue/epilogue.cuh"
#include "../grid/exchange.cuh"
#include "../moments.cuh"
#include "../options.cuh"
#include "../thread/local_moments.cuh"
#include "../thread/vector.cuh"

namespace instnorm {
namespace detail {

/// Everything the kernel reads, flattened from the problem, options and plan.
template <class T>
struct KernelParams : EpilogueFields {
  const T* x;
  T* y;                        ///< null: statistics only (statistics(), api.cuh)
  int64_t planes;              ///< n * G
  int64_t plane_len;           ///< channels_per_group * spatial
  int64_t channels_per_group;
  float* save_mean;
  float* save_rstd;
  int lanes;                   ///< threads per plane slice
  int items;                   ///< vectors per thread per chunk
  int smem_items;              ///< further vectors per thread held in dynamic shared memory
  int64_t blocks_per_plane;    ///< G blocks share a plane (cooperative when > 1)
  int64_t slice_len;           ///< elements per block slice
  float* stat_mean;            ///< planes floats: mean of each plane (running-stat updates), or null
  float* stat_var;             ///< planes floats: biased variance of each plane, or null
  TaggedSlot* slots;           ///< [2][grid] tagged block partials, zeroed per launch
                               ///< (cooperative plans)
  int phases;                  ///< Plan::phases
  /// Channels-last staged plans (staged_kernel<T, true>): planes per unit, and the distance in
  /// elements between a plane's consecutive elements in its unit, c (units hold whole images,
  /// plane (image i, channel j) at i * plane_len * c + j).
  int unit_planes;
  int channel_stride;
};

/// Normalizes the valid vectors of a chunk held in registers and stores them.
template <Activation kAct, class T, int kVec, int kMaxItems>
__device__ __forceinline__ void store_chunk(const Vector<T, kVec> (&r)[kMaxItems], T* dst,
                                            int valid, int lane, int lanes, Epilogue<T>& ep,
                                            const KernelParams<T>& p, bool per_channel,
                                            ChunkChannel cc) {
  auto* d = reinterpret_cast<Vector<T, kVec>*>(dst) + lane;
  ChannelCursor<T> cursor(per_channel, cc, lane, lanes, kVec, p.spatial);
#pragma unroll
  for (int j = 0; j < kMaxItems; ++j) {
    if (j < valid) {
      cursor.visit(j, ep, p);
      store_vector(d + j * lanes, normalize_vector<kAct>(r[j], ep));
    }
  }
}

template <Activation kAct, class T, int kVec>
__device__ __forceinline__ void smem_store(const Vector<T, kVec>* sm, T* dst, int valid,
                                           int lane, int lanes, Epilogue<T>& ep,
                                           const KernelParams<T>& p, bool per_channel,
                                           ChunkChannel cc) {
  auto* d = reinterpret_cast<Vector<T, kVec>*>(dst) + lane;
  ChannelCursor<T> cursor(per_channel, cc, lane, lanes, kVec, p.spatial);
  for (int j = 0; j < valid; ++j) {
    cursor.visit(j, ep, p);
    store_vector(d + j * lanes, normalize_vector<kAct>(sm[j * lanes], ep));
  }
}

/// Second half of a round: normalize the slice (from registers, or re-read chunk by chunk).
template <Activation kAct, bool kStream, class T, int kVec, int kMaxItems>
__device__ __forceinline__ void normalize_slice(Vector<T, kVec> (&regs)[kMaxItems],
                                                const T* xs, T* ys, int64_t len, int chunk,
                                                int lane, int lanes, Epilogue<T>& ep,
                                                const KernelParams<T>& p, bool per_channel,
                                                int64_t channel_base, int64_t begin,
                                                ChunkChannel cc) {
  if constexpr (!kStream) {
    const int valid = valid_items<kVec>(int(len), lane, lanes, p.items);
    // A thread whose kMaxItems vectors are all valid (planes that fill the plan, as the
    // standard rows do) stores them without the per-vector checks. fp32 vectors only: the copy
    // left the fp16 kernels (vectors and scalars) spilling 4 bytes on sm_90 (nvcc 13.0).
    if (kVec == 4 && sizeof(T) == 4 && valid == kMaxItems)
      store_chunk<kAct>(regs, ys, kMaxItems, lane, lanes, ep, p, per_channel, cc);
    else
      store_chunk<kAct>(regs, ys, valid, lane, lanes, ep, p, per_channel, cc);
    if (p.smem_items > 0 && len > chunk) {
      extern __shared__ uint4 dyn_smem[];
      const int svalid = valid_items<kVec>(int(len - chunk), lane, lanes, p.smem_items);
      const ChunkChannel scc =
          per_channel ? chunk_channel(channel_base, begin + chunk, p.spatial) : cc;
      smem_store<kAct>(reinterpret_cast<const Vector<T, kVec>*>(dyn_smem) + lane, ys + chunk,
                       svalid, lane, lanes, ep, p, per_channel, scc);
    }
  } else {
    for (int64_t off = 0; off < len; off += chunk) {
      const int clen = int(len - off < chunk ? len - off : chunk);
      const int valid = valid_items<kVec>(clen, lane, lanes, p.items);
      const ChunkChannel ccc = chunk_channel(channel_base, begin + off, p.spatial);
      load_chunk<T, kVec, kMaxItems>(regs, xs + off, valid, lane, lanes);
      store_chunk<kAct>(regs, ys + off, valid, lane, lanes, ep, p, per_channel, ccc);
    }
  }
}

/// A slice of a plane that does not start on a 16-byte boundary, cut into a scalar head (up to
/// the first boundary), a body of whole 16-byte vectors and a scalar tail (Plan::ragged). Each
/// of the first head + tail lanes (at most 2 * (kVec - 1) <= 14, and ragged plans have at least
/// 32 lanes) owns one of the scalars: `extra` is its offset in the slice, or -1.
struct RaggedSlice {
  int head = 0;
  int64_t body = 0;    ///< elements, a multiple of kVec
  int64_t extra = -1;
};
template <class T, int kVec>
__device__ __forceinline__ RaggedSlice ragged_slice(const T* xs, int64_t len, int lane) {
  RaggedSlice r;
  const int mis = int((reinterpret_cast<uintptr_t>(xs) / sizeof(T)) % kVec);
  r.head = int(mis == 0 ? 0 : kVec - mis < len ? kVec - mis : len);
  r.body = (len - r.head) / kVec * kVec;
  const int tail = int(len - r.head - r.body);
  r.extra = lane < r.head ? lane : lane < r.head + tail ? r.body + lane : -1;
  return r;
}

/// A split plan's exchange: the G blocks of a plane (block_group's) publish their slices'
/// moments in this round's parity of the tagged slots and merge all G in the same order (a block
/// that is not `active` has no plane this round: its slices count as empty).
template <class T>
__device__ __forceinline__ Moments exchange_plane_moments(const KernelParams<T>& p,
                                                          const Moments& m, unsigned round,
                                                          int block_group, int rank, int G,
                                                          bool active, BlockReduceStorage& smem) {
  TaggedSlot* slots = p.slots + (round & 1) * gridDim.x + block_group * G;
  const unsigned tag = round + 1u;
  group_publish(m, slots, rank, tag);
  const int64_t slice = p.slice_len, plane_len = p.plane_len;
  return group_wait(slots, G, tag,
                    [=](int i) -> int64_t {
                      const int64_t left = active ? plane_len - int64_t(i) * slice : 0;
                      return left < 0 ? 0 : left < slice ? left : slice;
                    },
                    active ? plane_len : 0, smem);
}

/// forward_kernel<..., kMap>'s two slots of a plane's map (static shared memory of that
/// instance alone).
__device__ __forceinline__ float* plane_map_slots() {
  __shared__ float slots[8];
  return slots;
}

/// The forward kernel; see the file comment. kStream: slices larger than one chunk are read
/// twice (moments, then normalize); otherwise the slice stays in registers between the two.
/// G > 1 blocks of a plane exchange their partials through tagged global slots.
/// kRagged: planes that are not 16-byte aligned (x and y equally misaligned) keep 16-byte
/// vectors for the body of each slice and one scalar per lane for its head and tail
/// (RaggedSlice); the scalar kernel held such planes at 128 registers and 25% occupancy.
/// Grid: block_groups * G blocks; each group of G consecutive blocks walks planes (or batches of
/// planes, for sub-warp groups) in rounds.
/// kMap (select_kernel: block and split plans of modulated instance norm whose maps are float):
/// thread 0 copies the plane's map (gamma, beta, scale, shift) into shared memory as the plane
/// begins (cp.async: no register held across the slice's loads) and waits for it before the
/// reduction's barriers; every thread folds it from there. Loaded after the reduction, each
/// plane's epilogue waited a DRAM round trip: 4x256x128x128 fp32 AdaIN 3.3-6.3% over the row
/// without modulation (H200, 71b85a3). The same code in the kernel every plan shares made a
/// plain sub-warp row 2.4-3.1% slower (H100), hence an instance of its own. Two slots by the
/// round's parity: thread 0 refills one only after the next round's barriers, which every
/// thread reaches after its read of it.
template <class T, int kVec, int kMaxItems, bool kStream, bool kRagged = false, bool kMap = false>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel(const KernelParams<T> p) {
  using V = Vector<T, kVec>;
  __shared__ BlockReduceStorage smem;
  const int lanes = p.lanes;
  const LaneGroups lg = lane_groups(lanes);
  const int lane = lg.lane, group = lg.group;
  const int per_block = lg.per_block;  // planes a block handles per round
  const int G = int(p.blocks_per_plane);
  const BlockRank br = block_rank(G);
  const int rank = br.rank, block_group = br.group, block_groups = br.groups;
  const int chunk = lanes * p.items * kVec;  // <= 512 * 32
  const bool affine = has_channel_params(p);
  const bool per_channel = affine && p.channels_per_group > 1;

  unsigned round = 0;  // only its parity and the exchange tag (which may wrap) use it
  trace_stamp(0, 0);
  if (G > 1 && p.planes > block_groups) wait_for_partner(p.slots, block_group, rank, G, p.phases);
  for (int64_t unit = block_group; unit * per_block < p.planes; unit += block_groups, ++round) {
    trace_stamp(round, 1);
    const int64_t plane = unit * per_block + group;
    const bool active = plane < p.planes;
    const int64_t begin = int64_t(rank) * p.slice_len;
    const int64_t end = begin + p.slice_len < p.plane_len ? begin + p.slice_len : p.plane_len;
    const int64_t len = active && end > begin ? end - begin : 0;
    const int64_t base = (active ? plane : 0) * p.plane_len;
    const T* xs = p.x + base + begin;
    // The pivot: the plane's first element. Shifting by a value of the plane removes the common
    // offset before anything is merged, so fp32 moments stay accurate when |mean| >> std.
    const float pivot = active ? to_float(p.x[base]) : 0.f;
    // Channels matter only with gamma/beta or a modulation; skip the 64-bit divisions otherwise
    // (they cost more than the data of a 7x7 plane).
    int64_t channel_base = 0;
    ChunkChannel cc{0, 0};
    if (affine) {
      channel_base = (plane % p.groups) * p.channels_per_group;
      cc = chunk_channel(channel_base, begin, p.spatial);
    }
    float* map = nullptr;
    if constexpr (kMap) map = plane_map_slots() + 4 * (round & 1);
    if (kMap && threadIdx.x == 0 && active) {
      const int64_t image = is_modulated(p) ? image_of(p, plane) : 0;
      const auto f = [](const void* q) { return static_cast<const float*>(q); };
      if (p.gamma) copy_async4(&map[0], f(p.gamma) + channel_base); else map[0] = 1.f;
      if (p.beta) copy_async4(&map[1], f(p.beta) + channel_base); else map[1] = 0.f;
      if (p.mod_scale)
        copy_async4(&map[2], f(p.mod_scale) + image * p.scale_stride + channel_base);
      else
        map[2] = 0.f;
      if (p.mod_shift)
        copy_async4(&map[3], f(p.mod_shift) + image * p.shift_stride + channel_base);
      else
        map[3] = 0.f;
    }
    // The vectors' part of the slice: all of it, or (kRagged) the body between head and tail,
    // whose scalars the lanes with rs.extra >= 0 hold one each (re-read for the normalize, so
    // that neither they nor the cut stay in registers across the reduction).
    int64_t vlen = len;
    RaggedSlice rs;
    if constexpr (kRagged) {
      rs = ragged_slice<T, kVec>(xs, len, lane);
      vlen = rs.body;
    }
    const T* xv = xs + rs.head;
    const bool has_extra = kRagged && rs.extra >= 0;
    const float xe = has_extra ? to_float(xs[rs.extra]) : 0.f;

    V regs[kMaxItems];
    Moments m;
    if constexpr (!kStream) {
      const int valid = valid_items<kVec>(int(vlen), lane, lanes, p.items);
      extern __shared__ uint4 dyn_smem[];
      const int svalid = p.smem_items > 0 && vlen > chunk
                             ? valid_items<kVec>(int(vlen - chunk), lane, lanes, p.smem_items)
                             : 0;
      load_chunk<T, kVec, kMaxItems>(regs, xv, valid, lane, lanes);
      if (svalid > 0)
        smem_fill<T, kVec>(reinterpret_cast<V*>(dyn_smem) + lane, xv + chunk, svalid, lane, lanes);
      m = chunk_moments<T, kVec, kMaxItems>(regs, valid, pivot,
                                            reinterpret_cast<const V*>(dyn_smem) + lane, svalid,
                                            lanes, has_extra, xe);
    } else {
      for (int64_t off = 0; off < vlen; off += chunk) {
        const int clen = int(vlen - off < chunk ? vlen - off : chunk);
        const int valid = valid_items<kVec>(clen, lane, lanes, p.items);
        load_chunk<T, kVec, kMaxItems>(regs, xv + off, valid, lane, lanes);
        // Chunks do not grow (only the last is shorter; the first may hold the extra value),
        // so m is the larger partial; a thread's count fits in an int (a block's slice over at
        // least 32 threads: 2^36 elements, more than any GPU holds, would still fit).
        m = merge_into<int>(m, chunk_moments<T, kVec, kMaxItems>(regs, valid, pivot, nullptr, 0,
                                                                 0, has_extra && off == 0, xe));
      }
      if (vlen == 0 && has_extra)
        m = chunk_moments<T, kVec, kMaxItems>(regs, 0, pivot, nullptr, 0, 0, true, xe);
    }
    trace_stamp(round, 2);
    if (kMap && threadIdx.x == 0) copy_async_wait_all();  // before the reduction's barriers
    m = lanes <= 32 ? warp_allreduce_shares(m, len, lanes) : block_allreduce_shares(m, len, smem);
    trace_stamp(round, 3);
    if (G > 1) m = exchange_plane_moments(p, m, round, block_group, rank, G, active, smem);
    trace_stamp(round, 4);

    Epilogue<T> ep = plane_epilogue(p, pivot, m, plane, active && rank == 0 && lane == 0);
    if (active) {
      if constexpr (kMap) {  // the same operations as set_channel's: the same bits
        const ScaleShift ss = scale_shift(
            fold_affine(p, AffineLoads{map[0], map[1], map[2], map[3]}), ep.rstd, ep.residual);
        ep.scale = ss.scale;
        ep.shift = ss.shift;
      } else {
        ep.set_channel(p, cc.channel);
      }
    }
    if (p.y == nullptr) continue;  // statistics only
    T* ys = p.y + base + begin;
    if constexpr (kRagged) rs = ragged_slice<T, kVec>(xs, len, lane);
    with_activation(p.activation, [&](auto act) {
      constexpr Activation kAct = decltype(act)::value;
      normalize_slice<kAct, kStream>(regs, xs + rs.head, ys + rs.head, kRagged ? rs.body : len,
                                     chunk, lane, lanes, ep, p, per_channel, channel_base,
                                     begin + rs.head, cc);
      if constexpr (kRagged) {
        // No channel changes inside a ragged plane (one channel, or no per-channel parameters).
        if (rs.extra >= 0) {
          const float v = to_float(xs[rs.extra]);
          ys[rs.extra] = from_float<T>(activate<kAct>(fmaf(v - ep.center, ep.scale, ep.shift)));
        }
      }
    });
    trace_stamp(round, 5);
  }
  trace_flush(round);
}

/// What the staged kernel's register instance knows of a lane before its first plane: every
/// plane of a launch has the same length, so a lane's count of values, its reciprocal and the
/// lane's share of the plane (SharesCombine) are the same for every plane. (The whole SumScale
/// held across the unit loop left sm_89 12 bytes of spill at 16 values a lane.)
struct RegLane {
  int n;
  float inv_n, share;
};
template <class T>
__device__ __forceinline__ RegLane reg_lane(const KernelParams<T>& p, int lane, int lanes) {
  const int len = int(p.plane_len);
  // valid_items<1>(len, lane, lanes, kStagedRegItems) without its clamp, which left 4 bytes of
  // spill on sm_90.
  const int mine = lane < len ? ((len - lane + lanes - 1) >> lanes_log2(lanes)) : 0;
  return RegLane{mine, reciprocal(static_cast<float>(mine > 0 ? mine : 1)), share_of(mine, len)};
}

/// The activation of a staged value, chosen at run time (the staged kernels keep one instance
/// for all three).
__device__ __forceinline__ float staged_activate(Activation act, float t) {
  return act == Activation::kRelu   ? activate<Activation::kRelu>(t)
         : act == Activation::kSilu ? activate<Activation::kSilu>(t)
                                    : t;
}

/// One plane of a staged unit (xp: its first value in shared memory; every lane of the group
/// calls it, `active` or not) by the register instance: the lane reads its values (elements
/// lane, lane + lanes, ...) once, takes both passes of its moments from registers, merges the
/// group's by shares and writes each normalized value once, in place. One map a plane: planes
/// whose parameters change inside them (Problem::channel_runs) run the shared-memory instance
/// (staged_in_registers), since tracking the channel per value beside 16 values in registers
/// spilled 8-196 bytes at 64 registers however it was written (ChannelCursor in 32 bits, a
/// float division by the spatial size, the shared-memory instance's channel runs after the
/// moments). The map is loaded before the values, so that its round trip overlaps them and the
/// reduction (loaded after them, it held registers across the values: 44-52 bytes of spill).
template <int kItems, class T>
__device__ __forceinline__ void staged_plane_in_registers(const KernelParams<T>& p, T* xp,
                                                          bool active, int64_t plane, int lane,
                                                          int lanes, const RegLane& rl) {
  const bool affine = has_channel_params(p);
  const int64_t channel_base = affine ? (plane % p.groups) * p.channels_per_group : 0;
  ChannelAffine map{1.f, 0.f};
  if (affine && active && p.y != nullptr)
    map = channel_affine<T>(p, is_modulated(p) ? image_of(p, plane) : 0, channel_base);
  const float pivot = active ? to_float(xp[0]) : 0.f;
  const int mine = active ? rl.n : 0;
  float v[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) v[k] = k < mine ? to_float(xp[lane + k * lanes]) : 0.f;
  Moments m = register_moments(v, mine, SumScale::with_reciprocal(rl.n, rl.inv_n), pivot);
  // The lane's share from rl; the shuffles also order every lane's pivot read before any write.
  m = warp_allreduce_shares(m, active ? rl.share : 0.f, active ? p.plane_len : 0, lanes);
  if (!active) return;
  Epilogue<T> ep = plane_epilogue(p, pivot, m, plane, lane == 0);
  if (p.y == nullptr) return;  // statistics only
  const ScaleShift ss = scale_shift(map, ep.rstd, ep.residual);  // set_channel's operations
#pragma unroll
  for (int k = 0; k < kItems; ++k)
    if (k < mine)
      xp[lane + k * lanes] = from_float<T>(
          staged_activate(p.activation, fmaf(v[k] - ep.center, ss.scale, ss.shift)));
}

/// Staged plans (Strategy::kStaged: planes that are not 16-byte aligned, such as 7x7, 3x3 and odd
/// lengths). A block's planes are one contiguous unit: it is copied into shared memory with
/// coalesced (16-byte, where aligned) copies, each group of `lanes` threads (up to a warp)
/// normalizes its plane there in place, and the unit goes back out the same way. Two stages:
/// where a block has several units, the next one's cp.async copy is in flight while this one is
/// reduced and stored; the persistent grid walks the units. On 128x512x7x7 on the H100: loading
/// planes in place (lane-strided scalars within each plane) 0.44 of copy, every warp instruction
/// touching 8-16 scattered plane fragments; the unit copied element by element through
/// registers 0.74; in 16-byte copies 0.87. Channels-last (kChannelsLast, stride c): a unit is
/// whole images, plane q of the unit being channel q % c of image q / c, element i of it at
/// stride c; with one lane per plane a warp reads consecutive channels of a row
/// (NhwcPlan::staged, NhwcPlan::lanes). kRounds: the block's groups
/// of lanes take a unit's planes in rounds; without it (channels-last units of at most one
/// plane per group) one round, a constant: the loop over rounds made a one-round plan 13%
/// slower (H100, 3067x133x5x47 bf16 at one lane per plane, same plan, same-run A/B).
/// kRegItems > 0 (NCHW forward, staged_in_registers): the register instance, whose lanes hold at
/// most kRegItems values of a plane (staged_plane_in_registers); 0: the values stay in shared
/// memory, read once per pass.
template <class T, bool kChannelsLast = false, bool kRounds = !kChannelsLast, int kRegItems = 0>
__global__ void __launch_bounds__(kStagedThreads, kStagedBlocksPerSm)
    staged_kernel(const KernelParams<T> p) {
  static_assert(kRegItems == 0 || (!kChannelsLast && kRounds), "register instance: NCHW only");
  extern __shared__ uint4 dyn_smem[];
  const int lanes = p.lanes;
  const LaneGroups lg = lane_groups(lanes);
  const int lane = lg.lane, group = lg.group;
  // Planes per unit: groups of `lanes` threads take them in turns (Plan::unit_planes: several
  // planes per group where planes are short, so that a unit is large enough to stream).
  const int groups = lg.per_block;
  const int per_block = p.unit_planes;
  // A template argument: the stride as a run-time value left the NCHW instantiation spilling 4
  // bytes on sm_90.
  const int cs = kChannelsLast ? p.channel_stride : 1;
  const int64_t L = p.plane_len;
  const int len = int(L);  // a unit of planes fits in shared memory
  const int64_t units = (p.planes + per_block - 1) / per_block;
  const bool affine = has_channel_params(p);
  // Units start 16-byte aligned where x and y do and a unit is a whole number of 16 bytes
  // (always in NCHW: per_block >= 8 planes of >= 2-byte elements).
  const bool vec_ok =
      ((reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.y)) & 15) == 0 &&
      (!kChannelsLast || (per_block * L * int64_t(sizeof(T))) % 16 == 0);
  // Stage k at stage_bytes * k (plan.cuh's staged_stage_bytes); an array of the two pointers,
  // indexed at run time, would live in local memory.
  const int stage_bytes = int((per_block * L * int64_t(sizeof(T)) + 15) / 16 * 16);
  const auto stage = [&](int k) {
    return reinterpret_cast<T*>(reinterpret_cast<char*>(dyn_smem) + k * stage_bytes);
  };
  const auto unit_elems = [&](int64_t u) {
    const int64_t first = u * per_block;
    return int((p.planes - first < per_block ? p.planes - first : per_block) * L);
  };
  [[maybe_unused]] const auto rl = [&] {
    if constexpr (kRegItems > 0)
      return reg_lane(p, lane, lanes);
    else
      return 0;
  }();
  if (vec_ok && blockIdx.x < units)
    stage_in(stage(0), p.x + int64_t(blockIdx.x) * per_block * L, unit_elems(blockIdx.x), true);
  int s = 0;
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x, s ^= 1) {
    const int64_t next = unit + gridDim.x;
    const int64_t first_plane = unit * per_block;
    const int n = unit_elems(unit);  // <= per_block * L: the plan's stage size
    T* buf = stage(s);
    if (vec_ok) {
      if (next < units) {
        copy_async_commit();
        stage_in(stage(s ^ 1), p.x + next * per_block * L, unit_elems(next), true);
        copy_async_commit();
        copy_async_wait<1>();
      } else {
        copy_async_commit();
        copy_async_wait<0>();
      }
    } else {
      stage_in(buf, p.x + first_plane * L, n, false);
    }
    __syncthreads();

    const int nplanes = n / len;
    // The same trip count in every group (shuffles inside need whole warps).
    const int trips = kRounds ? (nplanes + groups - 1) / groups : 1;
    for (int trip = 0; trip < trips; ++trip) {
      const int q = trip * groups + group;
      const bool active = q < nplanes;
      const int gi = active ? q : 0;
      T* xp = buf + (gi / cs) * len * cs + gi % cs;  // element i of the plane at xp[i * cs]
      if constexpr (kRegItems > 0) {
        staged_plane_in_registers<kRegItems>(p, xp, active, first_plane + q, lane, lanes, rl);
        continue;
      }
      const float pivot = active ? to_float(xp[0]) : 0.f;
      // lanes is a power of two and a staged plane fits in shared memory: shifts and masks of
      // 32-bit values (64-bit divisions cost more than a short plane's data).
      const int mine = active && lane < len ? ((len - lane + lanes - 1) >> lanes_log2(lanes)) : 0;
      Moments m =
          local_moments(mine, [&](int k) { return to_float(xp[(lane + k * lanes) * cs]); }, pivot);
      // By shares of the plane's length (SharesCombine); the shuffles also order every lane's
      // pivot read before any write.
      m = warp_allreduce_shares(m, active ? L : 0, lanes);
      if (active) {
        const int64_t plane = first_plane + q;
        Epilogue<T> ep = plane_epilogue(p, pivot, m, plane, lane == 0);
        const int64_t channel_base = affine ? (plane % p.groups) * p.channels_per_group : 0;
        // Channel by channel (one run of the plane each; the whole plane without parameters):
        // the parameters are loaded outside the element loop. Element i stays with lane
        // i % lanes. None for statistics only.
        const int runs = p.y == nullptr ? 0 : affine ? int(p.channels_per_group) : 1;
        const int run_len = runs > 1 ? int(p.spatial) : len;
        for (int r = 0; r < runs; ++r) {
          ep.set_channel(p, channel_base + r);  // without parameters: rstd and the residual
          const int lo = r * run_len, hi = lo + run_len;
          for (int i = lo + ((lane - lo) & (lanes - 1)); i < hi; i += lanes) {
            const float t = fmaf(to_float(xp[i * cs]) - ep.center, ep.scale, ep.shift);
            xp[i * cs] = from_float<T>(staged_activate(p.activation, t));
          }
        }
      }
    }
    __syncthreads();
    if (p.y != nullptr) stage_out(p.y + first_plane * L, buf, n, vec_ok);
    __syncthreads();  // the next unit's prefetch overwrites this stage
  }
}


}  // namespace detail
}  // namespace instnorm
