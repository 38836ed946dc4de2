// instnorm_bench: times instnorm against a same-run device-to-device copy of the same bytes
// (the floor: one read, one write), a naive two-kernel CUDA baseline and cuDNN batch-norm
// training on the (1, N*C, H, W) view (what PyTorch runs). Google Benchmark, manual time from
// CUDA events; the L2 is flushed (a 256 MB memset, as triton's do_bench does) before every timed
// run. Each row reports the median in its counters.
//
// The floor is measured inside each row: every round is flush, cudaMemcpyAsync of the row's
// bytes, flush, the timed call, so the copy sees the same clocks, temperature and flushed L2 as
// the kernel it is compared with; of_copy = copy median / kernel median of the same rounds, and
// copy_ms / copy_GBps say what the copy did. A separate copy row, minutes earlier in the run,
// was off by up to 11%. At start the run measures its steady copy rate (a 1 GiB
// copy, median of 9, context steady_copy_GBps); a row whose copy moves 64 MiB or more and runs
// over 3% off that rate is measured again (twice at most), keeping the measurement whose copy is
// closest to the steady rate (copy_remeasured: how many more were taken).
//
// Backward rows (:bwd, :train) time instnorm::backward (detail::backward_tuned with a
// preallocated workspace of backward_workspace_size bytes: no allocation timed). :bwd runs the
// forward once untimed (saving mean/rstd), then times the backward alone: dx into its own buffer,
// dgamma/dbeta where the shape is affine or GroupNorm; its copy floor moves 3 tensor volumes
// (1.5x the bytes copied: x and dy read, dx written). :train times forward + backward per run
// (the forward as the forward rows call it); floor 5 volumes (2.5x the bytes copied). GBps
// counts those volumes. dx is checked once (all finite; against reference::backward on the
// first and last plane/image, or on the whole tensor with dgamma/dbeta for small shapes).
//
// Per-sample modulation (Options::modulation): :ss is the scale-shift of diffusion
// U-Nets, y = act((xhat * gamma + beta) * (1 + scale) + shift) with float scale and shift per
// (n, c), taken as the two halves of one (N, 2C) embedding (scale_stride = shift_stride = 2C, as
// emb.chunk(2, dim=1) gives them); :adain is AdaIN's content side, y = xhat * scale + shift with
// the unbiased variance, no affine, scale = the style's std and shift = its mean, contiguous
// (N, C) floats. An :adain row times the content-side forward alone: the style statistics are
// computed once before the row (instnorm::statistics of a second random tensor, unbiased,
// eps 1e-5), as a style-transfer network computes them once per style. Their :bwd rows ask
// for dscale and dshift (n * c floats each) besides dx (and dgamma/dbeta where affine).
// --mod-standard runs the four modulated standard rows next to the same shapes without
// modulation, forward and :bwd, in 5 rounds of the whole list (--mod-rounds=K): the cost of the
// modulation is read as the median over rounds of modulated / plain time (bench/report.py --mod).
//
//   instnorm_bench                                 # the standard (forward) shapes
//   instnorm_bench --bwd-standard                  # the standard :bwd and :train rows instead
//   instnorm_bench --mod-standard [--mod-rounds=5]  # modulated rows and their plain shapes
//   instnorm_bench --shape=8x512x64x64:bf16        # any N x C x H x W[...][:fp32|fp16|bf16]
//                                                  #   [:gnG] GroupNorm + affine, [:silu]
//                                                  #   [:relu] [:affine] [:save] [:running]
//                                                  #   [:eval] [:cl] (channels-last, NHWC)
//                                                  #   [:ss] scale-shift, [:adain] AdaIN
//                                                  #   [:bwd] backward alone, [:train] fwd + bwd
//   instnorm_bench --arch=sm_89                    # force a row of the architecture table
//   instnorm_bench --tune=112x64x512x512           # sweep the planner's knobs for a shape
//                                                  #   (:cl shapes: the row's NHWC fields)
//   instnorm_bench --tune=A --tune=B --emit-row=my_gpu.h  # write the tuned row as a header
//   instnorm_bench --plan=2,512,0,0                # force strategy,threads,items,G (0: planner)
//   instnorm_bench --nhwc-budget=40 --nhwc-chunks=4  # NHWC tiled: MB per batch, row chunks
//   instnorm_bench --nhwc-on-chip=0|1 --nhwc-cols=8    # NHWC: tiled or on chip; slice width
//   instnorm_bench --nhwc-bwd-on-chip=1                # NHWC backward on chip (else tiled);
//                                                  #   --nhwc-cols and --plan's G force its
//                                                  #   slice width and G too
//   instnorm_bench --split-smem=0                  # split slices in registers only (1: table's)
//   instnorm_bench --sweep=64[:seed]               # 64 random shapes (sweep/ rows), a summary
//   instnorm_bench --sweep=64 --sweep-list         # print the sweep's shapes; no GPU needed
//   instnorm_bench --interleave=0                  # copies first, then the calls alone (A/B with
//                                                  # benches older than the interleaved floor)
//   (plus any --benchmark_* flag, e.g. --benchmark_out=bench.json --benchmark_format=json)
#include <benchmark/benchmark.h>
#include <instnorm/instnorm.cuh>
#include <instnorm/reference.h>

#include "../tests/device_tables.h"

#ifdef INSTNORM_BENCH_CUDNN
#include <cudnn.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

using namespace instnorm;

#define CHECK_CUDA(expr)                                                                 \
  do {                                                                                   \
    const cudaError_t e_ = (expr);                                                       \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(2);                                                                      \
    }                                                                                    \
  } while (0)

enum class DType { kF32, kF16, kBF16 };
/// What a row times: the forward, the backward of one untimed forward (:bwd), or both (:train).
enum class Mode { kFwd, kBwd, kTrain };
/// Per-sample modulation of a row: none, :ss (1 + scale, shift; halves of an (N, 2C) embedding)
/// or :adain (scale = style std, shift = style mean, contiguous (N, C); unbiased variance).
enum class Modulated { kNone, kScaleShift, kAdain };

struct Shape {
  std::string name;
  std::vector<int64_t> dims;  // N, C, spatial dims...
  DType dtype = DType::kF32;
  int64_t groups = 0;         // GroupNorm groups (with affine), 0 = instance norm
  bool silu = false;
  bool affine = false;   // per-channel gamma/beta (instance norm)
  bool save = false;     // saved mean/rstd
  bool relu = false;
  bool running = false;  // running statistics updated (training)
  bool eval = false;     // normalize with the running statistics (use_input_stats = false)
  bool nhwc = false;     // channels-last (:cl)
  Mode mode = Mode::kFwd;
  Modulated mod = Modulated::kNone;
  /// The round of a list run several times (--mod-standard: 1 .. rounds), 0 otherwise; not part
  /// of the name (every round's row is instnorm/<name>, with the counter `round`).
  int round = 0;
  bool plain() const {
    return groups == 0 && !silu && !affine && !save && !relu && !running && !eval && !nhwc &&
           mode == Mode::kFwd && mod == Modulated::kNone;
  }
  bool backward() const { return mode != Mode::kFwd; }
  /// Tensor volumes a run must move at least: x read and y written; :bwd x and dy read, dx
  /// written; :train both. The copy floor copies volumes / 2 times the bytes.
  int volumes() const { return mode == Mode::kBwd ? 3 : mode == Mode::kTrain ? 5 : 2; }
  int64_t n() const { return dims[0]; }
  int64_t c() const { return dims[1]; }
  int64_t spatial() const {
    int64_t s = 1;
    for (size_t i = 2; i < dims.size(); ++i) s *= dims[i];
    return s;
  }
  int64_t elems() const { return n() * c() * spatial(); }
  size_t elem_bytes() const { return dtype == DType::kF32 ? 4 : 2; }
  size_t bytes() const { return size_t(elems()) * elem_bytes(); }
};

bool parse_shape(const std::string& spec, Shape* out) {
  Shape s;
  s.name = spec;
  size_t pos = spec.find(':');
  std::string dims = spec.substr(0, pos);
  size_t start = 0;
  while (start <= dims.size()) {
    size_t x = dims.find('x', start);
    const std::string tok = dims.substr(start, x == std::string::npos ? std::string::npos : x - start);
    if (tok.empty()) return false;
    s.dims.push_back(std::atoll(tok.c_str()));
    if (x == std::string::npos) break;
    start = x + 1;
  }
  if (s.dims.size() < 3) return false;
  while (pos != std::string::npos) {
    const size_t next = spec.find(':', pos + 1);
    const std::string opt = spec.substr(pos + 1, next == std::string::npos ? std::string::npos : next - pos - 1);
    if (opt == "fp32") s.dtype = DType::kF32;
    else if (opt == "fp16") s.dtype = DType::kF16;
    else if (opt == "bf16") s.dtype = DType::kBF16;
    else if (opt == "silu") s.silu = true;
    else if (opt == "affine") s.affine = true;
    else if (opt == "save") s.save = true;
    else if (opt == "relu") s.relu = true;
    else if (opt == "running") s.running = true;
    else if (opt == "eval") s.eval = true;
    else if (opt == "cl") s.nhwc = true;
    else if (opt == "bwd") s.mode = Mode::kBwd;
    else if (opt == "train") s.mode = Mode::kTrain;
    else if (opt == "ss" && s.mod == Modulated::kNone) s.mod = Modulated::kScaleShift;
    else if (opt == "adain" && s.mod == Modulated::kNone) s.mod = Modulated::kAdain;
    else if (opt.rfind("gn", 0) == 0) s.groups = std::atoll(opt.c_str() + 2);
    else return false;
    pos = next;
  }
  *out = s;
  return true;
}

const std::vector<std::string> kStandard = {
    "112x64x512x512", "16x64x256x256",      "1x64x1024x1024",      "8x256x128x128",
    "4x512x64x64",    "32x256x32x32",       "128x512x7x7",         "112x64x512x512:fp16",
    "112x64x512x512:bf16", "8x512x64x64:bf16",
    "2x320x64x64:fp16:gn32:silu", "2x640x32x32:fp16:gn32:silu", "2x1280x16x16:fp16:gn32:silu",
    "8x512x64x64:bf16:gn32:silu", "1x128x20x256x256:bf16:gn32:silu",
    // Feature overhead (same run as the plain rows above) and running statistics.
    "112x64x512x512:affine:save:relu", "16x64x256x256:affine:save:relu",
    "8x256x128x128:affine:save:relu", "32x256x32x32:affine:save:relu",
    "16x64x256x256:running", "16x64x256x256:eval", "112x64x512x512:eval", "8x512x64x64:bf16:eval",
    // Channels-last, named as the peers script takes them.
    "112x64x512x512:cl", "16x64x256x256:cl", "8x256x128x128:cl", "32x256x32x32:cl",
    "128x512x7x7:cl", "112x64x512x512:bf16:cl", "8x512x64x64:bf16:cl"};

/// --bwd-standard: the backward alone, then forward + backward (named as the peers script takes
/// them; bench/device_bench.sh passes the same list to it).
const std::vector<std::string> kBwdStandard = {
    "16x64x128x128:affine:bwd", "112x64x512x512:bwd", "112x64x512x512:bf16:bwd",
    "16x64x256x256:bwd", "1x64x1024x1024:bwd", "8x256x128x128:bwd", "4x512x64x64:bwd",
    "32x256x32x32:bwd", "128x512x7x7:bwd", "8x128x64x64:bf16:cl:affine:bwd",
    "2x320x64x64:fp16:cl:gn32:silu:bwd", "1x256x256x256:fp16:gn32:silu:bwd",
    "4x64x256x256:affine:bwd",
    "16x64x128x128:affine:train", "4x64x256x256:affine:train",
    "2x320x64x64:fp16:cl:gn32:silu:train", "1x256x256x256:fp16:gn32:silu:train"};

