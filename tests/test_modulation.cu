// Per-sample modulation (AdaIN, FiLM, the scale-shift GroupNorm of diffusion U-Nets), the
// unbiased variance and statistics(). On the CPU (run in CI): validation, and the float64
// reference against central differences of its own forward. On the device: every NCHW strategy
// (forced and asserted), both layouts, eval mode and every type, forward and backward (dx and
// the gradients of gamma, beta, scale and shift) against the float64 reference.
#include <gtest/gtest.h>

#include <instnorm/instnorm.cuh>
#include <instnorm/reference.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "finite_diff.h"
#include "gpu_util.h"

namespace {

using namespace instnorm;
using namespace instnorm_test;

// ---------------------------------------------------------------- validation (CPU)

TEST(ModulationValidate, RefusesWithAReason) {
  alignas(16) static float x[2 * 8 * 16], y[2 * 8 * 16], s[64], t[64], m[16], r[16];
  Options o;
  o.modulation.scale = s;
  o.modulation.shift = t;
  EXPECT_EQ(validate(x, y, 2, 8, 16, o), Invalid::kOk);
  o.modulation.scale_stride = 16;  // emb.chunk(2, dim=1) halves: rows 2c apart
  o.modulation.shift_stride = 16;
  EXPECT_EQ(validate(x, y, 2, 8, 16, o), Invalid::kOk);
  o.modulation.scale_stride = 7;  // below c: rows would overlap
  EXPECT_EQ(validate(x, y, 2, 8, 16, o), Invalid::kBadModulation);
  o.modulation.scale_stride = -8;
  EXPECT_EQ(validate(x, y, 2, 8, 16, o), Invalid::kBadModulation);
  o.modulation.scale_stride = 0;
  o.modulation.type = ParamType(7);
  EXPECT_EQ(validate(x, y, 2, 8, 16, o), Invalid::kBadModulation);
  o.modulation.type = ParamType::kSameAsInput;
  o.modulation.shift = y + 100;  // inside y
  EXPECT_EQ(validate(x, y, 2, 8, 16, o), Invalid::kBadModulation);
  o.modulation.shift = x;  // x is only read: allowed when out of place
  EXPECT_EQ(validate(x, y, 2, 8, 16, o), Invalid::kOk);
  EXPECT_EQ(validate(x, x, 2, 8, 16, o), Invalid::kBadModulation) << "in place, x is y";
  EXPECT_STRNE(to_string(Invalid::kBadModulation), "unknown reason");

  Options u;
  u.unbiased = true;
  EXPECT_EQ(validate(x, y, 2, 8, 16, u), Invalid::kOk);
  EXPECT_EQ(validate(x, y, 2, 8, 1, u), Invalid::kBadUnbiased) << "planes of one element";
  u.groups = 2;
  EXPECT_EQ(validate(x, y, 2, 8, 1, u), Invalid::kOk) << "groups of 4 elements";
  EXPECT_STRNE(to_string(Invalid::kBadUnbiased), "unknown reason");

  Problem prob;
  const Options plain;
  EXPECT_EQ(validate_statistics(x, m, r, 2, 8, 16, 4, plain, &prob), Invalid::kOk);
  EXPECT_EQ(validate_statistics(x, nullptr, r, 2, 8, 16, 4, plain, &prob), Invalid::kNullPointer);
  EXPECT_EQ(validate_statistics(x, m, m + 4, 2, 8, 16, 4, plain, &prob), Invalid::kOverlap);
  EXPECT_EQ(validate_statistics(x, x + 8, r, 2, 8, 16, 4, plain, &prob), Invalid::kOverlap);

  // The backward's gradient buffers: dscale/dshift hold n*c floats.
  Options b;
  b.save_mean = m;
  b.save_rstd = r;
  float g4[4 * 16];
  EXPECT_EQ(validate_backward(x, y, y, 2, 8, 16, b, Gradients{nullptr, nullptr, g4, g4 + 16}),
            Invalid::kOk);
  EXPECT_EQ(validate_backward(x, y, y, 2, 8, 16, b, Gradients{nullptr, nullptr, g4, g4 + 8}),
            Invalid::kBadGradients);
  EXPECT_EQ(validate_backward(x, y, y, 2, 8, 16, b, Gradients{g4 + 20, nullptr, g4, nullptr}),
            Invalid::kOk);
  EXPECT_EQ(validate_backward(x, y, y, 2, 8, 16, b, Gradients{g4 + 12, nullptr, g4, nullptr}),
            Invalid::kBadGradients);
  EXPECT_EQ(validate_backward(x, y, y, 2, 8, 16, b, Gradients{nullptr, nullptr, nullptr, x + 3}),
            Invalid::kBadGradients);
}

// ---------------------------------------------------------------- the reference (CPU)

// One modulated call: which parameters, which convention.
struct Mod {
  bool affine = false, scale = true, shift = true, one_plus = false, unbiased = false;
  int64_t pad = 0;  // stride = c + pad
  std::string describe() const {
    return std::string(affine ? " affine" : "") + (scale ? " scale" : "") +
           (shift ? " shift" : "") + (one_plus ? " 1+scale" : "") +
           (unbiased ? " unbiased" : "") + (pad ? " pad" + std::to_string(pad) : "");
  }
};

// The modulations the tests run: scale-shift GroupNorm (FiLM), AdaIN, a shift alone, a scale
// alone with rows further apart than c.
const Mod kMods[] = {
    {true, true, true, true, false, 0},
    {false, true, true, false, true, 0},
    {true, false, true, true, false, 0},
    {true, true, false, false, false, 3},
};

// Host parameters of one call (type P for gamma/beta, M for scale/shift) and its Options.
template <class P, class M>
struct HostParams {
  std::vector<P> gamma, beta;
  std::vector<M> scale, shift;
  int64_t stride = 0;
  HostParams(int64_t n, int64_t c, const Mod& md, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::uniform_real_distribution<double> ud(0.5, 1.5);
    stride = c + md.pad;
    const auto cast = [](double v, auto* tag) {
      using E = std::remove_pointer_t<decltype(tag)>;
      if constexpr (std::is_same<E, double>::value) return v;
      else return detail::from_float<E>(float(v));
    };
    for (int64_t j = 0; md.affine && j < c; ++j) {
      gamma.push_back(cast((rng() & 1 ? 1 : -1) * ud(rng), (P*)nullptr));
      beta.push_back(cast(0.3 * nd(rng), (P*)nullptr));
    }
    for (int64_t e = 0; e < n * stride; ++e) {
      // 1 + scale near 1 (diffusion), scale near 1 (AdaIN's style std).
      scale.push_back(cast(md.one_plus ? 0.4 * nd(rng) : ud(rng), (M*)nullptr));
      shift.push_back(cast(0.5 * nd(rng), (M*)nullptr));
    }
  }
  // Options pointing at `g, b, s, t` (host or device copies of the vectors above).
  Options options(const Mod& md, const void* g, const void* b, const void* s,
                  const void* t) const {
    Options o;
    if (md.affine) {
      o.gamma = g;
      o.beta = b;
      o.param_type = std::is_same<P, float>::value ? ParamType::kFloat : ParamType::kSameAsInput;
    }
    o.modulation.scale = md.scale ? s : nullptr;
    o.modulation.shift = md.shift ? t : nullptr;
    o.modulation.scale_stride = md.pad ? stride : 0;
    o.modulation.shift_stride = md.pad ? stride : 0;
    o.modulation.type = std::is_same<M, float>::value ? ParamType::kFloat : ParamType::kSameAsInput;
    o.modulation.one_plus_scale = md.one_plus;
    o.unbiased = md.unbiased;
    return o;
  }
};

// Every gradient of the reference backward against central differences of L = sum(y * w).
TEST(ModulationReference, MatchesFiniteDifferences) {
  int checked = 0;
  for (const Mod& md : kMods)
    for (Layout layout : {Layout::kNCHW, Layout::kNHWC})
      for (int64_t groups : {0, 2})
        for (Activation act : {Activation::kNone, Activation::kSilu}) {
          const int64_t n = 2, c = 4, s = 6;
          SCOPED_TRACE(md.describe() + (layout == Layout::kNHWC ? " NHWC" : " NCHW") +
                       " groups " + std::to_string(groups) + " act " + std::to_string(int(act)));
          HostParams<double, double> hp(n, c, md, 5 + uint64_t(checked));
          std::mt19937_64 rng(77 + uint64_t(checked));
          std::normal_distribution<double> nd(0.0, 1.0);
          std::vector<double> x(size_t(n * c * s)), w(x.size());
          for (auto& v : x) v = 0.4 + 1.2 * nd(rng);
          for (auto& v : w) v = nd(rng);
          Options o = hp.options(md, hp.gamma.data(), hp.beta.data(), hp.scale.data(),
                                 hp.shift.data());
          o.groups = groups;
          o.layout = layout;
          o.activation = act;
          std::vector<double> dx(x.size()), dg(static_cast<size_t>(c)),
              db(static_cast<size_t>(c)), ds(static_cast<size_t>(n * c)),
              dt(static_cast<size_t>(n * c));
          reference::backward<double, double, double>(x.data(), w.data(), dx.data(), n, c, s, o,
                                                      dg.data(), db.data(), nullptr, ds.data(),
                                                      dt.data());
          const auto L = [&] {
            std::vector<double> y(x.size());
            reference::forward<double, double, double>(x.data(), y.data(), n, c, s, o);
            double l = 0;
            for (size_t i = 0; i < y.size(); ++i) l += y[i] * w[i];
            return l;
          };
          const auto check = [&](std::vector<double>& p, const std::vector<double>& grad,
                                  const std::function<size_t(size_t)>& at, size_t count,
                                  const char* what) {
            std::vector<double> fd(count);
            for (size_t e = 0; e < count; ++e) {
              double& v = p[at(e)];
              fd[e] = central(v, 1e-6 * std::max(1.0, std::fabs(v)), L);
            }
            const double tol = 1e-6 * std::max(max_abs(fd), 1e-300);
            for (size_t e = 0; e < count; ++e)
              ASSERT_NEAR(grad[e], fd[e], tol) << what << "[" << e << "]";
          };
          const auto id = [](size_t e) { return e; };
          check(x, dx, id, x.size(), "dx");
          if (md.affine) {
            check(hp.gamma, dg, id, size_t(c), "dgamma");
            check(hp.beta, db, id, size_t(c), "dbeta");
          }
          // scale/shift rows are `stride` apart; the gradients are n*c contiguous.
          const auto row = [&](size_t e) { return size_t(e / c * hp.stride + e % c); };
          if (md.scale) check(hp.scale, ds, row, size_t(n * c), "dscale");
          if (md.shift) check(hp.shift, dt, row, size_t(n * c), "dshift");
          if (HasFatalFailure()) return;
          ++checked;
        }
  EXPECT_EQ(checked, 32);
}

// The folded map against the two conventions written out: act((xhat g + b)(1 + s) + t) and
// act(xhat g s + b + t), xhat with the unbiased variance where asked.
TEST(ModulationReference, FoldsBothConventions) {
  const int64_t n = 2, c = 3, s = 5;
  for (const Mod& md : kMods) {
    HostParams<double, double> hp(n, c, md, 11);
    std::vector<double> x(size_t(n * c * s)), y(x.size());
    std::mt19937_64 rng(3);
    std::normal_distribution<double> nd(2.0, 1.5);
    for (auto& v : x) v = nd(rng);
    Options o = hp.options(md, hp.gamma.data(), hp.beta.data(), hp.scale.data(), hp.shift.data());
    o.activation = Activation::kRelu;
    reference::forward<double, double, double>(x.data(), y.data(), n, c, s, o);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < c; ++j) {
        const double* p = x.data() + (i * c + j) * s;
        double mean = 0, m2 = 0;
        for (int k = 0; k < s; ++k) mean += p[k] / s;
        for (int k = 0; k < s; ++k) m2 += (p[k] - mean) * (p[k] - mean);
        const double var = m2 / double(md.unbiased ? s - 1 : s);
        const double g = md.affine ? hp.gamma[size_t(j)] : 1, b = md.affine ? hp.beta[size_t(j)] : 0;
        const double sc = md.scale ? hp.scale[size_t(i * hp.stride + j)] : (md.one_plus ? 0 : 1);
        const double sh = md.shift ? hp.shift[size_t(i * hp.stride + j)] : 0;
        for (int k = 0; k < s; ++k) {
          const double xhat = (p[k] - mean) / std::sqrt(var + 1e-5);
          const double pre = md.one_plus ? (xhat * g + b) * (1 + sc) + sh : xhat * g * sc + b + sh;
          EXPECT_NEAR(y[size_t((i * c + j) * s + k)], std::max(pre, 0.0), 1e-12) << md.describe();
        }
      }
  }
}

