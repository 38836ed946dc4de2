// PyTorch binding of instnorm: four custom ops registered with torch.library (schemas below)
// for CUDA tensors: instnorm_torch::forward (updates the running statistics in place; the
// no-grad path), instnorm_torch::norm (the same forward, functional: the op the Python package
// registers its autograd formula on), instnorm_torch::backward (instnorm's fused backward
// kernel) and instnorm_torch::statistics (per (sample, group) mean and standard deviation, the
// style side of AdaIN). forward, norm and backward take the per-sample modulation (scale,
// shift: (N, C) tensors, rows used in place where their channels are contiguous) and the
// unbiased-variance flag as trailing arguments with defaults (none, off), so calls written for
// the earlier schemas still work. Built with PyTorch's extension flags, which
// define __CUDA_NO_HALF_OPERATORS__ and friends: the headers use conversion intrinsics only.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <instnorm/instnorm.cuh>

#include <cstdarg>
#include <cstdio>
#include <limits>
#include <string>
#include <tuple>

namespace {

// Error messages are formatted here, not by streaming numbers into TORCH_CHECK: on the H200
// machine (PyTorch 2.11, this extension JIT-built with the system compiler) a TORCH_CHECK whose
// message streamed an int64_t or a double ended the process with a segmentation fault, where
// strings, devices and dtypes streamed fine.
std::string format(const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  return std::string(buf);
}

// Validates (no CUDA call), then runs. A refusal reports instnorm's reason and the values it
// judged; a failing CUDA call reports its error.
template <class T>
void run(const at::Tensor& x, at::Tensor& y, int64_t n, int64_t c, int64_t spatial,
         instnorm::Options opt, cudaStream_t stream) {
  const T* px = static_cast<const T*>(x.data_ptr());
  T* py = static_cast<T*>(y.data_ptr());
  const instnorm::Invalid why = instnorm::validate<T>(px, py, n, c, spatial, opt);
  TORCH_CHECK(why == instnorm::Invalid::kOk || why == instnorm::Invalid::kEmpty,
              format("instnorm_torch: %s (n = %lld, c = %lld, spatial = %lld, groups = %lld, "
                     "eps = %g, momentum = %g, activation = %d, use_input_stats = %s, "
                     "scale = %s, shift = %s, unbiased = %s)",
                     instnorm::to_string(why), static_cast<long long>(n),
                     static_cast<long long>(c), static_cast<long long>(spatial),
                     static_cast<long long>(opt.groups), double(opt.eps), double(opt.momentum),
                     static_cast<int>(opt.activation), opt.use_input_stats ? "true" : "false",
                     opt.modulation.scale ? "yes" : "none", opt.modulation.shift ? "yes" : "none",
                     opt.unbiased ? "true" : "false"));
  size_t bytes = 0;
  cudaError_t err = instnorm::workspace_size<T>(n, c, spatial, opt, &bytes, px, py);
  TORCH_CHECK(err == cudaSuccess, "instnorm_torch: workspace_size: ", cudaGetErrorString(err));
  at::Tensor ws;  // from PyTorch's caching allocator: graph-capturable, no cudaMalloc per call
  if (bytes > 0) ws = at::empty({int64_t(bytes)}, x.options().dtype(at::kByte));
  err = instnorm::forward(px, py, n, c, spatial, opt, bytes > 0 ? ws.data_ptr() : nullptr, bytes,
                          stream);
  TORCH_CHECK(err == cudaSuccess, "instnorm_torch: forward: ", cudaGetErrorString(err));
}

// "(2, 3, 5)" (format(), not a stream of int64_t: see format()).
std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i)
    out += format(i ? ", %lld" : "%lld", static_cast<long long>(s[i]));
  return out + (s.size() == 1 ? ",)" : ")");
}

// The Python wrapper makes these checks too; here they keep a direct call of the op from handing
// the kernel a host pointer, another GPU's memory, integer data or a short buffer.
void check_param(const char* name, const c10::optional<at::Tensor>& t, const at::Tensor& x,
                 int64_t c) {
  if (!t || !t->defined()) return;
  TORCH_CHECK(t->device() == x.device(), "instnorm_torch: ", name, " must be on x's device ",
              x.device(), " (got ", t->device(), ")");
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "instnorm_torch: ", name,
              " must have a floating-point dtype (got ", t->scalar_type(), ")");
  TORCH_CHECK(t->numel() == c, format("instnorm_torch: %s must have C = %lld elements (got %lld)",
                                      name, static_cast<long long>(c),
                                      static_cast<long long>(t->numel())));
}