/// --mod-standard: the four modulated standard rows, each after the same shape without
/// modulation (the cost of the modulation is their ratio), the forward and then the backward
/// (:bwd, with dscale/dshift on the modulated rows). main() registers the list kModRounds times
/// in a row (round 1: every row, round 2: every row, ...), so each pair is timed back to back
/// in every round; bench/device_bench.sh's MOD=1 passes the same shapes to peers_modulated.py.
const std::vector<std::string> kModStandard = {
    "2x320x64x64:fp16:gn32:silu:cl", "2x320x64x64:fp16:gn32:ss:silu:cl",
    "2x640x32x32:fp16:gn32:silu:cl", "2x640x32x32:fp16:gn32:ss:silu:cl",
    "8x512x64x64:bf16",              "8x512x64x64:bf16:adain",
    "4x256x128x128",                 "4x256x128x128:adain",
    "2x320x64x64:fp16:gn32:silu:cl:bwd", "2x320x64x64:fp16:gn32:ss:silu:cl:bwd",
    "2x640x32x32:fp16:gn32:silu:cl:bwd", "2x640x32x32:fp16:gn32:ss:silu:cl:bwd",
    "8x512x64x64:bf16:bwd",              "8x512x64x64:bf16:adain:bwd",
    "4x256x128x128:bwd",                 "4x256x128x128:adain:bwd"};
constexpr int kModRounds = 5;  // the cost's bar: median of five alternating runs

// ------------------------------------------------------------------ device state per shape

struct Buffers {
  Shape shape;
  void* x = nullptr;
  void* y = nullptr;
  float* gamma = nullptr;
  float* beta = nullptr;
  void* scratch = nullptr;  // naive baseline / cuDNN statistics
  float* mod = nullptr;      // :ss / :adain: 2 * n * c floats of scale and shift (mod_layout)
  // :bwd and :train rows only.
  void* dy = nullptr;
  void* dx = nullptr;
  float* dgamma = nullptr;
  float* dbeta = nullptr;
  float* dscale = nullptr;  // :ss / :adain, n * c floats each
  float* dshift = nullptr;
  void* workspace = nullptr;  // the backward's, backward_workspace_size bytes
  size_t workspace_bytes = 0;
};

void* g_flush = nullptr;
constexpr size_t kFlushBytes = size_t(256) << 20;
const ArchPolicy* g_policy = nullptr;
PlanOverride g_override;  // --plan=strategy,threads,items,blocks_per_plane (0 = planner's)
// --warm-code=1: after each flush, run the same call once untimed on a second buffer pair, so
// the timed call finds its code (not its data) in the caches: the difference to a plain run is
// what the instruction fetch after the flush costs.
bool g_warm_code = false;
// --interleave=0: a row's copies are timed first in their own loop, then the calls alone (flush,
// call, as the bench did before the floor moved into the loop): to compare kernels with a bench
// of that time under the same timing, not to report of_copy (the two no longer share drifts).
bool g_interleave = true;
double g_steady_GBps = 0;  // the run's steady copy rate (read + written), 0 until measured
Buffers g_cur;             // buffers of the shape being timed

void flush_l2() { CHECK_CUDA(cudaMemsetAsync(g_flush, 0, kFlushBytes)); }

template <class F>
cudaError_t with_type(DType t, F&& f) {
  switch (t) {
    case DType::kF32: return f(float{});
    case DType::kF16: return f(__half{});
    case DType::kBF16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Approximately normal values (sum of four uniforms from a hash, mean 0.5, std 2): generated on
// the GPU so that filling 7.5 GB takes milliseconds; never zeros.
template <class T>
__global__ void fill_kernel(T* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t h = (uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
    float acc = 0.f;
    for (int k = 0; k < 4; ++k) {
      h ^= h >> 31;
      h *= 0xBF58476D1CE4E5B9ull;
      h ^= h >> 29;
      acc += float(h >> 40) * (1.f / 16777216.f);
    }
    x[i] = detail::from_float<T>(0.5f + (acc - 2.f) * 2.f * 1.7320508f);
  }
}

void fill_random(void* dst, const Shape& s, uint64_t seed) {
  with_type(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    fill_kernel<T><<<1024, 256>>>(static_cast<T*>(dst), s.elems(), seed);
    return cudaGetLastError();
  });
  CHECK_CUDA(cudaDeviceSynchronize());
}

float* running_stats(const Shape& s);

/// Where a row's scale and shift live in its 2 * n * c floats of modulation (`base`, the device
/// buffer or its host copy): :ss the two halves of an (n, 2c) embedding, scale = columns 0 .. c
/// and shift = c .. 2c of each row (stride 2c); :adain two contiguous (n, c) blocks, scale (the
/// style's std) then shift (its mean), stride c.
struct ModLayout {
  const float* scale = nullptr;
  const float* shift = nullptr;
  int64_t stride = 0;  // elements between samples
};
ModLayout mod_layout(const Shape& s, const float* base) {
  if (base == nullptr) return {};  // not allocated: shapes only validated or planned
  if (s.mod == Modulated::kScaleShift) return {base, base + s.c(), 2 * s.c()};
  if (s.mod == Modulated::kAdain) return {base, base + s.n() * s.c(), s.c()};
  return {};
}

/// The modulation of `s` with scale and shift at `m` (rows m.stride apart): the convention and
/// the variance the row's kind takes. Leaves opt alone for a row without modulation.
void set_modulation(const Shape& s, const ModLayout& m, Options* opt) {
  if (s.mod == Modulated::kNone) return;
  opt->modulation.scale = m.scale;
  opt->modulation.shift = m.shift;
  opt->modulation.scale_stride = m.stride;
  opt->modulation.shift_stride = m.stride;
  opt->modulation.type = ParamType::kFloat;
  opt->modulation.one_plus_scale = s.mod == Modulated::kScaleShift;
  opt->unbiased = s.mod == Modulated::kAdain;  // AdaIN's calc_mean_std: unbiased var + eps
}

/// The modulation of a row: :ss scale and shift near 0 from a fixed pattern (1 + scale near 1,
/// as a diffusion model's embedding gives them); :adain the statistics of a style tensor (the
/// pattern of fill_random with another seed, written to y, which the rows overwrite), computed
/// by instnorm::statistics with the unbiased variance and eps 1e-5: std into scale, mean into
/// shift. Not timed: an AdaIN network computes them once per style, apart from the content's
/// normalize the row times.
void fill_modulation(const Shape& s) {
  const int64_t nc = s.n() * s.c();
  if (s.mod == Modulated::kScaleShift) {
    std::vector<float> emb(size_t(2 * nc));
    for (int64_t i = 0; i < s.n(); ++i)
      for (int64_t j = 0; j < 2 * s.c(); ++j)
        emb[size_t(i * 2 * s.c() + j)] = j < s.c() ? 0.05f * float((i * 7 + j) % 9 - 4)
                                                   : 0.1f * float((i * 3 + j) % 5 - 2);
    CHECK_CUDA(cudaMemcpy(g_cur.mod, emb.data(), emb.size() * 4, cudaMemcpyHostToDevice));
    return;
  }
  fill_random(g_cur.y, s, 5555);
  Options style;
  style.unbiased = true;
  style.eps = 1e-5f;
  if (s.nhwc) style.layout = Layout::kNHWC;
  const ModLayout m = mod_layout(s, g_cur.mod);
  CHECK_CUDA(with_type(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    return statistics(static_cast<const T*>(g_cur.y), const_cast<float*>(m.shift),
                      const_cast<float*>(m.scale), s.n(), s.c(), s.spatial(), style);
  }));
  CHECK_CUDA(cudaDeviceSynchronize());
}

void use_shape(const Shape& s) {
  if (g_cur.x != nullptr && g_cur.shape.name == s.name) return;
  cudaFree(g_cur.x);
  cudaFree(g_cur.y);
  cudaFree(g_cur.gamma);
  cudaFree(g_cur.beta);
  cudaFree(g_cur.scratch);
  cudaFree(g_cur.mod);
  cudaFree(g_cur.dy);
  cudaFree(g_cur.dx);
  cudaFree(g_cur.dgamma);
  cudaFree(g_cur.dbeta);
  cudaFree(g_cur.dscale);
  cudaFree(g_cur.dshift);
  cudaFree(g_cur.workspace);
  g_cur = Buffers{};
  g_cur.shape = s;
  CHECK_CUDA(cudaMalloc(&g_cur.x, s.bytes()));
  CHECK_CUDA(cudaMalloc(&g_cur.y, s.bytes()));
  CHECK_CUDA(cudaMalloc(&g_cur.gamma, size_t(s.c()) * 4));
  CHECK_CUDA(cudaMalloc(&g_cur.beta, size_t(s.c()) * 4));
  CHECK_CUDA(cudaMalloc(&g_cur.scratch, size_t(s.n() * s.c()) * 4 * 4 + 1024));
  fill_random(g_cur.x, s, 1234);
  if (s.backward()) {
    CHECK_CUDA(cudaMalloc(&g_cur.dy, s.bytes()));
    CHECK_CUDA(cudaMalloc(&g_cur.dx, s.bytes()));
    CHECK_CUDA(cudaMalloc(&g_cur.dgamma, size_t(s.c()) * 4));
    CHECK_CUDA(cudaMalloc(&g_cur.dbeta, size_t(s.c()) * 4));
    fill_random(g_cur.dy, s, 98765);
    if (s.mod != Modulated::kNone) {
      CHECK_CUDA(cudaMalloc(&g_cur.dscale, size_t(s.n() * s.c()) * 4));
      CHECK_CUDA(cudaMalloc(&g_cur.dshift, size_t(s.n() * s.c()) * 4));
    }
  }
  if (s.mod != Modulated::kNone) {
    CHECK_CUDA(cudaMalloc(&g_cur.mod, size_t(2 * s.n() * s.c()) * 4));
    fill_modulation(s);
  }
  std::vector<float> g(size_t(s.c())), b(size_t(s.c()));
  for (size_t i = 0; i < g.size(); ++i) {
    g[i] = 1.f + 0.01f * float(i % 7);
    b[i] = 0.1f * float(i % 5);
  }
  CHECK_CUDA(cudaMemcpy(g_cur.gamma, g.data(), g.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(g_cur.beta, b.data(), b.size() * 4, cudaMemcpyHostToDevice));
  std::vector<float> rs(size_t(2 * s.c()));
  for (int64_t i = 0; i < s.c(); ++i) {
    rs[size_t(i)] = 0.05f * float(i % 3);
    rs[size_t(s.c() + i)] = 1.f + 0.1f * float(i % 4);
  }
  CHECK_CUDA(cudaMemcpy(running_stats(s), rs.data(), rs.size() * 4, cudaMemcpyHostToDevice));
}

/// Running mean and variance of the :running and :eval rows live in the scratch buffer, after
/// two floats per plane for the saved statistics.
float* running_stats(const Shape& s) {
  return static_cast<float*>(g_cur.scratch) + 2 * s.n() * s.c();
}

Options options_for(const Shape& s) {
  Options opt;
  if (s.groups > 0) opt.groups = s.groups;
  if (s.groups > 0 || s.affine) {
    opt.gamma = g_cur.gamma;
    opt.beta = g_cur.beta;
  }
  if (s.silu) opt.activation = Activation::kSilu;
  if (s.relu) opt.activation = Activation::kRelu;
  if (s.save || s.backward()) {  // the backward reads the forward's saved statistics
    opt.save_mean = static_cast<float*>(g_cur.scratch);
    opt.save_rstd = opt.save_mean + s.n() * (s.groups ? s.groups : s.c());
  }
  if (s.running || s.eval) {
    opt.running_mean = running_stats(s);
    opt.running_var = opt.running_mean + s.c();
    opt.use_input_stats = !s.eval;
  }
  if (s.nhwc) opt.layout = Layout::kNHWC;
  set_modulation(s, mod_layout(s, g_cur.mod), &opt);
  return opt;
}

cudaError_t run_instnorm(const Shape& s, const PlanOverride& ov, Plan* plan,
                         NhwcPlan* nhwc_plan = nullptr) {
  return with_type(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    return detail::forward_tuned(static_cast<const T*>(g_cur.x), static_cast<T*>(g_cur.y), s.n(),
                                 s.c(), s.spatial(), options_for(s), ov, g_policy, nullptr, plan,
                                 nhwc_plan);
  });
}