// ---------------------------------------------------------------- device

struct DevCase {
  int64_t n, c, s, groups = 0;
  Layout layout = Layout::kNCHW;
  Activation act = Activation::kNone;
  int strategy = -1;  // forced and asserted (NCHW)
  int64_t blocks = 0;
  int items = 0;
  int nhwc_on_chip = -1;  // forced and asserted (NHWC): 0 tiled, 1 on chip
  int nhwc_cols = 0;      // forced and asserted (NHWC on chip): column vectors per slice
  bool bwd_on_chip = false;  // the on-chip NHWC backward, forced and asserted
  bool eval = false;
  std::string describe() const {
    return std::to_string(n) + "x" + std::to_string(c) + "x" + std::to_string(s) +
           (groups ? " gn" + std::to_string(groups) : "") +
           (layout == Layout::kNHWC ? " NHWC" : " NCHW") + " act " + std::to_string(int(act)) +
           (strategy >= 0 ? std::string(" ") + to_string(Strategy(strategy)) : "") +
           (nhwc_on_chip == 0 ? " tiled" : nhwc_on_chip == 1 ? " on-chip" : "") +
           (nhwc_cols ? " cols " + std::to_string(nhwc_cols) : "") +
           (bwd_on_chip ? " bwd-on-chip" : "") + (eval ? " eval" : "");
  }
};