bool given(const c10::optional<at::Tensor>& t) { return t && t->defined(); }

// scale / shift: on x's device, floating point, (N, C) (the Python wrapper views (N, C, 1, ...)
// as (N, C) before the call).
void check_modulation(const char* name, const c10::optional<at::Tensor>& t, const at::Tensor& x,
                      int64_t n, int64_t c) {
  if (!given(t)) return;
  TORCH_CHECK(t->device() == x.device(), "instnorm_torch: ", name, " must be on x's device ",
              x.device(), " (got ", t->device(), ")");
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "instnorm_torch: ", name,
              " must have a floating-point dtype (got ", t->scalar_type(), ")");
  TORCH_CHECK(t->dim() == 2 && t->size(0) == n && t->size(1) == c,
              format("instnorm_torch: %s must have shape (N, C) = (%lld, %lld) (got ", name,
                     static_cast<long long>(n), static_cast<long long>(c)),
              shape_str(t->sizes()), ")");
}

// A modulation tensor as the kernel reads it: element (i, j) at data[i * stride + j]. The
// caller's tensor itself where its channels are contiguous and its rows do not overlap (the
// halves of emb.chunk(2, dim=1): stride 2C), else a contiguous copy (stride 0 means C).
at::Tensor modulation_rows(const at::Tensor& t, int64_t c, int64_t* stride) {
  const bool rows_ok = (t.size(1) <= 1 || t.stride(1) == 1) &&
                       (t.size(0) <= 1 || t.stride(0) >= c);
  if (rows_ok) {
    *stride = t.size(0) <= 1 ? 0 : t.stride(0);
    return t;
  }
  *stride = 0;
  return t.contiguous();
}

// What the four ops share: x's checks, its layout (contiguous -> NCHW, channels-last ->
// NHWC without a copy, anything else made contiguous), and the Options every call fills the
// same way from the arguments. The running statistics and the saved ones are each op's own.
struct Call {
  at::Tensor x, w, b;  // x in the layout the kernel reads; gamma/beta as the kernel reads them
  at::Tensor scale, shift;  // the modulation as the kernel reads it (kept alive for the call)
  int64_t n = 0, c = 0, spatial = 0, G = 0;
  bool has_running = false;
  instnorm::Options opt;
};

void check_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "instnorm_torch: x must be a CUDA tensor (got ", x.device(), ")");
}

Call prepare(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
             const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
             const c10::optional<at::Tensor>& running_var, bool use_input_stats, double momentum,
             double eps, int64_t groups, int64_t activation) {
  check_cuda(x_in);
  TORCH_CHECK(x_in.dim() >= 2, format("instnorm_torch: x must be (N, C, ...) (got %lld dimensions)",
                                      static_cast<long long>(x_in.dim())));
  const auto st = x_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "instnorm_torch: x must be float32, float16 or bfloat16 (got ", st, ")");
  Call k;
  k.n = x_in.size(0);
  k.c = x_in.size(1);
  check_param("weight", weight, x_in, k.c);
  check_param("bias", bias, x_in, k.c);
  check_param("running_mean", running_mean, x_in, k.c);
  check_param("running_var", running_var, x_in, k.c);
  k.has_running = running_mean && running_mean->defined();
  TORCH_CHECK(k.has_running == (running_var && running_var->defined()),
              "instnorm_torch: running_mean and running_var must both be given or both be None");
  k.spatial = k.n * k.c == 0 ? 0 : x_in.numel() / (k.n * k.c);
  k.G = groups == 0 ? k.c : groups;
  k.x = x_in;
  const auto cl = k.x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                  : k.x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                   : at::MemoryFormat::Contiguous;
  if (k.x.is_contiguous()) {
    k.opt.layout = instnorm::Layout::kNCHW;
  } else if (cl != at::MemoryFormat::Contiguous && k.x.is_contiguous(cl)) {
    k.opt.layout = instnorm::Layout::kNHWC;  // channels-last: no copy
  } else {
    k.x = k.x.contiguous();
  }
  k.opt.eps = static_cast<float>(eps);
  k.opt.groups = groups;
  k.opt.momentum = static_cast<float>(momentum);
  k.opt.use_input_stats = use_input_stats;
  k.opt.activation = static_cast<instnorm::Activation>(activation);
  // gamma/beta: float32, or x's type; anything else is converted to float32.
  const bool same = (!weight || weight->scalar_type() == st) && (!bias || bias->scalar_type() == st);
  if (weight && weight->defined()) k.w = (same ? *weight : weight->to(at::kFloat)).contiguous();
  if (bias && bias->defined()) k.b = (same ? *bias : bias->to(at::kFloat)).contiguous();
  k.opt.param_type = same && st != at::kFloat ? instnorm::ParamType::kSameAsInput
                                              : instnorm::ParamType::kFloat;
  if (k.w.defined()) k.opt.gamma = k.w.data_ptr();
  if (k.b.defined()) k.opt.beta = k.b.data_ptr();
  return k;
}