/// dgamma/dbeta where the forward has parameters (affine, GroupNorm), dscale/dshift where it
/// is modulated (:ss, :adain), else dx alone.
Gradients grads_for(const Shape& s) {
  Gradients g;
  if (s.groups > 0 || s.affine) {
    g.dgamma = g_cur.dgamma;
    g.dbeta = g_cur.dbeta;
  }
  if (s.mod != Modulated::kNone) {
    g.dscale = g_cur.dscale;
    g.dshift = g_cur.dshift;
  }
  return g;
}

/// Bytes of workspace the backward of `s` needs: backward_workspace_size, and the workspace of
/// the plan --plan / --arch / --nhwc-bwd-on-chip force, where that is larger.
cudaError_t backward_workspace_bytes(const Shape& s, size_t* bytes) {
  return with_type(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(g_cur.x);
    const T* dy = static_cast<const T*>(g_cur.dy);
    const T* dx = static_cast<const T*>(g_cur.dx);
    const Options opt = options_for(s);
    const Gradients grads = grads_for(s);
    INSTNORM_RETURN_IF_ERROR(
        backward_workspace_size(s.n(), s.c(), s.spatial(), opt, grads, bytes, x, dy, dx));
    Problem prob;
    Plan plan;
    if (validate_backward(x, dy, dx, s.n(), s.c(), s.spatial(), int(sizeof(T)), opt, grads,
                          &prob) != Invalid::kOk)
      return cudaSuccess;
    if (prob.nhwc) {  // the on-chip backward, where --nhwc-bwd-on-chip=1 asks for it
      size_t b = 0;
      INSTNORM_RETURN_IF_ERROR(
          detail::nhwc_backward_workspace(prob, opt, grads, &b, g_override, g_policy));
      *bytes = std::max(*bytes, b);
    } else if (detail::current_backward_plan(prob, grads, &plan, g_override, g_policy) ==
               cudaSuccess) {
      *bytes = std::max(*bytes, detail::backward_workspace_layout(plan, prob, opt, grads).total);
    }
    return cudaSuccess;
  });
}

/// The backward of the forward run_instnorm ran, into dx (and dgamma/dbeta), with the
/// preallocated workspace: instnorm::backward, plus --plan / --arch / --nhwc-bwd-on-chip.
/// `nhwc_on_chip`: whether a channels-last backward ran on chip.
cudaError_t run_backward(const Shape& s, Plan* plan, bool* nhwc_on_chip = nullptr) {
  return with_type(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    return detail::backward_tuned(static_cast<const T*>(g_cur.x), static_cast<const T*>(g_cur.dy),
                                  static_cast<T*>(g_cur.dx), s.n(), s.c(), s.spatial(),
                                  options_for(s), grads_for(s), g_override, g_policy,
                                  g_cur.workspace, g_cur.workspace_bytes, false, nullptr, plan,
                                  nhwc_on_chip);
  });
}

// ------------------------------------------------------------------ naive baseline

// The algorithm of the Triton starting point: sum and sum of squares per plane (one block per
// plane), then a normalize kernel; reads x twice, fp32 E[x^2]-E[x]^2.
template <class T>
__global__ void naive_moments(const T* x, float* mean, float* var, int64_t len) {
  const T* p = x + blockIdx.x * len;
  float s = 0.f, s2 = 0.f;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    const float v = detail::to_float(p[i]);
    s += v;
    s2 += v * v;
  }
  __shared__ float sh[2][32];
  for (int o = 16; o > 0; o >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, o);
    s2 += __shfl_xor_sync(0xffffffffu, s2, o);
  }
  if ((threadIdx.x & 31) == 0) {
    sh[0][threadIdx.x >> 5] = s;
    sh[1][threadIdx.x >> 5] = s2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = 0.f, b = 0.f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) {
      a += sh[0][w];
      b += sh[1][w];
    }
    const float m = a / float(len);
    mean[blockIdx.x] = m;
    var[blockIdx.x] = fmaxf(b / float(len) - m * m, 0.f);
  }
}

template <class T>
__global__ void naive_normalize(const T* x, T* y, const float* mean, const float* var, int64_t len,
                                float eps) {
  const float m = mean[blockIdx.x], r = rsqrtf(var[blockIdx.x] + eps);
  const int64_t base = blockIdx.x * len;
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x)
    y[base + i] = detail::from_float<T>((detail::to_float(x[base + i]) - m) * r);
}

cudaError_t run_naive(const Shape& s) {
  return with_type(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t planes = s.n() * s.c(), len = s.spatial();
    float* mean = static_cast<float*>(g_cur.scratch);
    float* var = mean + planes;
    naive_moments<T><<<unsigned(planes), 256>>>(static_cast<const T*>(g_cur.x), mean, var, len);
    naive_normalize<T><<<unsigned(planes), 256>>>(static_cast<const T*>(g_cur.x),
                                                  static_cast<T*>(g_cur.y), mean, var, len, 1e-5f);
    return cudaGetLastError();
  });
}

// ------------------------------------------------------------------ cuDNN baseline

#ifdef INSTNORM_BENCH_CUDNN
cudnnHandle_t g_cudnn = nullptr;
cudaError_t run_cudnn(const Shape& s) {
  if (g_cudnn == nullptr && cudnnCreate(&g_cudnn) != CUDNN_STATUS_SUCCESS) return cudaErrorUnknown;
  const cudnnDataType_t dt = s.dtype == DType::kF32   ? CUDNN_DATA_FLOAT
                             : s.dtype == DType::kF16 ? CUDNN_DATA_HALF
                                                      : CUDNN_DATA_BFLOAT16;
  cudnnTensorDescriptor_t xd, pd;
  cudnnCreateTensorDescriptor(&xd);
  cudnnCreateTensorDescriptor(&pd);
  const int nc = int(s.n() * s.c());
  cudnnStatus_t st = cudnnSetTensor4dDescriptor(xd, CUDNN_TENSOR_NCHW, dt, 1, nc, 1, int(s.spatial()));
  if (st == CUDNN_STATUS_SUCCESS) st = cudnnDeriveBNTensorDescriptor(pd, xd, CUDNN_BATCHNORM_SPATIAL);
  float* scale = static_cast<float*>(g_cur.scratch);  // scale = 1, bias = 0 (set below)
  float* bias = scale + nc;
  float* save_mean = bias + nc;
  float* save_inv = save_mean + nc;
  const float one = 1.f, zero = 0.f;
  if (st == CUDNN_STATUS_SUCCESS)
    st = cudnnBatchNormalizationForwardTraining(g_cudnn, CUDNN_BATCHNORM_SPATIAL, &one, &zero, xd,
                                                g_cur.x, xd, g_cur.y, pd, scale, bias, 0.0,
                                                nullptr, nullptr, 1e-5, save_mean, save_inv);
  cudnnDestroyTensorDescriptor(xd);
  cudnnDestroyTensorDescriptor(pd);
  return st == CUDNN_STATUS_SUCCESS ? cudaSuccess : cudaErrorNotSupported;
}
#endif

// ------------------------------------------------------------------ timing

int iterations_for(const Shape& s) {
  return s.bytes() > (size_t(1) << 30) ? 15 : s.bytes() > (size_t(64) << 20) ? 100 : 200;
}

/// The floor of a row: a device-to-device copy moving its volumes (y from x for the forward; for
/// :bwd and :train 1.5x / 2.5x the tensor's bytes, between two buffers of that size held for the
/// row). It writes y, which the timed call then overwrites in the same round.
struct Floor {
  void* src = nullptr;
  void* dst = nullptr;
  size_t bytes = 0;
  bool owned = false;
  explicit Floor(const Shape& s)
      : src(g_cur.x), dst(g_cur.y), bytes(s.bytes() * size_t(s.volumes()) / 2), owned(s.backward()) {
    if (!owned) return;
    CHECK_CUDA(cudaMalloc(&src, bytes));
    CHECK_CUDA(cudaMalloc(&dst, bytes));
    CHECK_CUDA(cudaMemset(src, 0, bytes));
  }
  ~Floor() {
    if (!owned) return;
    cudaFree(src);
    cudaFree(dst);
  }
  Floor(const Floor&) = delete;
  Floor& operator=(const Floor&) = delete;
  cudaError_t operator()() const {
    return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice);
  }
};

using Call = std::function<cudaError_t()>;

/// GB/s of a copy of `bytes` in `ms`, counting the bytes read and the bytes written.
double copy_GBps(size_t bytes, double ms) { return 2.0 * double(bytes) / (ms * 1e6); }

/// Copies from this size on are long enough to run at the steady rate; shorter ones pay the
/// launch and the ramp (the re-measure does not apply to them).
constexpr size_t kSteadyMinBytes = size_t(64) << 20;
constexpr double kSteadyTolerance = 0.03;  // re-measure a row whose copy is this far off
constexpr int kMaxRemeasures = 2;