template <class T>
void upload(const std::vector<T>& h, DeviceBuffer<T>* d) {
  if (!h.empty())
    EXPECT_EQ(cudaMemcpy(d->ptr, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice),
              cudaSuccess);
}

template <class T>
std::vector<T> download(const T* d, size_t count) {
  std::vector<T> h(count);
  EXPECT_EQ(cudaMemcpy(h.data(), d, count * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

// Forward and backward of one case against the reference; M is the modulation's element type.
template <class T, class M>
void run_case(const DevCase& k, const Mod& md) {
  SCOPED_TRACE(std::string(type_name<T>()) + (std::is_same<M, float>::value ? "" : " mod-T") +
               " " + k.describe() + md.describe());
  const size_t total = size_t(k.n * k.c * k.s);
  const int64_t G = k.groups ? k.groups : k.c, len = (k.c / G) * k.s;
  std::mt19937_64 rng(1234);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<T> hx(total), hdy(total);
  for (auto& v : hx) v = to_t<T>(float(3.0 + nd(rng)));
  for (auto& v : hdy) v = to_t<T>(float(nd(rng)));
  HostParams<float, M> hp(k.n, k.c, md, 8);
  std::vector<float> rm(size_t(k.c)), rv(size_t(k.c));
  for (auto& v : rm) v = float(3.0 + 0.2 * nd(rng));
  for (auto& v : rv) v = float(0.8 + 0.1 * nd(rng));

  DeviceBuffer<T> x(total), y(total), dy(total), dx(total);
  DeviceBuffer<float> g(size_t(k.c)), b(size_t(k.c)), dm(size_t(k.n * G)), dr(size_t(k.n * G));
  DeviceBuffer<float> drm(size_t(k.c)), drv(size_t(k.c));
  DeviceBuffer<M> sc(hp.scale.size()), sh(hp.shift.size());
  DeviceBuffer<float> dg(size_t(k.c)), db(size_t(k.c)), ds(size_t(k.n * k.c)), dt(size_t(k.n * k.c));
  upload(hx, &x);
  upload(hdy, &dy);
  upload(hp.gamma, &g);
  upload(hp.beta, &b);
  upload(hp.scale, &sc);
  upload(hp.shift, &sh);
  upload(rm, &drm);
  upload(rv, &drv);
  Options opt = hp.options(md, g.ptr, b.ptr, sc.ptr, sh.ptr);
  opt.groups = k.groups;
  opt.layout = k.layout;
  opt.activation = k.act;
  if (k.eval) {
    opt.use_input_stats = false;
    opt.running_mean = drm.ptr;
    opt.running_var = drv.ptr;
  } else {
    opt.save_mean = dm.ptr;
    opt.save_rstd = dr.ptr;
  }
  PlanOverride ov;
  ov.strategy = k.strategy;
  ov.blocks_per_plane = k.blocks;
  ov.items = k.items;
  ov.nhwc_on_chip = k.nhwc_on_chip;
  ov.nhwc_cols = k.nhwc_cols;
  if (k.bwd_on_chip) ov.nhwc_bwd_on_chip = 1;
  Plan plan;
  NhwcPlan nplan;
  CUDA_OK(detail::forward_tuned(x.ptr, y.ptr, k.n, k.c, k.s, opt, ov, nullptr, nullptr, &plan,
                                &nplan));
  CUDA_OK(cudaDeviceSynchronize());
  if (k.strategy >= 0) EXPECT_EQ(int(plan.strategy), k.strategy) << "the forced strategy ran";
  if (k.nhwc_on_chip >= 0) EXPECT_EQ(int(nplan.on_chip), k.nhwc_on_chip) << "the forced NHWC plan ran";
  if (k.nhwc_cols > 0) EXPECT_EQ(nplan.cols_per_block, k.nhwc_cols) << "the forced slice width ran";
  // Block and split plans of modulated instance norm with float maps take forward_kernel's
  // kMap instance (the map through shared memory); maps of type T the kernel every plan shares.
  if (k.layout == Layout::kNCHW && k.groups == 0 && !k.eval && (md.scale || md.shift) &&
      (plan.strategy == Strategy::kBlock || plan.strategy == Strategy::kSplit)) {
    Problem fp;
    ASSERT_EQ(validate(x.ptr, y.ptr, k.n, k.c, k.s, int(sizeof(T)), opt, &fp), Invalid::kOk);
    EXPECT_EQ(detail::map_in_smem_ok(plan, fp, opt), (std::is_same<M, float>::value))
        << "the kMap instance where the maps are float";
  }

  Options host = hp.options(md, hp.gamma.data(), hp.beta.data(), hp.scale.data(), hp.shift.data());
  host.groups = k.groups;
  host.layout = k.layout;
  host.activation = k.act;
  if (k.eval) {
    host.use_input_stats = false;
    host.running_mean = rm.data();
    host.running_var = rv.data();
  }
  std::vector<double> ref(total);
  reference::forward<T, float, M>(hx.data(), ref.data(), k.n, k.c, k.s, host);
  const std::vector<T> hy = download(y.ptr, total);
  // SiLU's fast exponential: 2 ulp (16-bit) or 2e-5 relative (fp32), as the options tests.
  const bool silu = k.act == Activation::kSilu;
  int bad = 0;
  for (size_t i = 0; i < total; ++i) {
    const double got = reference::to_double(hy[i]), want = ref[i];
    const double tol = std::is_same<T, float>::value
                           ? (silu ? 2e-5 * std::max(1.0, std::fabs(want)) : 1e-5 + 1e-6 * std::fabs(want))
                           : (silu ? 2 : 1) * ulp_of<T>(want) + 0x1p-20;
    if (!(std::fabs(got - want) <= tol) && bad++ < 3)
      ADD_FAILURE() << "y[" << i << "] = " << got << ", expected " << want;
  }

  // The backward: dx and every parameter gradient.
  Gradients grads{dg.ptr, db.ptr, ds.ptr, dt.ptr};
  Plan bplan;
  bool bwd_chip = false;
  CUDA_OK(detail::backward_tuned(x.ptr, dy.ptr, dx.ptr, k.n, k.c, k.s, opt, grads, ov, nullptr,
                                 nullptr, 0, true, nullptr, &bplan, &bwd_chip));
  CUDA_OK(cudaDeviceSynchronize());
  if (k.strategy >= 0) EXPECT_EQ(int(bplan.strategy), k.strategy) << "the forced backward ran";
  if (k.layout == Layout::kNHWC) EXPECT_EQ(bwd_chip, k.bwd_on_chip) << "the on-chip backward ran";
  std::vector<double> rdx(total), rdg(size_t(k.c)), rdb(size_t(k.c)), rds(size_t(k.n * k.c)),
      rdt(size_t(k.n * k.c));
  // dgamma/dbeta exist without gamma/beta too (as if 1 and 0).
  std::vector<float> one(size_t(k.c), 1.f), zero(size_t(k.c), 0.f);
  Options hg = host;
  if (!md.affine) {
    hg.gamma = one.data();
    hg.beta = zero.data();
    hg.param_type = ParamType::kFloat;
  }
  reference::backward<T, float, M>(hx.data(), hdy.data(), rdx.data(), k.n, k.c, k.s, hg,
                                   rdg.data(), rdb.data(), nullptr, rds.data(), rdt.data());
  const std::vector<T> hdx = download(dx.ptr, total);
  const double dx_max = max_abs(rdx);
  bad = 0;
  for (size_t i = 0; i < total; ++i) {
    const double got = reference::to_double(hdx[i]), want = rdx[i];
    const double tol = std::is_same<T, float>::value ? 1e-5 * dx_max
                                                     : 2 * ulp_of<T>(want) + 1e-5 * dx_max;
    if (!(std::fabs(got - want) <= tol) && bad++ < 3)
      ADD_FAILURE() << "dx[" << i << "] = " << got << ", expected " << want;
  }
  // Parameter gradients: sums of about len (or n * len) terms in fp32.
  const auto near = [&](const float* d, const std::vector<double>& want, const char* what) {
    const std::vector<float> got = download(d, want.size());
    const double tol = 1e-5 * std::max(1.0, max_abs(want)) * std::sqrt(double(len));
    for (size_t e = 0; e < want.size(); ++e)
      EXPECT_NEAR(got[e], want[e], tol) << what << "[" << e << "]";
  };
  near(dg.ptr, rdg, "dgamma");
  near(db.ptr, rdb, "dbeta");
  near(ds.ptr, rds, "dscale");
  near(dt.ptr, rdt, "dshift");
  // AdaIN's backward asks for dscale and dshift alone: without gamma and beta, one block per
  // plane, the NCHW kernel stores them itself (no partials in the workspace); dx unchanged.
  // Channels-last, with or without gamma and beta (scale-shift GroupNorm with frozen affine
  // parameters): the finalize stores them, and grad_params_kernel is not launched.
  if ((md.scale || md.shift) && (!md.affine || k.layout == Layout::kNHWC)) {
    DeviceBuffer<T> dx2(total);
    DeviceBuffer<float> ds2(size_t(k.n * k.c)), dt2(size_t(k.n * k.c));
    const Gradients only{nullptr, nullptr, md.scale ? ds2.ptr : nullptr,
                         md.shift ? dt2.ptr : nullptr};
    Plan p2;
    bool chip2 = false;
    CUDA_OK(detail::backward_tuned(x.ptr, dy.ptr, dx2.ptr, k.n, k.c, k.s, opt, only, ov, nullptr,
                                   nullptr, 0, true, nullptr, &p2, &chip2));
    if (k.layout == Layout::kNHWC) EXPECT_EQ(chip2, k.bwd_on_chip) << "the on-chip backward ran";
    CUDA_OK(cudaDeviceSynchronize());
    const std::vector<T> hdx2 = download(dx2.ptr, total);
    EXPECT_EQ(std::memcmp(hdx2.data(), hdx.data(), total * sizeof(T)), 0) << "dx differs";
    if (md.scale) near(ds2.ptr, rds, "dscale alone");
    if (md.shift) near(dt2.ptr, rdt, "dshift alone");
    Problem prob;
    ASSERT_EQ(validate_backward(x.ptr, dy.ptr, dx2.ptr, k.n, k.c, k.s, int(sizeof(T)), opt, only,
                                &prob),
              Invalid::kOk);
    if (!prob.nhwc && prob.channels_per_group == 1 && p2.blocks_per_plane == 1)
      EXPECT_EQ(detail::backward_workspace_layout(p2, prob, opt, only).partials_bytes, 0u)
          << "the kernel stores dscale/dshift directly";
    if (prob.nhwc) {
      EXPECT_TRUE(detail::nhwc_direct_scale_shift(only));
      // The same bits as grad_params_kernel's (the first call, which also asked for dgamma).
      const size_t nc = size_t(k.n * k.c);
      if (md.scale)
        EXPECT_EQ(std::memcmp(download(ds2.ptr, nc).data(), download(ds.ptr, nc).data(),
                              nc * sizeof(float)), 0) << "dscale differs from the partials'";
      if (md.shift)
        EXPECT_EQ(std::memcmp(download(dt2.ptr, nc).data(), download(dt.ptr, nc).data(),
                              nc * sizeof(float)), 0) << "dshift differs from the partials'";
    }
  }
  // Bit-identical rerun of the forward.
  DeviceBuffer<T> y2(total);
  CUDA_OK(detail::forward_tuned(x.ptr, y2.ptr, k.n, k.c, k.s, opt, ov, nullptr, nullptr));
  const std::vector<T> again = download(y2.ptr, total);
  EXPECT_EQ(std::memcmp(again.data(), hy.data(), total * sizeof(T)), 0) << "rerun differs";
}

constexpr int kSub = int(Strategy::kSubWarp), kBlk = int(Strategy::kBlock),
              kSpl = int(Strategy::kSplit), kStr = int(Strategy::kSplitStream),
              kStg = int(Strategy::kStaged);

DevCase forced(DevCase k, int strategy, int64_t blocks = 0, int items = 0) {
  k.strategy = strategy;
  k.blocks = blocks;
  k.items = items;
  return k;
}

std::vector<DevCase> device_cases() {
  std::vector<DevCase> v;
  for (Activation a : {Activation::kNone, Activation::kSilu}) {
    const DevCase in{4, 6, 256, 0, Layout::kNCHW, a};
    const DevCase big{2, 3, 64 * 64, 0, Layout::kNCHW, a};
    const DevCase gn_small{2, 12, 8 * 8, 3, Layout::kNCHW, a};
    const DevCase gn{2, 12, 20 * 20, 3, Layout::kNCHW, a};
    v.push_back(forced(in, kSub));
    v.push_back(forced(big, kBlk));
    v.push_back(forced(big, kSpl, 3));
    v.push_back(forced(big, kStr, 2, 2));
    v.push_back(forced(gn_small, kSub));
    v.push_back(forced(gn, kBlk));
    v.push_back(forced(gn, kSpl, 4));
    v.push_back(forced(gn, kStr, 3, 1));
    v.push_back(forced(DevCase{3, 5, 49, 0, Layout::kNCHW, a}, kStg));
    v.push_back(forced(DevCase{2, 12, 7 * 7, 3, Layout::kNCHW, a}, kStg));
    v.push_back(forced(DevCase{3, 5, 11, 0, Layout::kNCHW, a}, kStg));  // the register instance
    for (int on_chip : {1, 0}) {  // on chip: the forward's and the backward's on-chip kernels
      DevCase cl{2, 64, 16 * 16, 0, Layout::kNHWC, a};
      cl.nhwc_on_chip = on_chip;
      cl.bwd_on_chip = on_chip == 1;
      v.push_back(cl);
      DevCase cgn{2, 320, 8 * 8, 32, Layout::kNHWC, a};
      cgn.nhwc_on_chip = on_chip;
      cgn.bwd_on_chip = on_chip == 1;
      v.push_back(cgn);
    }
    // The on-chip backward with its exchange (3 blocks a slice).
    DevCase cgn3{2, 320, 12 * 12, 32, Layout::kNHWC, a};
    cgn3.bwd_on_chip = true;
    cgn3.blocks = 3;
    v.push_back(cgn3);
    // Slices wider than the on-chip kernel's 256 threads, where a block's threads cannot take
    // one channel each. Instance norm: 128 column vectors (512 channels in fp32, 1024 in 16
    // bits); GN32 of 640 channels (cpg 20): 80 column vectors (320 or 640 channels), so group
    // 12 (channels 240-259) straddles channel 256.
    DevCase wide{2, 1024, 4 * 4, 0, Layout::kNHWC, a};
    wide.nhwc_on_chip = 1;
    wide.nhwc_cols = 128;
    v.push_back(wide);
    DevCase wide_gn{2, 640, 4 * 4, 32, Layout::kNHWC, a};
    wide_gn.nhwc_on_chip = 1;
    wide_gn.nhwc_cols = 80;
    v.push_back(wide_gn);
  }
  DevCase ev{3, 4, 32 * 32};
  ev.eval = true;
  v.push_back(ev);
  DevCase ev_cl{2, 16, 12 * 12, 0, Layout::kNHWC};
  ev_cl.eval = true;
  v.push_back(ev_cl);
  return v;
}

template <class T>
void every_case() {
  for (const DevCase& k : device_cases())
    for (const Mod& md : kMods) {
      if (k.eval && md.unbiased) continue;  // eval normalizes with the running variance
      run_case<T, float>(k, md);
      if (md.pad) run_case<T, T>(k, md);  // scale/shift of type T
    }
}

TEST(ModulationDevice, EveryStrategyFp32) {
  REQUIRE_GPU();
  every_case<float>();
}
TEST(ModulationDevice, EveryStrategyFp16) {
  REQUIRE_GPU();
  every_case<__half>();
}
TEST(ModulationDevice, EveryStrategyBf16) {
  REQUIRE_GPU();
  every_case<__nv_bfloat16>();
}

// statistics(): mean and sqrt(var + eps), biased and unbiased, instance norm and GroupNorm,
// both layouts, on the planner's plans and forced NCHW strategies; y is never needed.
template <class T>
void statistics_case(int64_t n, int64_t c, int64_t s, int64_t groups, Layout layout,
                     bool unbiased, int strategy) {
  SCOPED_TRACE(std::string(type_name<T>()) + " " + std::to_string(n) + "x" + std::to_string(c) +
               "x" + std::to_string(s) + " groups " + std::to_string(groups) +
               (unbiased ? " unbiased" : "") + " strategy " + std::to_string(strategy));
  const size_t total = size_t(n * c * s);
  const int64_t G = groups ? groups : c;
  std::mt19937_64 rng(5);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<T> hx(total);
  for (auto& v : hx) v = to_t<T>(float(100.0 + 2.0 * nd(rng)));
  DeviceBuffer<T> x(total);
  DeviceBuffer<float> mean(size_t(n * G)), sd(size_t(n * G));
  upload(hx, &x);
  Options opt;
  opt.groups = groups;
  opt.layout = layout;
  opt.unbiased = unbiased;
  PlanOverride ov;
  ov.strategy = strategy;
  Plan used;
  CUDA_OK(detail::statistics_tuned(x.ptr, mean.ptr, sd.ptr, n, c, s, opt, ov, nullptr, nullptr,
                                   &used));
  CUDA_OK(cudaDeviceSynchronize());
  if (strategy >= 0) EXPECT_EQ(int(used.strategy), strategy);
  std::vector<double> y(total);
  std::vector<reference::PlaneStats> st;
  reference::forward(hx.data(), y.data(), n, c, s, opt, &st);
  const std::vector<float> hm = download(mean.ptr, size_t(n * G)), hs = download(sd.ptr, size_t(n * G));
  const double len = double((c / G) * s);
  for (int64_t p = 0; p < n * G; ++p) {
    const double var = st[size_t(p)].var * (unbiased ? len / (len - 1) : 1.0);
    const double want = std::sqrt(var + 1e-5);
    EXPECT_NEAR(hm[size_t(p)], st[size_t(p)].mean, 1e-6 * std::fabs(st[size_t(p)].mean) + 1e-6 * want)
        << "mean " << p;
    EXPECT_NEAR(hs[size_t(p)], want, 1e-6 * want) << "stddev " << p;
  }
}

TEST(StatisticsDevice, MeanAndStandardDeviation) {
  REQUIRE_GPU();
  for (bool unbiased : {false, true}) {
    statistics_case<float>(4, 6, 256, 0, Layout::kNCHW, unbiased, kSub);
    statistics_case<float>(2, 3, 64 * 64, 0, Layout::kNCHW, unbiased, kBlk);
    statistics_case<float>(2, 3, 64 * 64, 0, Layout::kNCHW, unbiased, kSpl);
    statistics_case<__half>(3, 5, 49, 0, Layout::kNCHW, unbiased, kStg);
    statistics_case<float>(3, 50, 9, 0, Layout::kNCHW, unbiased, kStg);  // register instance
    statistics_case<__nv_bfloat16>(2, 12, 20 * 20, 3, Layout::kNCHW, unbiased, -1);
    statistics_case<float>(2, 64, 16 * 16, 0, Layout::kNHWC, unbiased, -1);
    statistics_case<__half>(2, 320, 8 * 8, 32, Layout::kNHWC, unbiased, -1);
    statistics_case<float>(1, 8, 512 * 512, 0, Layout::kNHWC, unbiased, -1);
  }
}

}  // namespace
