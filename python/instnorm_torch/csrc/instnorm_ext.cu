// PyTorch binding of instnorm: one custom op, instnorm_torch::forward, registered with
// torch.library (schema below) for CUDA tensors. Built with PyTorch's extension flags, which
// define __CUDA_NO_HALF_OPERATORS__ and friends: the headers use conversion intrinsics only.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <instnorm/instnorm.cuh>

#include <cstdarg>
#include <cstdio>
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
                     "eps = %g, momentum = %g, activation = %d, use_input_stats = %s)",
                     instnorm::to_string(why), static_cast<long long>(n),
                     static_cast<long long>(c), static_cast<long long>(spatial),
                     static_cast<long long>(opt.groups), double(opt.eps), double(opt.momentum),
                     static_cast<int>(opt.activation), opt.use_input_stats ? "true" : "false"));
  size_t bytes = 0;
  cudaError_t err = instnorm::workspace_size<T>(n, c, spatial, opt, &bytes, px, py);
  TORCH_CHECK(err == cudaSuccess, "instnorm_torch: workspace_size: ", cudaGetErrorString(err));
  at::Tensor ws;  // from PyTorch's caching allocator: graph-capturable, no cudaMalloc per call
  if (bytes > 0) ws = at::empty({int64_t(bytes)}, x.options().dtype(at::kByte));
  err = instnorm::forward(px, py, n, c, spatial, opt, bytes > 0 ? ws.data_ptr() : nullptr, bytes,
                          stream);
  TORCH_CHECK(err == cudaSuccess, "instnorm_torch: forward: ", cudaGetErrorString(err));
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

// Returns (y, mean, rstd): mean and rstd are (n, G) float32, the statistics the normalize used
// (the running ones, per channel, in eval mode).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool use_input_stats, double momentum,
    double eps, int64_t groups, int64_t activation) {
  TORCH_CHECK(x_in.is_cuda(), "instnorm_torch: x must be a CUDA tensor (got ", x_in.device(), ")");
  TORCH_CHECK(x_in.dim() >= 2, format("instnorm_torch: x must be (N, C, ...) (got %lld dimensions)",
                                      static_cast<long long>(x_in.dim())));
  const auto st = x_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "instnorm_torch: x must be float32, float16 or bfloat16 (got ", st, ")");
  c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t n = x_in.size(0), c = x_in.size(1);
  check_param("weight", weight, x_in, c);
  check_param("bias", bias, x_in, c);
  check_param("running_mean", running_mean, x_in, c);
  check_param("running_var", running_var, x_in, c);
  const bool has_running = running_mean && running_mean->defined();
  TORCH_CHECK(has_running == (running_var && running_var->defined()),
              "instnorm_torch: running_mean and running_var must both be given or both be None");
  const int64_t spatial = n * c == 0 ? 0 : x_in.numel() / (n * c);
  instnorm::Options opt;
  at::Tensor x = x_in;
  const auto cl = x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                  : x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                 : at::MemoryFormat::Contiguous;
  if (x.is_contiguous()) {
    opt.layout = instnorm::Layout::kNCHW;
  } else if (cl != at::MemoryFormat::Contiguous && x.is_contiguous(cl)) {
    opt.layout = instnorm::Layout::kNHWC;  // channels-last: no copy
  } else {
    x = x.contiguous();
  }
  at::Tensor y = at::empty_like(x);  // keeps x's memory format
  const int64_t G = groups == 0 ? c : groups;
  auto fopts = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({n, G}, fopts), rstd = at::empty({n, G}, fopts);
  opt.eps = static_cast<float>(eps);
  opt.groups = groups;
  opt.momentum = static_cast<float>(momentum);
  opt.use_input_stats = use_input_stats;
  opt.activation = static_cast<instnorm::Activation>(activation);
  opt.save_mean = mean.data_ptr<float>();
  opt.save_rstd = rstd.data_ptr<float>();
  // gamma/beta: float32, or x's type; anything else is converted to float32.
  at::Tensor w, b;
  const bool same = (!weight || weight->scalar_type() == st) && (!bias || bias->scalar_type() == st);
  if (weight && weight->defined()) w = (same ? *weight : weight->to(at::kFloat)).contiguous();
  if (bias && bias->defined()) b = (same ? *bias : bias->to(at::kFloat)).contiguous();
  opt.param_type = same && st != at::kFloat ? instnorm::ParamType::kSameAsInput
                                            : instnorm::ParamType::kFloat;
  if (w.defined()) opt.gamma = w.data_ptr();
  if (b.defined()) opt.beta = b.data_ptr();
  // Running statistics: float32 contiguous views, or float32 copies written back afterwards.
  at::Tensor rm, rv;
  if (has_running) {
    auto as_f32 = [](const at::Tensor& t) {
      return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
    };
    rm = as_f32(*running_mean);
    rv = as_f32(*running_var);
    opt.running_mean = rm.data_ptr<float>();
    opt.running_var = rv.data_ptr<float>();
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (st) {
    case at::kHalf: run<__half>(x, y, n, c, spatial, opt, stream); break;
    case at::kBFloat16: run<__nv_bfloat16>(x, y, n, c, spatial, opt, stream); break;
    default: run<float>(x, y, n, c, spatial, opt, stream); break;
  }
  if (has_running && use_input_stats) {
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return {y, mean, rstd};
}

}  // namespace

TORCH_LIBRARY(instnorm_torch, m) {
  m.def(
      "forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool use_input_stats, float momentum, float eps, int groups, "
      "int activation) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(instnorm_torch, CUDA, m) { m.impl("forward", &forward); }
