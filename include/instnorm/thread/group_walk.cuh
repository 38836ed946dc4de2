#pragma once
/// \file thread/group_walk.cuh
/// A thread's walk over consecutive channels and the groups they belong to (GroupNorm; groups of
/// one channel for instance norm). Host and device: the CPU tests check the walk.

#include "../moments.cuh"  // INSTNORM_HD

namespace instnorm {
namespace detail {

/// Channels ch, ch + 1, ... (next() steps) and the first channel of the current one's group of
/// cpg: one division at the start instead of one per channel (a thread of the on-chip NHWC
/// kernel walks its kVec channels twice per round).
struct GroupWalk {
  int first;  ///< the current channel's group starts here
  int left;   ///< channels of that group from the current one on
  int cpg;
  INSTNORM_HD GroupWalk(int ch, int cpg_)
      : first(ch / cpg_ * cpg_), left(ch / cpg_ * cpg_ + cpg_ - ch), cpg(cpg_) {}
  INSTNORM_HD void next() {
    if (--left == 0) {
      first += cpg;
      left = cpg;
    }
  }
};

}  // namespace detail
}  // namespace instnorm