// The per-sample modulation and the unbiased variance, after prepare(): scale/shift checked,
// of one element type for the kernel (x's where both are, else float32: float32 tensors are
// used as they are, others converted), rows in place where their channels are contiguous.
void set_modulation(Call& k, const c10::optional<at::Tensor>& scale,
                    const c10::optional<at::Tensor>& shift, bool one_plus_scale, bool unbiased) {
  k.opt.unbiased = unbiased;
  check_modulation("scale", scale, k.x, k.n, k.c);
  check_modulation("shift", shift, k.x, k.n, k.c);
  if (!given(scale) && !given(shift)) return;
  const auto st = k.x.scalar_type();
  const bool same = (!given(scale) || scale->scalar_type() == st) &&
                    (!given(shift) || shift->scalar_type() == st);
  const auto want = same ? st : at::kFloat;
  instnorm::Modulation& m = k.opt.modulation;
  m.type = want == at::kFloat ? instnorm::ParamType::kFloat : instnorm::ParamType::kSameAsInput;
  m.one_plus_scale = one_plus_scale;
  if (given(scale)) {
    k.scale = modulation_rows(scale->to(want), k.c, &m.scale_stride);
    m.scale = k.scale.data_ptr();
  }
  if (given(shift)) {
    k.shift = modulation_rows(shift->to(want), k.c, &m.shift_stride);
    m.shift = k.shift.data_ptr();
  }
}

// A float32 contiguous tensor of t's values: t itself where it is one already.
at::Tensor as_f32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// The forward with the statistics outputs of every op: (y, mean, rstd), mean and rstd (n, G)
// float32, the statistics the normalize used (the running ones, per channel, in eval mode).
// opt.running_mean/running_var are the caller's (read, and updated when use_input_stats).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_forward(Call& k) {
  at::Tensor y = at::empty_like(k.x);  // keeps x's memory format; never x itself (no in place)
  auto fopts = k.x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({k.n, k.G}, fopts), rstd = at::empty({k.n, k.G}, fopts);
  k.opt.save_mean = mean.data_ptr<float>();
  k.opt.save_rstd = rstd.data_ptr<float>();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (k.x.scalar_type()) {
    case at::kHalf: run<__half>(k.x, y, k.n, k.c, k.spatial, k.opt, stream); break;
    case at::kBFloat16: run<__nv_bfloat16>(k.x, y, k.n, k.c, k.spatial, k.opt, stream); break;
    default: run<float>(k.x, y, k.n, k.c, k.spatial, k.opt, stream); break;
  }
  return {y, mean, rstd};
}