/// How far a copy of `bytes` that took `ms` is from the run's steady rate (0.05: 5% either way).
double off_steady(size_t bytes, double ms) {
  return std::fabs(copy_GBps(bytes, ms) / g_steady_GBps - 1.0);
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

/// Both events of a timed call, created once per measurement.
struct Events {
  cudaEvent_t a = nullptr, b = nullptr;
  Events() {
    CHECK_CUDA(cudaEventCreate(&a));
    CHECK_CUDA(cudaEventCreate(&b));
  }
  ~Events() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  /// Runs `op` between the events; its time in ms, or the error it returned.
  cudaError_t time(const Call& op, double* ms) {
    CHECK_CUDA(cudaEventRecord(a));
    const cudaError_t e = op();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0.f;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    *ms = t;
    return e;
  }
};

/// One measurement of a row: per round (in order) the copy's and the call's times, their medians.
struct Timing {
  std::vector<double> copy_ms, op_ms;
  double copy = 0, op = 0;
  int remeasured = 0;  // measurements taken after the first (copy off the steady rate)
};

/// `rounds` rounds of flush, copy, flush, [pre,] call: the copy and the call alternate in one
/// loop, each after the same flush, so a drift of the GPU (clocks, temperature) moves both.
/// With --interleave=0 (g_interleave) all copies first, then the calls alone.
cudaError_t measure(const Call& op, const Floor& floor, int rounds, const Call& pre, Timing* t) {
  Events ev;
  t->copy_ms.clear();
  t->op_ms.clear();
  const auto time_copy = [&] {
    double copy = 0;
    flush_l2();
    CHECK_CUDA(ev.time([&] { return floor(); }, &copy));
    t->copy_ms.push_back(copy);
  };
  if (!g_interleave)
    for (int i = 0; i < rounds; ++i) time_copy();
  for (int i = 0; i < rounds; ++i) {
    if (g_interleave) time_copy();
    double ms = 0;
    flush_l2();
    if (pre) CHECK_CUDA(pre());
    INSTNORM_RETURN_IF_ERROR(ev.time(op, &ms));
    t->op_ms.push_back(ms);
  }
  t->copy = median_of(t->copy_ms);
  t->op = median_of(t->op_ms);
  return cudaSuccess;
}

/// A row's timing: three untimed calls (code, plans, workspace pools warm), one measurement,
/// and where the copy is long enough and more than kSteadyTolerance off the steady rate, up to
/// kMaxRemeasures more, keeping the one whose copy is closest to steady (a copy slowed by
/// something else on the GPU flatters the row's of_copy).
cudaError_t time_row(const Call& op, const Floor& floor, int rounds, const Call& pre, Timing* best) {
  for (int i = 0; i < 3; ++i) {
    INSTNORM_RETURN_IF_ERROR(op());
    CHECK_CUDA(floor());
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  INSTNORM_RETURN_IF_ERROR(measure(op, floor, rounds, pre, best));
  if (g_steady_GBps <= 0 || floor.bytes < kSteadyMinBytes) return cudaSuccess;
  for (int k = 1; k <= kMaxRemeasures && off_steady(floor.bytes, best->copy) > kSteadyTolerance;
       ++k) {
    Timing t;
    INSTNORM_RETURN_IF_ERROR(measure(op, floor, rounds, pre, &t));
    if (off_steady(floor.bytes, t.copy) < off_steady(floor.bytes, best->copy)) *best = std::move(t);
    best->remeasured = k;
  }
  return cudaSuccess;
}

/// Google Benchmark's loop replays the kept measurement's call times, one per iteration (rows
/// run exactly `rounds` iterations), so real_time is that measurement's mean; the counters say
/// the rest: ms (median), GBps, copy_ms, copy_GBps, of_copy, copy_remeasured.
void report_timing(benchmark::State& state, const Shape& s, const Floor& floor, const Timing& t) {
  size_t i = 0;
  for (auto _ : state) state.SetIterationTime(t.op_ms[i++ % t.op_ms.size()] * 1e-3);
  state.counters["ms"] = t.op;
  state.counters["GBps"] = double(s.volumes()) * double(s.bytes()) / (t.op * 1e6);
  state.counters["copy_ms"] = t.copy;
  state.counters["copy_GBps"] = copy_GBps(floor.bytes, t.copy);
  state.counters["of_copy"] = t.copy / t.op;
  state.counters["copy_remeasured"] = t.remeasured;
}

/// Times `op` as a row (time_row) and reports it; on a failed call the row is skipped with
/// the error, which is returned.
cudaError_t time_and_report(benchmark::State& state, const Shape& s, const Call& op,
                            const Call& pre = nullptr) {
  const Floor floor(s);
  Timing t;
  const cudaError_t e = time_row(op, floor, int(state.max_iterations), pre, &t);
  if (e != cudaSuccess) {
    cudaGetLastError();
    CHECK_CUDA(cudaDeviceSynchronize());
    state.SkipWithError(cudaGetErrorString(e));
    return e;
  }
  report_timing(state, s, floor, t);
  return cudaSuccess;
}

/// The run's steady copy rate: a 1 GiB device-to-device copy after a flush, median of 9.
double measure_steady_copy() {
  constexpr size_t kBytes = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  CHECK_CUDA(cudaMalloc(&src, kBytes));
  CHECK_CUDA(cudaMalloc(&dst, kBytes));
  CHECK_CUDA(cudaMemset(src, 0, kBytes));
  const Call copy = [&] { return cudaMemcpyAsync(dst, src, kBytes, cudaMemcpyDeviceToDevice); };
  // Half a second of copies first, so that neither this probe nor the first rows meet a GPU
  // still raising its clocks from idle (the small rows at the head of --mod-standard varied
  // by up to 25% between runs of one binary).
  Events warm;
  for (double spent = 0; spent < 500.0;) {
    double t = 0;
    CHECK_CUDA(warm.time(copy, &t));
    spent += t;
  }
  Events ev;
  std::vector<double> ms;
  for (int i = 0; i < 9; ++i) {
    double t = 0;
    flush_l2();
    CHECK_CUDA(ev.time(copy, &t));
    ms.push_back(t);
  }
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));
  return copy_GBps(kBytes, median_of(ms));
}

/// Copies `count` elements of x and y from element `first` and returns the worst error of y
/// against the float64 reference of that slice (one image of `ref_c` channels under `opt`), in
/// units of the tolerance: above 1 is wrong.
double worst_error(const Shape& s, int64_t first, int64_t count, int64_t ref_c, const Options& opt) {
  const size_t off = size_t(first) * s.elem_bytes();
  std::vector<char> hx(static_cast<size_t>(count) * s.elem_bytes()), hy(hx.size());
  CHECK_CUDA(cudaMemcpy(hx.data(), static_cast<char*>(g_cur.x) + off, hx.size(), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(hy.data(), static_cast<char*>(g_cur.y) + off, hy.size(), cudaMemcpyDeviceToHost));
  std::vector<double> ref(static_cast<size_t>(count));
  double worst = 0;
  with_type(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xs = reinterpret_cast<const T*>(hx.data());
    const T* ys = reinterpret_cast<const T*>(hy.data());
    reference::forward(xs, ref.data(), 1, ref_c, s.spatial(), opt);
    for (int64_t k = 0; k < count; ++k) {
      const double err = std::fabs(reference::to_double(ys[k]) - ref[size_t(k)]);
      const double tol = sizeof(T) == 4 ? 1e-5 : 1.5e-2 * std::max(1.0, std::fabs(ref[size_t(k)]));
      worst = std::max(worst, std::isnan(err) ? 1e30 : err / tol);
    }
    return cudaSuccess;
  });
  return worst;
}