// instnorm_torch::forward: returns (y, mean, rstd) and updates running_mean/running_var in
// place (use_input_stats); with unbiased, rstd is 1/sqrt(unbiased variance + eps). Mutable, so
// it has no autograd formula: the package calls it when no gradient is needed (inference,
// no_grad, frozen layers).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool use_input_stats, double momentum,
    double eps, int64_t groups, int64_t activation, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, bool one_plus_scale, bool unbiased) {
  check_cuda(x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  Call k = prepare(x_in, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                   groups, activation);
  set_modulation(k, scale, shift, one_plus_scale, unbiased);
  // Running statistics: float32 contiguous views, or float32 copies written back afterwards.
  at::Tensor rm, rv;
  if (k.has_running) {
    rm = as_f32(*running_mean);
    rv = as_f32(*running_var);
    k.opt.running_mean = rm.data_ptr<float>();
    k.opt.running_var = rv.data_ptr<float>();
  }
  auto out = run_forward(k);
  if (k.has_running && use_input_stats) {
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return out;
}

// instnorm_torch::norm: the functional forward, which the autograd formula is registered on
// (torch.library.register_autograd refuses an op that mutates its arguments). Returns
// (y, mean, rstd, new_running_mean, new_running_var): with running statistics and
// use_input_stats, the kernel updates float32 copies of them, returned (c,) for the caller to
// copy back; otherwise those two are empty (0,) float32 and the running statistics are only read
// (use_input_stats false).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_functional(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool use_input_stats, double momentum,
    double eps, int64_t groups, int64_t activation, const c10::optional<at::Tensor>& scale,
    const c10::optional<at::Tensor>& shift, bool one_plus_scale, bool unbiased) {
  check_cuda(x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  Call k = prepare(x_in, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                   groups, activation);
  set_modulation(k, scale, shift, one_plus_scale, unbiased);
  const auto fopts = k.x.options().dtype(at::kFloat);
  at::Tensor rm = at::empty({0}, fopts), rv = at::empty({0}, fopts);
  at::Tensor rm_read, rv_read;
  if (k.has_running) {
    if (use_input_stats) {  // updated: fresh copies, never the caller's tensors
      rm = running_mean->to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
      rv = running_var->to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
      k.opt.running_mean = rm.data_ptr<float>();
      k.opt.running_var = rv.data_ptr<float>();
    } else {  // read only
      rm_read = as_f32(*running_mean);
      rv_read = as_f32(*running_var);
      k.opt.running_mean = rm_read.data_ptr<float>();
      k.opt.running_var = rv_read.data_ptr<float>();
    }
  }
  auto [y, mean, rstd] = run_forward(k);
  return {y, mean, rstd, rm, rv};
}

// Validates (no CUDA call), then runs the fused backward.
template <class T>
void run_backward(const at::Tensor& x, const at::Tensor& dy, at::Tensor& dx, const Call& k,
                  const instnorm::Gradients& grads, cudaStream_t stream) {
  const T* px = static_cast<const T*>(x.data_ptr());
  const T* pdy = static_cast<const T*>(dy.data_ptr());
  T* pdx = static_cast<T*>(dx.data_ptr());
  const instnorm::Invalid why =
      instnorm::validate_backward<T>(px, pdy, pdx, k.n, k.c, k.spatial, k.opt, grads);
  if (why == instnorm::Invalid::kEmpty) return;
  TORCH_CHECK(why == instnorm::Invalid::kOk,
              format("instnorm_torch: backward: %s (n = %lld, c = %lld, spatial = %lld, "
                     "groups = %lld, eps = %g, activation = %d, use_input_stats = %s, "
                     "scale = %s, shift = %s, unbiased = %s)",
                     instnorm::to_string(why), static_cast<long long>(k.n),
                     static_cast<long long>(k.c), static_cast<long long>(k.spatial),
                     static_cast<long long>(k.opt.groups), double(k.opt.eps),
                     static_cast<int>(k.opt.activation), k.opt.use_input_stats ? "true" : "false",
                     k.opt.modulation.scale ? "yes" : "none",
                     k.opt.modulation.shift ? "yes" : "none", k.opt.unbiased ? "true" : "false"));
  size_t bytes = 0;
  cudaError_t err = instnorm::backward_workspace_size<T>(k.n, k.c, k.spatial, k.opt, grads,
                                                         &bytes, px, pdy, pdx);
  TORCH_CHECK(err == cudaSuccess, "instnorm_torch: backward_workspace_size: ",
              cudaGetErrorString(err));
  at::Tensor ws;  // from PyTorch's caching allocator: graph-capturable, no cudaMalloc per call
  if (bytes > 0) ws = at::empty({int64_t(bytes)}, x.options().dtype(at::kByte));
  err = instnorm::backward(px, pdy, pdx, k.n, k.c, k.spatial, k.opt, grads,
                           bytes > 0 ? ws.data_ptr() : nullptr, bytes, stream);
  TORCH_CHECK(err == cudaSuccess, "instnorm_torch: backward: ", cudaGetErrorString(err));
}

void check_stats(const char* name, const at::Tensor& t, const at::Tensor& x, int64_t count) {
  TORCH_CHECK(t.device() == x.device(), "instnorm_torch: backward: ", name,
              " must be on x's device ", x.device(), " (got ", t.device(), ")");
  TORCH_CHECK(t.scalar_type() == at::kFloat, "instnorm_torch: backward: ", name,
              " must be float32 (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.numel() == count,
              format("instnorm_torch: backward: %s must have N * G = %lld elements (got %lld)",
                     name, static_cast<long long>(count), static_cast<long long>(t.numel())));
}

// instnorm_torch::backward: the gradient of norm/forward called with the same arguments, from
// the forward's saved mean and rstd (read when use_input_stats) or the running statistics (read
// when not). Returns (dx, dweight, dbias, dscale, dshift): dx of x's dtype in the layout the
// forward read x in; dweight/dbias float32 (C,) where weight_grad/bias_grad ask for them, else
// empty (0,); dscale/dshift float32 (N, C) where scale_grad/shift_grad ask for them, else empty
// (0,). dweight is the gradient of a weight of ones where weight is None; dscale, where scale is
// None, that of a scale of zeros (one_plus_scale) or of ones (otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_fused(
    const at::Tensor& x_in, const at::Tensor& dy_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, const at::Tensor& mean, const at::Tensor& rstd,
    bool use_input_stats, double eps, int64_t groups, int64_t activation, bool weight_grad,
    bool bias_grad, const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
    bool one_plus_scale, bool unbiased, bool scale_grad, bool shift_grad) {
  check_cuda(x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  Call k = prepare(x_in, weight, bias, running_mean, running_var, use_input_stats, 0.0, eps,
                   groups, activation);
  set_modulation(k, scale, shift, one_plus_scale, unbiased);
  TORCH_CHECK(dy_in.device() == k.x.device(), "instnorm_torch: backward: dy must be on x's device ",
              k.x.device(), " (got ", dy_in.device(), ")");
  TORCH_CHECK(dy_in.scalar_type() == k.x.scalar_type(),
              "instnorm_torch: backward: dy must have x's dtype ", k.x.scalar_type(), " (got ",
              dy_in.scalar_type(), ")");
  TORCH_CHECK(dy_in.sizes() == k.x.sizes(), "instnorm_torch: backward: dy must have x's shape ",
              shape_str(k.x.sizes()), " (got ", shape_str(dy_in.sizes()), ")");
  // dy in the layout the kernel reads x in (a gradient may come expanded or in any strides).
  at::Tensor dy;
  if (k.opt.layout == instnorm::Layout::kNHWC)
    dy = dy_in.contiguous(k.x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                         : at::MemoryFormat::ChannelsLast3d);
  else
    dy = dy_in.contiguous();
  at::Tensor m, r, rm, rv;
  if (use_input_stats) {
    if (k.G > 0 && k.c % k.G == 0) {  // else validate_backward names the bad groups
      check_stats("mean", mean, k.x, k.n * k.G);
      check_stats("rstd", rstd, k.x, k.n * k.G);
    }
    m = mean.contiguous();
    r = rstd.contiguous();
    k.opt.save_mean = m.data_ptr<float>();
    k.opt.save_rstd = r.data_ptr<float>();
  } else {
    TORCH_CHECK(k.has_running, "instnorm_torch: backward: running_mean and running_var are "
                               "required when use_input_stats is false");
  }
  if (k.has_running && !use_input_stats) {  // read only; unused with use_input_stats
    rm = as_f32(*running_mean);
    rv = as_f32(*running_var);
    k.opt.running_mean = rm.data_ptr<float>();
    k.opt.running_var = rv.data_ptr<float>();
  }
  at::Tensor dx = at::empty_like(k.x);  // x's layout (empty_like keeps a dense x's strides)
  const auto fopts = k.x.options().dtype(at::kFloat);
  at::Tensor dw = at::empty({weight_grad ? k.c : 0}, fopts);
  at::Tensor db = at::empty({bias_grad ? k.c : 0}, fopts);
  at::Tensor ds = scale_grad ? at::empty({k.n, k.c}, fopts) : at::empty({0}, fopts);
  at::Tensor dt = shift_grad ? at::empty({k.n, k.c}, fopts) : at::empty({0}, fopts);
  instnorm::Gradients grads;
  if (weight_grad) grads.dgamma = dw.data_ptr<float>();
  if (bias_grad) grads.dbeta = db.data_ptr<float>();
  if (scale_grad) grads.dscale = ds.data_ptr<float>();
  if (shift_grad) grads.dshift = dt.data_ptr<float>();
  if (k.x.numel() == 0) {  // nothing to normalize: the parameters' gradients are zero
    dw.zero_();
    db.zero_();
    ds.zero_();
    dt.zero_();
    return {dx, dw, db, ds, dt};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (k.x.scalar_type()) {
    case at::kHalf: run_backward<__half>(k.x, dy, dx, k, grads, stream); break;
    case at::kBFloat16: run_backward<__nv_bfloat16>(k.x, dy, dx, k, grads, stream); break;
    default: run_backward<float>(k.x, dy, dx, k, grads, stream); break;
  }
  return {dx, dw, db, ds, dt};
}

template <class T>
void run_statistics(const Call& k, at::Tensor& mean, at::Tensor& stddev, cudaStream_t stream) {
  const T* px = static_cast<const T*>(k.x.data_ptr());
  instnorm::Problem prob;
  const instnorm::Invalid why = instnorm::validate_statistics(
      px, mean.data_ptr<float>(), stddev.data_ptr<float>(), k.n, k.c, k.spatial,
      int(sizeof(T)), k.opt, &prob);
  if (why == instnorm::Invalid::kEmpty) {  // planes of no element: NaN, as torch.var_mean
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    stddev.fill_(std::numeric_limits<float>::quiet_NaN());
    return;
  }
  TORCH_CHECK(why == instnorm::Invalid::kOk,
              format("instnorm_torch: statistics: %s (n = %lld, c = %lld, spatial = %lld, "
                     "groups = %lld, eps = %g, unbiased = %s)",
                     instnorm::to_string(why), static_cast<long long>(k.n),
                     static_cast<long long>(k.c), static_cast<long long>(k.spatial),
                     static_cast<long long>(k.opt.groups), double(k.opt.eps),
                     k.opt.unbiased ? "true" : "false"));
  // Scratch (cooperative plans of few, very large planes only) is taken stream-ordered by the
  // library (cudaMallocAsync): statistics() has no caller-workspace form.
  const cudaError_t err = instnorm::statistics(px, mean.data_ptr<float>(),
                                               stddev.data_ptr<float>(), k.n, k.c, k.spatial,
                                               k.opt, stream);
  TORCH_CHECK(err == cudaSuccess, "instnorm_torch: statistics: ", cudaGetErrorString(err));
}

// instnorm_torch::statistics: (mean, stddev), float32 (N, G) (G = C for groups 0): the mean of
// each (sample, group) and sqrt(var + eps), var the biased variance or, with unbiased, the
// unbiased one. One read of x, in its layout (contiguous or channels-last, no copy).
std::tuple<at::Tensor, at::Tensor> statistics_op(const at::Tensor& x_in, int64_t groups,
                                                 double eps, bool unbiased) {
  check_cuda(x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  Call k = prepare(x_in, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, true, 0.0, eps,
                   groups, 0);
  k.opt.unbiased = unbiased;
  // The outputs' shape depends on groups: refuse a bad one before allocating them.
  TORCH_CHECK(k.G >= 0 && (k.G == 0 || k.c % k.G == 0),
              format("instnorm_torch: statistics: %s (c = %lld, groups = %lld)",
                     instnorm::to_string(k.G < 0 ? instnorm::Invalid::kNegativeSize
                                                 : instnorm::Invalid::kBadGroups),
                     static_cast<long long>(k.c), static_cast<long long>(groups)));
  const auto fopts = k.x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({k.n, k.G}, fopts), stddev = at::empty({k.n, k.G}, fopts);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (k.x.scalar_type()) {
    case at::kHalf: run_statistics<__half>(k, mean, stddev, stream); break;
    case at::kBFloat16: run_statistics<__nv_bfloat16>(k, mean, stddev, stream); break;
    default: run_statistics<float>(k, mean, stddev, stream); break;
  }
  return {mean, stddev};
}

}  // namespace

TORCH_LIBRARY(instnorm_torch, m) {
  // The modulation and the unbiased variance are trailing arguments with defaults: calls written
  // for the earlier schemas (no modulation) run unchanged.
  m.def(
      "forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool use_input_stats, float momentum, float eps, int groups, "
      "int activation, Tensor? scale=None, Tensor? shift=None, bool one_plus_scale=False, "
      "bool unbiased=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
      "bool use_input_stats, float momentum, float eps, int groups, int activation, "
      "Tensor? scale=None, Tensor? shift=None, bool one_plus_scale=False, bool unbiased=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor x, Tensor dy, Tensor? weight, Tensor? bias, Tensor? running_mean, "
      "Tensor? running_var, Tensor mean, Tensor rstd, bool use_input_stats, float eps, "
      "int groups, int activation, bool weight_grad, bool bias_grad, Tensor? scale=None, "
      "Tensor? shift=None, bool one_plus_scale=False, bool unbiased=False, "
      "bool scale_grad=False, bool shift_grad=False) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("statistics(Tensor x, int groups, float eps, bool unbiased) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(instnorm_torch, CUDA, m) {
  m.impl("forward", &forward);
  m.impl("norm", &norm_functional);
  m.impl("backward", &backward_fused);
  m.impl("statistics", &statistics_op);
}