/// Host copies of the row's gamma, beta, running statistics and modulation, and the Options the
/// float64 reference takes for the whole tensor, for one image or for one NCHW plane (host
/// pointers into these).
struct HostParams {
  std::vector<float> gamma, beta, running;  // c, c, 2c (running mean, then variance)
  std::vector<float> mod;                   // 2 * n * c (mod_layout), modulated rows only
  explicit HostParams(const Shape& s)
      : gamma(size_t(s.c())), beta(size_t(s.c())), running(size_t(2 * s.c())) {
    CHECK_CUDA(cudaMemcpy(gamma.data(), g_cur.gamma, gamma.size() * 4, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(beta.data(), g_cur.beta, beta.size() * 4, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(running.data(), running_stats(s), running.size() * 4, cudaMemcpyDeviceToHost));
    if (s.mod != Modulated::kNone) {
      mod.resize(size_t(2 * s.n() * s.c()));
      CHECK_CUDA(cudaMemcpy(mod.data(), g_cur.mod, mod.size() * 4, cudaMemcpyDeviceToHost));
    }
  }
  /// The row's Options (n images, c channels) with host pointers and no saved statistics.
  Options whole(const Shape& s) const {
    Options opt = options_for(s);
    opt.save_mean = opt.save_rstd = nullptr;
    if (opt.gamma) {
      opt.gamma = gamma.data();
      opt.beta = beta.data();
    }
    if (opt.running_mean) {
      opt.running_mean = const_cast<float*>(running.data());
      opt.running_var = const_cast<float*>(running.data()) + s.c();
    }
    set_modulation(s, mod_layout(s, mod.data()), &opt);
    return opt;
  }
  /// Image i alone (n = 1, all c channels): whole() with the modulation of sample i.
  Options image(const Shape& s, int64_t i) const {
    Options opt = whole(s);
    set_modulation(s, sample(s, i, 0), &opt);
    return opt;
  }
  /// NCHW plane p alone, as one image: its group's cpg channels (GroupNorm, one group) or its
  /// channel (instance norm), with that channel's running statistics in eval mode and its
  /// sample's modulation of those channels.
  Options plane(const Shape& s, int64_t p) const {
    const int64_t groups = s.groups ? s.groups : s.c(), cpg = s.c() / groups;
    Options opt;
    opt.groups = s.groups ? 1 : 0;
    if (s.groups || s.affine) {
      opt.gamma = gamma.data() + (p % groups) * cpg;
      opt.beta = beta.data() + (p % groups) * cpg;
    }
    if (s.silu) opt.activation = Activation::kSilu;
    if (s.relu) opt.activation = Activation::kRelu;
    if (s.eval) {
      opt.running_mean = const_cast<float*>(running.data()) + p % s.c();
      opt.running_var = const_cast<float*>(running.data()) + s.c() + p % s.c();
      opt.use_input_stats = false;
    }
    set_modulation(s, sample(s, p / groups, (p % groups) * cpg), &opt);
    return opt;
  }
  /// The host modulation of sample i from channel ch on (one row: n = 1 in the reference).
  ModLayout sample(const Shape& s, int64_t i, int64_t ch) const {
    ModLayout m = mod_layout(s, mod.data());
    if (s.mod == Modulated::kNone) return m;
    m.scale += i * m.stride + ch;
    m.shift += i * m.stride + ch;
    return m;
  }
};

/// The first and the last of `count` images or planes, once where they are the same one (a
/// sweep's single 1 GiB image is checked once, not twice).
std::vector<int64_t> first_and_last(int64_t count) {
  return count > 1 ? std::vector<int64_t>{0, count - 1} : std::vector<int64_t>{0};
}

/// NHWC: the first and the last image against the float64 reference.
bool verify_nhwc(const Shape& s, std::string* why) {
  const int64_t img = s.spatial() * s.c();
  const HostParams h(s);
  for (int64_t i : first_and_last(s.n())) {
    const double worst = worst_error(s, i * img, img, s.c(), h.image(s, i));
    if (worst > 1.0) {
      *why = "image " + std::to_string(i) + " off by " + std::to_string(worst) + " x tolerance";
      return false;
    }
  }
  return true;
}

/// Checks a few planes of instnorm's output against the float64 reference (first and last).
bool verify(const Shape& s, std::string* why) {
  if (s.nhwc) return verify_nhwc(s, why);
  const int64_t groups = s.groups ? s.groups : s.c();
  const int64_t planes = s.n() * groups, len = s.elems() / planes;
  const int64_t cpg = s.c() / groups;
  const HostParams h(s);
  for (int64_t p : first_and_last(planes)) {
    const double worst = worst_error(s, p * len, len, s.groups ? cpg : 1, h.plane(s, p));
    if (worst > 1.0) {
      *why = "plane " + std::to_string(p) + " off by " + std::to_string(worst) + " x tolerance";
      return false;
    }
  }
  return true;
}

template <class T>
__global__ void count_nonfinite_kernel(const T* x, int64_t n, unsigned long long* count) {
  unsigned long long local = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    local += isfinite(detail::to_float(x[i])) ? 0 : 1;
  if (local) atomicAdd(count, local);
}

/// Elements of the tensor at `p` (the row's shape and type) that are NaN or infinite.
unsigned long long count_nonfinite(const Shape& s, const void* p) {
  unsigned long long* d = nullptr;
  unsigned long long h = 0;
  CHECK_CUDA(cudaMalloc(&d, sizeof(h)));
  CHECK_CUDA(cudaMemset(d, 0, sizeof(h)));
  with_type(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    count_nonfinite_kernel<T><<<1024, 256>>>(static_cast<const T*>(p), s.elems(), d);
    return cudaGetLastError();
  });
  CHECK_CUDA(cudaMemcpy(&h, d, sizeof(h), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(d));
  return h;
}

/// dx of the elements from `first` on (ref_n images of ref_c channels under `opt`: one NCHW
/// plane, one NHWC image or the whole tensor) against reference::backward; with `params` (the
/// slice is the whole tensor) dgamma and dbeta too, and dscale and dshift where the row asks
/// for them (grads_for). Returns the worst error in units of the tolerance (above 1 is wrong;
/// loose: 1e-3 fp32, 3e-2 fp16/bf16, relative above 1 in magnitude; dgamma/dbeta/dscale/dshift
/// 2e-3 of the larger of the value and the root of the elements summed) and in `what` the
/// quantity it was found in.
double backward_worst_error(const Shape& s, int64_t first, int64_t ref_n, int64_t ref_c,
                            const Options& opt, bool params, std::string* what) {
  const Gradients grads = grads_for(s);
  const bool mod_grads = params && grads.dscale != nullptr;
  const size_t nc = size_t(ref_n * ref_c);
  std::vector<double> rs(mod_grads ? nc : 0), rt(mod_grads ? nc : 0);
  const int64_t count = ref_n * ref_c * s.spatial();
  const size_t off = size_t(first) * s.elem_bytes(), nb = size_t(count) * s.elem_bytes();
  std::vector<char> hx(nb), hdy(nb), hdx(nb);
  CHECK_CUDA(cudaMemcpy(hx.data(), static_cast<char*>(g_cur.x) + off, nb, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(hdy.data(), static_cast<char*>(g_cur.dy) + off, nb, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(hdx.data(), static_cast<char*>(g_cur.dx) + off, nb, cudaMemcpyDeviceToHost));
  std::vector<double> ref(static_cast<size_t>(count)), rg(static_cast<size_t>(ref_c)),
      rb(static_cast<size_t>(ref_c));
  params = params && opt.gamma != nullptr;
  double worst = 0;
  const auto take = [&](double got, double want, double tol, const char* name) {
    const double err = std::fabs(got - want);
    const double e = std::isfinite(err) ? err / tol : 1e30;
    if (e > worst) {
      worst = e;
      *what = name;
    }
  };
  with_type(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xs = reinterpret_cast<const T*>(hx.data());
    const T* dys = reinterpret_cast<const T*>(hdy.data());
    const T* dxs = reinterpret_cast<const T*>(hdx.data());
    reference::backward(xs, dys, ref.data(), ref_n, ref_c, s.spatial(), opt,
                        params ? rg.data() : nullptr, params ? rb.data() : nullptr, nullptr,
                        mod_grads ? rs.data() : nullptr, mod_grads ? rt.data() : nullptr);
    const double tol = sizeof(T) == 4 ? 1e-3 : 3e-2;
    for (int64_t k = 0; k < count; ++k) {
      const double want = ref[size_t(k)];
      take(reference::to_double(dxs[k]), want, tol * std::max(1.0, std::fabs(want)), "dx");
    }
    return cudaSuccess;
  });
  if (params) {
    std::vector<float> dg(static_cast<size_t>(ref_c)), db(static_cast<size_t>(ref_c));
    CHECK_CUDA(cudaMemcpy(dg.data(), g_cur.dgamma, dg.size() * 4, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(db.data(), g_cur.dbeta, db.size() * 4, cudaMemcpyDeviceToHost));
    const double root = std::sqrt(double(ref_n * s.spatial()));
    for (size_t j = 0; j < dg.size(); ++j) {
      take(dg[j], rg[j], 2e-3 * std::max(root, std::fabs(rg[j])), "dgamma");
      take(db[j], rb[j], 2e-3 * std::max(root, std::fabs(rb[j])), "dbeta");
    }
  }
  if (mod_grads) {  // per (n, c): sums over the spatial positions of one channel of one sample
    std::vector<float> ds(nc), dt(nc);
    CHECK_CUDA(cudaMemcpy(ds.data(), grads.dscale, nc * 4, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(dt.data(), grads.dshift, nc * 4, cudaMemcpyDeviceToHost));
    const double root = std::sqrt(double(s.spatial()));
    for (size_t e = 0; e < nc; ++e) {
      take(ds[e], rs[e], 2e-3 * std::max(root, std::fabs(rs[e])), "dscale");
      take(dt[e], rt[e], 2e-3 * std::max(root, std::fabs(rt[e])), "dshift");
    }
  }
  return worst;
}

/// Tensors up to this many elements are checked whole (dx, dgamma, dbeta); larger ones on the
/// first and last plane (NCHW) or image (NHWC).
constexpr int64_t kWholeCheckElems = int64_t(1) << 24;

/// The backward's dx: every element finite, and against the float64 reference (see above).
bool verify_backward(const Shape& s, std::string* why) {
  const unsigned long long bad = count_nonfinite(s, g_cur.dx);
  if (bad > 0) {
    *why = std::to_string(bad) + " non-finite elements of dx";
    return false;
  }
  const HostParams h(s);
  std::string what;
  const auto check = [&](const std::string& where, double worst) {
    if (worst <= 1.0) return true;
    *why = where + ": " + what + " off by " + std::to_string(worst) + " x tolerance";
    return false;
  };
  if (s.elems() <= kWholeCheckElems)
    return check("whole tensor",
                 backward_worst_error(s, 0, s.n(), s.c(), h.whole(s), true, &what));
  if (s.nhwc) {
    const int64_t img = s.spatial() * s.c();
    for (int64_t i : first_and_last(s.n()))
      if (!check("image " + std::to_string(i),
                 backward_worst_error(s, i * img, 1, s.c(), h.image(s, i), false, &what)))
        return false;
    return true;
  }
  const int64_t groups = s.groups ? s.groups : s.c();
  const int64_t planes = s.n() * groups, len = s.elems() / planes;
  for (int64_t p : first_and_last(planes))
    if (!check("plane " + std::to_string(p),
               backward_worst_error(s, p * len, 1, s.groups ? s.c() / groups : 1, h.plane(s, p),
                                    false, &what)))
      return false;
  return true;
}

#ifdef INSTNORM_TRACE
/// --trace=1 (builds with INSTNORM_TRACE): one more call after an L2 flush, then per round the
/// blocks' phase boundaries (debug/trace.cuh) in us from the first block's entry:
/// min / median / max over the blocks that ran the round.
void print_trace(const std::function<cudaError_t()>& op, const std::string& name, int64_t G) {
  using namespace instnorm::detail;
  constexpr int kAll = kTraceBlocks * kTraceRounds * kTraceStamps;
  void* addr = nullptr;
  CHECK_CUDA(cudaGetSymbolAddress(&addr, g_trace));
  CHECK_CUDA(cudaMemset(addr, 0, kAll * sizeof(unsigned long long)));
  flush_l2();
  CHECK_CUDA(op());
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<unsigned long long> t(kAll);
  CHECK_CUDA(cudaMemcpy(t.data(), addr, t.size() * sizeof(t[0]), cudaMemcpyDeviceToHost));
  const auto at = [&](int b, int r, int k) { return t[(size_t(b) * kTraceRounds + r) * kTraceStamps + k]; };
  unsigned long long t0 = ~0ull;
  for (int b = 0; b < kTraceBlocks; ++b)
    if (at(b, 0, 0)) t0 = std::min(t0, at(b, 0, 0));
  if (t0 == ~0ull) {
    std::printf("trace %s: no stamps (not a traced kernel)\n", name.c_str());
    return;
  }
  std::printf("trace %s (us from the first block's entry; min/median/max over blocks)\n", name.c_str());
  std::printf("round blocks | start | loaded | reduced | exchanged | stored || skew | exchange"
              " (G = %lld: per group, last minus first block reduced, and first block done with"
              " the exchange minus last reduced; medians over groups)\n", (long long)G);
  for (int r = 0; r < kTraceRounds; ++r) {
    std::vector<double> v[kTraceStamps];
    for (int b = 0; b < kTraceBlocks; ++b) {
      if (!at(b, r, 1) || !at(b, r, 5)) continue;
      for (int k = 1; k < kTraceStamps; ++k) v[k].push_back((double(at(b, r, k)) - double(t0)) * 1e-3);
    }
    if (v[1].empty()) continue;
    std::printf("%5d %6zu", r, v[1].size());
    for (int k = 1; k < kTraceStamps; ++k) {
      std::sort(v[k].begin(), v[k].end());
      std::printf(" | %6.1f %6.1f %6.1f", v[k].front(), v[k][v[k].size() / 2], v[k].back());
    }
    // Groups of G consecutive blocks: how far apart their blocks arrive, and how long the
    // exchange takes once the last one has.
    std::vector<double> skew, wait;
    for (int64_t g0 = 0; G > 1 && g0 + G <= kTraceBlocks; g0 += G) {
      double rmin = 1e300, rmax = -1e300, xmin = 1e300;
      bool ok = true;
      for (int64_t b = g0; b < g0 + G; ++b) {
        if (!at(int(b), r, 3) || !at(int(b), r, 4)) { ok = false; break; }
        const double rd = (double(at(int(b), r, 3)) - double(t0)) * 1e-3;
        const double xd = (double(at(int(b), r, 4)) - double(t0)) * 1e-3;
        rmin = std::min(rmin, rd);
        rmax = std::max(rmax, rd);
        xmin = std::min(xmin, xd);
      }
      if (!ok) continue;
      skew.push_back(rmax - rmin);
      wait.push_back(xmin - rmax);
    }
    if (!skew.empty()) {
      std::sort(skew.begin(), skew.end());
      std::sort(wait.begin(), wait.end());
      std::printf(" || %5.1f | %5.1f", skew[skew.size() / 2], wait[wait.size() / 2]);
    }
    std::printf("\n");
  }
}
#endif
bool g_trace_on = false;

void plan_counters(benchmark::State& state, const Plan& plan) {
  state.counters["strategy"] = double(int(plan.strategy));
  state.counters["threads"] = plan.threads;
  state.counters["items"] = plan.items;
  state.counters["vec"] = plan.vec;
  state.counters["ragged"] = plan.ragged ? 1 : 0;
  state.counters["blocks_per_plane"] = double(plan.blocks_per_plane);
}

/// NCHW: "strategy threads x items vector G (staged: u planes per unit) policy"; NHWC on chip: "nhwc cols x rows/thread
/// (+ shared) G"; NHWC tiled: "nhwc-tiled batch".
std::string plan_label(const Shape& s, const Plan& plan, const NhwcPlan& nplan) {
  if (s.nhwc && nplan.staged) return "nhwc-staged k" + std::to_string(nplan.unit_images) + " l" + std::to_string(nplan.lanes);
  if (s.nhwc && nplan.cols_per_block > 0)  // NHWC with one channel or position runs as NCHW
    return nplan.on_chip ? "nhwc " + std::to_string(nplan.cols_per_block) + "c x" +
                               std::to_string(nplan.items) + "+" +
                               std::to_string(nplan.smem_items) + " G" +
                               std::to_string(nplan.blocks_per_unit)
                         : "nhwc-tiled b" + std::to_string(nplan.batch_images);
  return std::string(to_string(plan.strategy)) + (plan.ragged ? "+ragged " : " ") +
         std::to_string(plan.threads) + "x" +
         std::to_string(plan.items) + " v" + std::to_string(plan.vec) + " G" +
         std::to_string(plan.blocks_per_plane) +
         (plan.strategy == Strategy::kStaged ? " u" + std::to_string(plan.unit_planes) : "") +
         " " + (g_policy ? g_policy->name : "auto");
}

/// A sweep shape and its result for the summary (of_copy < 0: not timed, `error` says why).
struct SweepRow {
  Shape shape;
  double of_copy = -1, copy_GBps = 0;
  int remeasured = 0;
  std::string label, error;
};
std::vector<SweepRow> g_sweep;  // --sweep's shapes, in the order drawn

/// --warm-code=1: the same call on a second buffer pair, run between the flush and the timed
/// call (see g_warm_code). The pair lives as long as the object.
struct WarmCode {
  void* x2 = nullptr;
  void* y2 = nullptr;
  explicit WarmCode(const Shape& s) {
    CHECK_CUDA(cudaMalloc(&x2, s.bytes()));
    CHECK_CUDA(cudaMalloc(&y2, s.bytes()));
    fill_random(x2, s, 4321);
  }
  ~WarmCode() {
    cudaFree(x2);
    cudaFree(y2);
  }
  Call pre(const Call& op) {
    return [this, op] {
      std::swap(g_cur.x, x2);
      std::swap(g_cur.y, y2);
      const cudaError_t e = op();
      std::swap(g_cur.x, x2);
      std::swap(g_cur.y, y2);
      return e;
    };
  }
};

/// Forward rows (instnorm/ and sweep/): the call timed against its floor, then y of the last
/// call checked against the float64 reference; `out` (sweep rows) receives the result.
void time_forward(benchmark::State& state, const Shape& s, SweepRow* out) {
  use_shape(s);
  Plan plan;
  NhwcPlan nplan;
  const Call op = [&] { return run_instnorm(s, g_override, &plan, &nplan); };
  cudaError_t e;
  if (g_warm_code) {
    WarmCode warm(s);
    e = time_and_report(state, s, op, warm.pre(op));
  } else {
    e = time_and_report(state, s, op);
  }
  if (e != cudaSuccess) {
    if (out) out->error = cudaGetErrorString(e);
    return;
  }
  CHECK_CUDA(cudaDeviceSynchronize());
#ifdef INSTNORM_TRACE
  if (g_trace_on) print_trace(op, s.name, s.nhwc ? nplan.blocks_per_unit : plan.blocks_per_plane);
#endif
  std::string why;
  if (!verify(s, &why)) state.SkipWithError(("wrong result: " + why).c_str());
  if (s.round > 0) state.counters["round"] = s.round;
  plan_counters(state, plan);
  state.SetLabel(plan_label(s, plan, nplan));
  if (!out) return;
  out->label = plan_label(s, plan, nplan);
  if (!why.empty()) {
    out->error = "wrong result: " + why;
    return;
  }
  out->of_copy = state.counters["of_copy"];
  out->copy_GBps = state.counters["copy_GBps"];
  out->remeasured = int(state.counters["copy_remeasured"]);
}

void bm_instnorm(benchmark::State& state, Shape s) { time_forward(state, s, nullptr); }

void bm_sweep(benchmark::State& state, size_t i) {
  time_forward(state, g_sweep[i].shape, &g_sweep[i]);
}

/// :bwd and :train rows. The forward runs once untimed (writing the saved statistics the
/// backward reads, and y); then each timed run is the backward alone (:bwd) or forward +
/// backward (:train), timed as the forward rows are (time_and_report). The counters and label are
/// the backward's NCHW plan ("nhwc" for the channels-last tiled chain, "nhwc-on-chip" for the
/// on-chip kernel, which --nhwc-bwd-on-chip=1 asks for).
void bm_backward(benchmark::State& state, Shape s) {
  use_shape(s);
  Plan fplan, bplan;
  NhwcPlan nplan;
  const auto fwd = [&] { return run_instnorm(s, g_override, &fplan, &nplan); };
  bool chip = false;
  const auto bwd = [&] { return run_backward(s, &bplan, &chip); };
  cudaError_t e = fwd();
  size_t ws = 0;
  if (e == cudaSuccess) e = backward_workspace_bytes(s, &ws);
  if (e != cudaSuccess) {
    cudaGetLastError();
    state.SkipWithError(cudaGetErrorString(e));
    return;
  }
  if (ws > g_cur.workspace_bytes) {
    CHECK_CUDA(cudaFree(g_cur.workspace));
    CHECK_CUDA(cudaMalloc(&g_cur.workspace, ws));
    g_cur.workspace_bytes = ws;
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  const Call train = [&] {
    const cudaError_t fe = fwd();
    return fe != cudaSuccess ? fe : bwd();
  };
  // A failed call skipped the row: dx was never written.
  if (time_and_report(state, s, s.mode == Mode::kTrain ? train : Call(bwd)) != cudaSuccess) return;
  CHECK_CUDA(cudaDeviceSynchronize());
  // A list run in rounds checks the backward in its first round only (the whole-tensor float64
  // reference takes seconds; reruns are bit-identical).
  std::string why;
  if (s.round <= 1 && !verify_backward(s, &why)) {
    std::fprintf(stderr, "warning: %s: wrong backward: %s\n", s.name.c_str(), why.c_str());
    state.SkipWithError(("wrong result: " + why).c_str());
  }
  state.counters["workspace_bytes"] = double(g_cur.workspace_bytes);
  if (s.round > 0) state.counters["round"] = s.round;
  if (s.nhwc) {
    const std::string b = chip ? "bwd nhwc-on-chip" : "bwd nhwc";
    state.SetLabel(s.mode == Mode::kTrain ? "fwd " + plan_label(s, fplan, nplan) + " + " + b : b);
    return;
  }
  plan_counters(state, bplan);
  state.SetLabel(s.mode == Mode::kTrain
                     ? "fwd " + plan_label(s, fplan, nplan) + " + bwd " + plan_label(s, bplan, nplan)
                     : "bwd " + plan_label(s, bplan, nplan));
}

void bm_naive(benchmark::State& state, Shape s) {
  use_shape(s);
  time_and_report(state, s, [&] { return run_naive(s); });
}

#ifdef INSTNORM_BENCH_CUDNN
void bm_cudnn(benchmark::State& state, Shape s) {
  use_shape(s);
  std::vector<float> ones(size_t(s.n() * s.c()), 1.f), zeros(ones.size(), 0.f);
  CHECK_CUDA(cudaMemcpy(g_cur.scratch, ones.data(), ones.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(static_cast<float*>(g_cur.scratch) + ones.size(), zeros.data(),
                        zeros.size() * 4, cudaMemcpyHostToDevice));
  time_and_report(state, s, [&] { return run_cudnn(s); });
}
#endif

void register_shape(const Shape& s) {
  const int it = iterations_for(s);
  if (s.backward()) {
    benchmark::RegisterBenchmark(("instnorm/" + s.name).c_str(), bm_backward, s)->UseManualTime()->Iterations(it);
    return;
  }
  benchmark::RegisterBenchmark(("instnorm/" + s.name).c_str(), bm_instnorm, s)->UseManualTime()->Iterations(it);
  if (s.plain() && s.round == 0) {  // the baselines: not in the rounds of --mod-standard
    benchmark::RegisterBenchmark(("naive/" + s.name).c_str(), bm_naive, s)->UseManualTime()->Iterations(it);
#ifdef INSTNORM_BENCH_CUDNN
    benchmark::RegisterBenchmark(("cudnn/" + s.name).c_str(), bm_cudnn, s)->UseManualTime()->Iterations(it);
#endif
  }
}

// ------------------------------------------------------------------ sweep (--sweep=K[:seed])

/// The default seed of --sweep=K (the sweep BENCHMARKS.md records). The sweep's acceptance bar
/// holds for any seed, not only this one: pass another as --sweep=K:seed.
constexpr uint64_t kSweepSeed = 19;

/// Uniform in [0, 1) from the top 53 bits of one std::mt19937_64 draw. The distributions are
/// written out by hand because std::uniform_*_distribution differ between standard libraries,
/// while mt19937_64's sequence is fixed by the standard: a seed names the same shapes with any
/// compiler (std::exp / std::log, correctly rounded in all but rare ties, feed floors below).
double unit(std::mt19937_64& g) { return double(g() >> 11) * 0x1p-53; }

/// Log-uniform integer in [lo, hi]: floor(exp(u)), u uniform in [ln lo, ln(hi + 1)), so k comes
/// with probability ln((k + 1) / k) / ln((hi + 1) / lo).
int64_t log_uniform(std::mt19937_64& g, int64_t lo, int64_t hi) {
  const double a = std::log(double(lo)), b = std::log(double(hi) + 1.0);
  const auto k = int64_t(std::floor(std::exp(a + (b - a) * unit(g))));
  return std::min(hi, std::max(lo, k));
}

/// "NxCxHxW" for a plane of s elements: H the largest divisor of s up to sqrt(s) (1 for a prime),
/// so shapes read as images; the library sees only H*W.
std::string dims_string(int64_t n, int64_t c, int64_t s) {
  int64_t h = 1;
  for (int64_t d = 1; d * d <= s; ++d)
    if (s % d == 0) h = d;
  return std::to_string(n) + "x" + std::to_string(c) + "x" + std::to_string(h) + "x" +
         std::to_string(s / h);
}

/// One random shape of the sweep. The distribution; every draw below is
/// taken for every shape, in this order, from one std::mt19937_64 seeded with the seed:
///   type    fp32, fp16 or bf16, 1/3 each;
///   layout  channels-last (:cl) with probability 1/3, else NCHW;
///   norm    GroupNorm(32) with affine (:gn32) with probability 1/4, with SiLU (:silu) in half
///           of those; else plain instance norm;
///   total   B bytes log-uniform in 4 MiB .. 1 GiB: E = B / element size elements;
///   C       log-uniform in 1 .. 2048; GroupNorm: 32 x log-uniform in 1 .. 64 (32 .. 2048);
///   S       the plane length (H*W), log-uniform in 1 .. 4Mi, clamped to E / C (one image fits);
///   N       floor(E / (C S)), at least 1, so the total is in (B / 2, B].
/// A shape whose total lands below 4 MiB is drawn again (with the next numbers).
Shape sweep_shape(std::mt19937_64& g) {
  constexpr int64_t kMinBytes = int64_t(4) << 20, kMaxBytes = int64_t(1) << 30;
  for (;;) {
    const int type = std::min(2, int(unit(g) * 3));
    const bool cl = unit(g) < 1.0 / 3;
    const bool gn = unit(g) < 0.25;
    const bool silu = unit(g) < 0.5;
    const int64_t bytes = log_uniform(g, kMinBytes, kMaxBytes);
    const int64_t c = gn ? 32 * log_uniform(g, 1, 64) : log_uniform(g, 1, 2048);
    const int64_t s_drawn = log_uniform(g, 1, int64_t(4) << 20);
    const int64_t elem = type == 0 ? 4 : 2, elems = bytes / elem;
    const int64_t s = std::min(s_drawn, elems / c);
    const int64_t n = std::max<int64_t>(1, elems / (c * s));
    if (n * c * s * elem < kMinBytes) continue;
    std::string spec = dims_string(n, c, s) + (type == 1 ? ":fp16" : type == 2 ? ":bf16" : "");
    if (cl) spec += ":cl";
    if (gn) spec += silu ? ":gn32:silu" : ":gn32";
    Shape shape;
    parse_shape(spec, &shape);
    return shape;
  }
}

/// Why the library refuses `s` (instnorm::validate on stand-in pointers, no CUDA call), or null
/// where it takes it.
const char* refusal(const Shape& s) {
  Invalid v = Invalid::kOk;
  with_type(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    // Two 16-byte aligned addresses 1 TiB apart: never overlapping, never dereferenced.
    const auto* x = reinterpret_cast<const T*>(uintptr_t(1) << 40);
    const auto* y = reinterpret_cast<const T*>(uintptr_t(2) << 40);
    v = validate<T>(x, y, s.n(), s.c(), s.spatial(), options_for(s));
    return cudaSuccess;
  });
  return v == Invalid::kOk ? nullptr : to_string(v);
}

/// K distinct shapes from `seed`, as rows of the summary. One the library refuses keeps its
/// reason in `error` and is not timed (none should be: the distribution keeps to what validate
/// accepts).
std::vector<SweepRow> sweep_rows(int k, uint64_t seed) {
  std::mt19937_64 g(seed);
  std::vector<SweepRow> out;
  std::set<std::string> seen;
  while (int(out.size()) < k) {
    SweepRow r{sweep_shape(g)};
    if (!seen.insert(r.shape.name).second) continue;
    if (const char* why = refusal(r.shape)) r.error = std::string("the library refuses it: ") + why;
    out.push_back(r);
  }
  return out;
}

/// An H200's properties (tests/device_tables.h): the plans --sweep-list shows without a GPU.
/// The device's own properties decide on a real run.
DeviceProps h200_props() { return instnorm_tables::h200(); }

/// The plan `s` would get on an H200 (h200_props), as the rows label it.
std::string planned_label(const Shape& s) {
  Problem prob;
  const bool ok = with_type(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* x = reinterpret_cast<const T*>(uintptr_t(1) << 40);
    const auto* y = reinterpret_cast<const T*>(uintptr_t(2) << 40);
    return detail::prepare(x, y, s.n(), s.c(), s.spatial(), options_for(s), &prob) == Invalid::kOk
               ? cudaSuccess
               : cudaErrorInvalidValue;
  }) == cudaSuccess;
  if (!ok) return "refused";
  const DeviceProps d = h200_props();
  Plan plan;
  NhwcPlan nplan;
  const bool planned = prob.nhwc ? make_nhwc_plan(prob, d, &nplan, g_override, g_policy)
                              : make_plan(prob, d, g_policy ? *g_policy : policy_for(d), &plan,
                                          g_override);
  return planned ? plan_label(s, plan, nplan) : "no plan (cudaErrorInvalidConfiguration)";
}

double mib(const Shape& s) { return double(s.bytes()) / double(1 << 20); }

/// --sweep-list: the shapes, their sizes and H200 plans, and how the draws came out.
void print_sweep_list(const std::vector<SweepRow>& rows, uint64_t seed) {
  std::printf("sweep of %zu shapes, seed %llu (no GPU used; plans as an H200 would take them)\n",
              rows.size(), (unsigned long long)seed);
  int types[3] = {}, cl = 0, gn = 0, silu = 0, big = 0;
  std::vector<double> sizes;
  for (size_t i = 0; i < rows.size(); ++i) {
    const Shape& s = rows[i].shape;
    std::printf("%3zu  %-36s %9.1f MiB  S %8lld  %s\n", i, s.name.c_str(), mib(s),
                (long long)s.spatial(),
                rows[i].error.empty() ? planned_label(s).c_str() : rows[i].error.c_str());
    ++types[int(s.dtype)];
    cl += s.nhwc;
    gn += s.groups > 0;
    silu += s.silu;
    big += s.bytes() >= kSteadyMinBytes;
    sizes.push_back(mib(s));
  }
  if (rows.empty()) return;
  std::sort(sizes.begin(), sizes.end());
  std::printf("fp32 %d, fp16 %d, bf16 %d; channels-last %d; GroupNorm %d (SiLU %d); >= 64 MiB %d;"
              " MiB min %.1f median %.1f max %.1f\n",
              types[0], types[1], types[2], cl, gn, silu, big, sizes.front(),
              sizes[sizes.size() / 2], sizes.back());
}

/// The sweep's summary after the run: min / median / max of of_copy over the timed shapes,
/// the minimum over shapes of 64 MiB or more (the sweep's acceptance bar), then every shape from the
/// lowest fraction up, and the ones that were not timed with the reason.
void print_sweep_summary(std::FILE* f, uint64_t seed) {
  std::vector<const SweepRow*> ok, failed;
  for (const SweepRow& r : g_sweep) (r.of_copy > 0 ? ok : failed).push_back(&r);
  std::sort(ok.begin(), ok.end(),
            [](const SweepRow* a, const SweepRow* b) { return a->of_copy < b->of_copy; });
  std::fprintf(f, "\nsweep of %zu shapes, seed %llu: %zu timed, %zu not\n", g_sweep.size(),
               (unsigned long long)seed, ok.size(), failed.size());
  if (!ok.empty()) {
    // ok is sorted: the first shape of >= 64 MiB has their lowest fraction.
    int big = 0;
    char big_min[32] = "n/a";
    for (const SweepRow* r : ok)
      if (r->shape.bytes() >= kSteadyMinBytes && big++ == 0)
        std::snprintf(big_min, sizeof big_min, "%.3f", r->of_copy);
    const double median = (ok[(ok.size() - 1) / 2]->of_copy + ok[ok.size() / 2]->of_copy) / 2;
    std::fprintf(f, "of copy: min %.3f  median %.3f  max %.3f;  min over the %d shapes of >= 64 MiB:"
                 " %s\n", ok.front()->of_copy, median, ok.back()->of_copy, big, big_min);
  }
  for (const SweepRow* r : ok)
    std::fprintf(f, "  %.3f  %-36s %9.1f MiB  copy %5.0f GB/s%s  %s\n", r->of_copy,
                 r->shape.name.c_str(), mib(r->shape), r->copy_GBps,
                 r->remeasured ? " (re-measured)" : "", r->label.c_str());
  for (const SweepRow* r : failed)
    std::fprintf(f, "  not timed  %-36s %9.1f MiB  %s\n", r->shape.name.c_str(), mib(r->shape),
                 r->error.empty() ? "not run (filtered out?)" : r->error.c_str());
}

/// The sweep's rows (sweep/<shape>) for the shapes the library takes; g_sweep keeps them all.
void register_sweep(std::vector<SweepRow> rows) {
  g_sweep = std::move(rows);
  for (size_t i = 0; i < g_sweep.size(); ++i) {
    if (!g_sweep[i].error.empty()) {
      std::fprintf(stderr, "sweep: %s not timed: %s\n", g_sweep[i].shape.name.c_str(),
                   g_sweep[i].error.c_str());
      continue;
    }
    benchmark::RegisterBenchmark(("sweep/" + g_sweep[i].shape.name).c_str(), bm_sweep, i)
        ->UseManualTime()
        ->Iterations(iterations_for(g_sweep[i].shape));
  }
}

// ------------------------------------------------------------------ tuning mode

double time_median(const std::function<cudaError_t()>& op, int reps) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<double> ms;
  if (op() != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  for (int i = 0; i < reps; ++i) {
    flush_l2();
    CHECK_CUDA(cudaEventRecord(a));
    if (op() != cudaSuccess) {
      cudaGetLastError();
      return -1;
    }
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

/// A table row as the C++ expression that builds it (every field, named), for the tuning
/// mode's output and --emit-row's header.
void print_row(std::FILE* f, const ArchPolicy& r) {
  std::fprintf(f, "[] {\n  ArchPolicy p;\n");
  std::fprintf(f, "  p.name = \"%s\";\n  p.cc = %d;\n  p.min_bus_bits = %d;\n", r.name, r.cc,
               r.min_bus_bits);
  std::fprintf(f, "  p.subwarp_threads = %d;\n  p.subwarp_items = %d;\n", r.subwarp_threads,
               r.subwarp_items);
  std::fprintf(f, "  p.block_items = %d;\n  p.min_block_threads = %d;\n", r.block_items,
               r.min_block_threads);
  std::fprintf(f, "  p.split_threads = %d;\n  p.split_smem = %s;\n  p.phases = %d;\n",
               r.split_threads, r.split_smem ? "true" : "false", r.phases);
  std::fprintf(f, "  p.nhwc_min_slice_bytes = %lld;\n  p.nhwc_min_chunks = %d;\n",
               (long long)r.nhwc_min_slice_bytes, r.nhwc_min_chunks);
  std::fprintf(f, "  p.nhwc_l2_percent = %d;\n  p.nhwc_vector_phase_shift = %s;\n",
               r.nhwc_l2_percent, r.nhwc_vector_phase_shift ? "true" : "false");
  std::fprintf(f, "  p.source = \"%s\";\n  return p;\n}()", r.source);
}

/// The row the tuning mode builds: the device's (or --arch's) row with the fields each --tune
/// shape's best plan decides.
ArchPolicy g_tuned_row;
bool g_tuned_row_set = false;
std::string g_tuned_source;

/// The row being tuned: the device's (or --arch's) row until a --tune shape changes a field.
ArchPolicy& tuned_row() {
  if (!g_tuned_row_set) {
    int dev = 0;
    DeviceProps d;
    CHECK_CUDA(cudaGetDevice(&dev));
    CHECK_CUDA(device_props(dev, &d));
    g_tuned_row = g_policy ? *g_policy : policy_for(d);
    g_tuned_row_set = true;
  }
  return g_tuned_row;
}

/// Adds a tuned shape's result to the row's `source` and prints the row as it stands.
void note_tuned(const Shape& s, const char* plan, double ms, double copy) {
  char line[256];
  std::snprintf(line, sizeof line, "%stune %s: %s %.4f ms, %.3f of copy",
                g_tuned_source.empty() ? "" : "; ", s.name.c_str(), plan, ms, copy / ms);
  g_tuned_source += line;
  std::printf("table entry (tune %s: %.4f ms, %.3f of copy):\n", s.name.c_str(), ms, copy / ms);
  std::printf("constexpr ArchPolicy kPolicy = ");
  print_row(stdout, g_tuned_row);
  std::printf(";\n");
}

/// Channels-last shapes tune the row's NHWC fields, one after the other from the row as it
/// stands (a coordinate search): each value is timed as the planner then plans the shape, and
/// replaces the row's where it is at least 1% faster. A field the shape's plan does not read
/// (the tiled plan's on an on-chip shape) times the same for every value and stays.
int tune_nhwc(const Shape& s) {
  use_shape(s);
  const int reps = std::max(5, iterations_for(s) / 3);
  const double copy = time_median([&] { return cudaMemcpyAsync(g_cur.y, g_cur.x, s.bytes(), cudaMemcpyDeviceToDevice); }, reps);
  ArchPolicy& pol = tuned_row();
  const ArchPolicy* forced = g_policy;
  NhwcPlan np;
  const auto time_row = [&](const ArchPolicy& row) {
    g_policy = &row;
    const double ms = time_median([&] { return run_instnorm(s, PlanOverride{}, nullptr, &np); }, reps);
    g_policy = forced;
    return ms;
  };
  struct Knob {
    const char* name;
    std::vector<int64_t> values;
    int64_t (*get)(const ArchPolicy&);
    void (*set)(ArchPolicy&, int64_t);
  };
  const Knob knobs[] = {
      {"nhwc_min_slice_bytes", {32, 64, 128, 256, 512},
       [](const ArchPolicy& r) { return r.nhwc_min_slice_bytes; },
       [](ArchPolicy& r, int64_t v) { r.nhwc_min_slice_bytes = v; }},
      {"nhwc_min_chunks", {1, 2, 4, 8, 16},
       [](const ArchPolicy& r) { return int64_t(r.nhwc_min_chunks); },
       [](ArchPolicy& r, int64_t v) { r.nhwc_min_chunks = int(v); }},
      {"nhwc_l2_percent", {25, 40, 60, 80, 100},
       [](const ArchPolicy& r) { return int64_t(r.nhwc_l2_percent); },
       [](ArchPolicy& r, int64_t v) { r.nhwc_l2_percent = int(v); }},
  };
  std::printf("tune %s  policy %s  copy %.4f ms\n", s.name.c_str(), pol.name, copy);
  double best = 0;
  for (const Knob& k : knobs) {
    best = time_row(pol);
    int64_t best_v = k.get(pol);
    for (int64_t v : k.values) {
      if (v == k.get(pol)) continue;
      ArchPolicy r = pol;
      k.set(r, v);
      const double ms = time_row(r);
      std::printf("  %-22s %4lld: %.4f ms  %.3f of copy  (%s, G %lld)\n", k.name, (long long)v,
                  ms, copy / ms, np.staged ? "staged" : np.on_chip ? "on chip" : "tiled",
                  (long long)np.blocks_per_unit);
      if (ms > 0 && ms < 0.99 * best) {
        best = ms;
        best_v = v;
      }
    }
    k.set(pol, best_v);
    std::printf("%s = %lld (%.4f ms)\n", k.name, (long long)best_v, best);
  }
  time_row(pol);  // the plan the tuned row gives, for the note
  note_tuned(s, np.staged ? "nhwc-staged" : np.on_chip ? "nhwc-on-chip" : "nhwc-tiled", best, copy);
  return 0;
}

int tune(const Shape& s) {
  if (s.nhwc) return tune_nhwc(s);
  use_shape(s);
  const int reps = std::max(5, iterations_for(s) / 3);
  const double copy = time_median([&] { return cudaMemcpyAsync(g_cur.y, g_cur.x, s.bytes(), cudaMemcpyDeviceToDevice); }, reps);
  Plan def;
  const double t_def = time_median([&] { return run_instnorm(s, PlanOverride{}, &def); }, reps);
  std::printf("tune %s  policy %s  copy %.4f ms\n", s.name.c_str(), g_policy ? g_policy->name : "auto", copy);
  std::printf("default: %-12s threads %4d items %2d vec %d G %lld  %.4f ms  %.3f of copy\n",
              to_string(def.strategy), def.threads, def.items, def.vec, (long long)def.blocks_per_plane,
              t_def, copy / t_def);
  struct Row { Plan plan; double ms; };
  std::vector<Row> rows;
  for (int strat = 0; strat < 5; ++strat)
    for (int threads : {64, 128, 256, 512})
      for (int items : {0, 1, 2, 4, 8, 16, 32})
        for (int gmul : {0, 1, 2, 4}) {
          if (strat < 2 && gmul != 0) continue;
          PlanOverride ov;
          ov.strategy = strat;
          ov.threads = threads;
          ov.items = items;
          if (gmul) ov.blocks_per_plane = std::max<int64_t>(1, def.blocks_per_plane * gmul / 2);
          // Skip overrides that land on a plan already timed.
          Problem prob;
          Plan p;
          if (validate(g_cur.x, g_cur.y, s.n(), s.c(), s.spatial(), int(s.elem_bytes()),
                       options_for(s), &prob) != Invalid::kOk)
            continue;
          if (detail::current_plan(prob, &p, ov, g_policy) != cudaSuccess) continue;
          bool seen = false;
          for (const Row& r : rows)
            seen |= r.plan.strategy == p.strategy && r.plan.threads == p.threads &&
                    r.plan.items == p.items && r.plan.lanes == p.lanes &&
                    r.plan.blocks_per_plane == p.blocks_per_plane && r.plan.grid == p.grid;
          if (seen) continue;
          const double ms = time_median([&] { return run_instnorm(s, ov, &p); }, reps);
          if (ms > 0) rows.push_back({p, ms});
        }
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return a.ms < b.ms; });
  std::printf("best plans:\n");
  std::fflush(stdout);
  for (size_t i = 0; i < rows.size() && i < 8; ++i) {
    const Plan& p = rows[i].plan;
    std::printf("  %-12s threads %4d lanes %4d items %2d vec %d G %4lld grid %6lld  %.4f ms  %.3f of copy  %.3f x default\n",
                to_string(p.strategy), p.threads, p.lanes, p.items, p.vec, (long long)p.blocks_per_plane,
                (long long)p.grid, rows[i].ms, copy / rows[i].ms, rows[i].ms / t_def);
  }
  if (!rows.empty()) {
    ArchPolicy& pol = tuned_row();
    const Plan& b = rows[0].plan;
    if (b.strategy == Strategy::kSubWarp) pol.subwarp_threads = b.threads;
    if (b.strategy == Strategy::kBlock) pol.block_items = b.items;
    if (b.strategy >= Strategy::kSplit) pol.split_threads = b.threads;
    note_tuned(s, to_string(b.strategy), rows[0].ms, copy);
  }
  return 0;
}

}  // namespace

/// The text after `prefix` in a flag that starts with it ("--nhwc-cols=8" -> "8"): offsets
/// counted by hand went stale when a flag was renamed (--nhwc-on-chip= read "p=1" as 0).
const char* flag_value(const std::string& a, const char* prefix) {
  return a.c_str() + std::min(a.size(), std::strlen(prefix));
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines survive a timeout of the caller
  std::vector<Shape> shapes;
  std::vector<std::string> tunes;
  std::string emit_row;
  bool bwd_standard = false;
  bool mod_standard = false;
  int mod_rounds = kModRounds;
  int sweep_k = 0;  // --sweep=K[:seed]
  uint64_t sweep_seed = kSweepSeed;
  bool sweep_list = false;
  std::vector<char*> rest = {argv[0]};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.rfind("--shape=", 0) == 0 || a.rfind("--tune=", 0) == 0) {
      Shape s;
      const std::string spec = a.substr(a.find('=') + 1);
      if (!parse_shape(spec, &s)) {
        std::fprintf(stderr, "bad shape '%s' (want NxCxHxW[:fp32|fp16|bf16][:gnG][:silu]"
                             "[:relu][:affine][:save][:running][:eval][:cl][:ss|:adain]"
                             "[:bwd|:train])\n",
                     spec.c_str());
        return 1;
      }
      if (a[2] == 't' && s.backward()) {
        std::fprintf(stderr, "--tune times the forward; '%s' asks for a backward\n", spec.c_str());
        return 1;
      }
      (a[2] == 's' ? shapes.push_back(s) : tunes.push_back(spec));
    } else if (a == "--bwd-standard") {  // the standard :bwd and :train rows
      bwd_standard = true;
    } else if (a == "--mod-standard") {  // the modulated rows and their plain shapes, in rounds
      mod_standard = true;
    } else if (a.rfind("--mod-rounds=", 0) == 0) {  // rounds of --mod-standard (default 5)
      mod_rounds = std::atoi(flag_value(a, "--mod-rounds="));
      if (mod_rounds <= 0) {
        std::fprintf(stderr, "bad '%s' (want --mod-rounds=K, K > 0)\n", a.c_str());
        return 1;
      }
    } else if (a.rfind("--sweep=", 0) == 0) {  // K random shapes [from a seed]
      char* end = nullptr;
      sweep_k = int(std::strtol(flag_value(a, "--sweep="), &end, 10));
      if (*end == ':') sweep_seed = std::strtoull(end + 1, &end, 10);
      if (sweep_k <= 0 || *end != '\0') {
        std::fprintf(stderr, "bad sweep '%s' (want --sweep=K or --sweep=K:seed, K > 0)\n", a.c_str());
        return 1;
      }
    } else if (a == "--sweep-list") {  // print the sweep's shapes and exit (no GPU)
      sweep_list = true;
    } else if (a.rfind("--nhwc-chunks=", 0) == 0) {  // least row chunks per thread per tile
      g_override.nhwc_chunks = std::atoi(flag_value(a, "--nhwc-chunks="));
    } else if (a.rfind("--nhwc-budget=", 0) == 0) {  // MB per batch of NHWC images
      g_override.nhwc_l2_budget = int64_t(std::atof(flag_value(a, "--nhwc-budget=")) * (1 << 20));
    } else if (a.rfind("--nhwc-on-chip=", 0) == 0) {  // NHWC: 0 tiled, 1 on chip only
      g_override.nhwc_on_chip = std::atoi(flag_value(a, "--nhwc-on-chip="));
    } else if (a.rfind("--nhwc-bwd-on-chip=", 0) == 0) {  // NHWC backward: 0 tiled, 1 on chip
      g_override.nhwc_bwd_on_chip = std::atoi(flag_value(a, "--nhwc-bwd-on-chip="));
    } else if (a.rfind("--nhwc-cols=", 0) == 0) {  // NHWC on chip: column vectors per slice
      g_override.nhwc_cols = std::atoi(flag_value(a, "--nhwc-cols="));
    } else if (a.rfind("--phases=", 0) == 0) {  // split plans: start phases of the groups
      g_override.phases = std::atoi(flag_value(a, "--phases="));
    } else if (a.rfind("--trace=", 0) == 0) {  // phase timeline (INSTNORM_TRACE builds)
      g_trace_on = std::atoi(flag_value(a, "--trace=")) != 0;
    } else if (a.rfind("--interleave=", 0) == 0) {
      g_interleave = std::atoi(flag_value(a, "--interleave=")) != 0;
    } else if (a.rfind("--warm-code=", 0) == 0) {
      g_warm_code = std::atoi(flag_value(a, "--warm-code=")) != 0;
    } else if (a.rfind("--split-smem=", 0) == 0) {  // split slices in shared memory: 0 or 1
      g_override.split_smem = std::atoi(flag_value(a, "--split-smem="));
    } else if (a.rfind("--plan=", 0) == 0) {
      long long v[4] = {-1, 0, 0, 0};
      std::sscanf(flag_value(a, "--plan="), "%lld,%lld,%lld,%lld", &v[0], &v[1], &v[2], &v[3]);
      g_override.strategy = int(v[0]);
      g_override.threads = int(v[1]);
      g_override.items = int(v[2]);
      g_override.blocks_per_plane = v[3];
    } else if (a.rfind("--arch=", 0) == 0) {  // a row of the table by name
      g_policy = policy_named(flag_value(a, "--arch="));
      if (!g_policy) {
        std::fprintf(stderr, "no table row named '%s' (rows:", flag_value(a, "--arch="));
        for (const ArchPolicy& r : kArchTable) std::fprintf(stderr, " %s", r.name);
        std::fprintf(stderr, ")\n");
        return 1;
      }
    } else if (a.rfind("--emit-row=", 0) == 0) {  // with --tune: write the tuned row as a header
      emit_row = flag_value(a, "--emit-row=");
    } else {
      rest.push_back(argv[i]);
    }
  }
  if (bwd_standard)
    for (const auto& spec : kBwdStandard) {
      Shape s;
      parse_shape(spec, &s);
      shapes.push_back(s);
    }
  // Round r of every row, then round r + 1: each modulated row is timed right after its plain
  // shape in every round.
  for (int r = 1; mod_standard && r <= mod_rounds; ++r)
    for (const auto& spec : kModStandard) {
      Shape s;
      parse_shape(spec, &s);
      s.round = r;
      shapes.push_back(s);
    }
  if (sweep_list) {
    if (sweep_k == 0) {
      std::fprintf(stderr, "--sweep-list prints the shapes of --sweep=K[:seed]: give that too\n");
      return 1;
    }
    print_sweep_list(sweep_rows(sweep_k, sweep_seed), sweep_seed);
    return 0;
  }
  if (shapes.empty() && sweep_k == 0)
    for (const auto& spec : kStandard) {
      Shape s;
      parse_shape(spec, &s);
      shapes.push_back(s);
    }
  bool listing = false;
  std::FILE* summary = stdout;  // the sweep's summary; stderr where stdout carries JSON or CSV
  for (size_t i = 1; i < rest.size(); ++i) {
    const std::string r = rest[i];
    listing |= r.find("list_tests") != std::string::npos;
    if (r.rfind("--benchmark_format=", 0) == 0 && r != "--benchmark_format=console") summary = stderr;
  }
  int rest_argc = int(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());
  if (!listing) {
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
      std::fprintf(stderr, "instnorm_bench: no CUDA device\n");
      return 1;
    }
    CHECK_CUDA(cudaMalloc(&g_flush, kFlushBytes));
    cudaDeviceProp prop;
    CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
    int driver = 0;
    cudaDriverGetVersion(&driver);
    benchmark::AddCustomContext("gpu", prop.name);
    benchmark::AddCustomContext("driver", std::to_string(driver));
    benchmark::AddCustomContext("policy", g_policy ? g_policy->name : "auto");
    if (tunes.empty()) {
      g_steady_GBps = measure_steady_copy();
      benchmark::AddCustomContext("steady_copy_GBps", std::to_string(g_steady_GBps));
    }
  }
  if (sweep_k > 0) {
    benchmark::AddCustomContext("sweep_k", std::to_string(sweep_k));
    benchmark::AddCustomContext("sweep_seed", std::to_string(sweep_seed));
  }
  if (!tunes.empty()) {
    for (const auto& spec : tunes) {
      Shape s;
      parse_shape(spec, &s);
      tune(s);
    }
    if (!emit_row.empty() && g_tuned_row_set) {
      // The row for this card: named after it, keyed to its architecture and memory bus.
      int dev = 0;
      cudaDeviceProp prop;
      DeviceProps d;
      CHECK_CUDA(cudaGetDevice(&dev));
      CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
      CHECK_CUDA(device_props(dev, &d));
      static std::string name, source;
      name = prop.name;
      source = g_tuned_source;
      for (char& ch : name)
        if (ch == '"' || ch == '\\') ch = ' ';
      g_tuned_row.name = name.c_str();
      g_tuned_row.cc = d.cc_major * 10 + d.cc_minor;
      g_tuned_row.min_bus_bits = d.mem_bus_bits;
      g_tuned_row.source = source.c_str();
      std::FILE* f = std::fopen(emit_row.c_str(), "w");
      if (!f) {
        std::fprintf(stderr, "cannot write %s\n", emit_row.c_str());
        return 1;
      }
      std::fprintf(f, "// instnorm table row for %s, written by instnorm_bench --emit-row.\n", prop.name);
      std::fprintf(f, "// Use: compile with -DINSTNORM_USER_ARCH_ROWS='\"this_file.h\"' (docs/tuning.md).\n");
      std::fprintf(f, "#pragma once\nnamespace instnorm {\nconstexpr ArchPolicy kUserArchRows[] = {");
      print_row(f, g_tuned_row);
      std::fprintf(f, "};\n}  // namespace instnorm\n");
      std::fclose(f);
      std::printf("wrote %s\n", emit_row.c_str());
    }
    return 0;
  }
  for (const auto& s : shapes) register_shape(s);
  if (sweep_k > 0) register_sweep(sweep_rows(sweep_k, sweep_seed));
  benchmark::RunSpecifiedBenchmarks();
  if (sweep_k > 0 && !listing) print_sweep_summary(summary, sweep_seed);
  benchmark::Shutdown();
  return 0;
}
