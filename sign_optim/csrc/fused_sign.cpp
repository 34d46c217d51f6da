// AddSign and PowerSign in one pass over memory: the operator sign_optim::fused_sign_.
//
// For each element, with g' = maximize ? -g : g and the parameter's row (keep, k0, ka, kb) of `coefficients`
// (keep = 1 - lr wd, k = -lr (c0, a, b): the coefficient form of sign_optim.functional):
//   m <- m + (1 - beta) (g' - m)                                (torch.lerp with weight 1 - beta < 0.5)
//   p <- keep p + k0 g' + ka sign(m) |g'| + kb |sign(m)| g'     (each term added in this order)
// which is the single-tensor path's arithmetic, in its order. Reads p, g, m; writes p, m: 5 numbers.
//
// The operator receives the tensor lists, as torch's own fused optimizers do (torch._fused_adam_), and checks
// every tensor natively before it touches any memory: device, layout, contiguity, dtype, size, storage. So it
// may only read and write memory that is valid at this call; no pointer outlives the call. A refused call raises
// ValueError/TypeError (TORCH_CHECK_VALUE/TYPE) and changes nothing. The step counters (1-element float32 or
// float64 CPU tensors) advance by 1 in the same call.
//
// float32 and float64 parameters keep their moving average in their dtype; float16 and bfloat16 ones keep it in
// float32 and are updated in float32, rounded once when stored. The lists may mix dtypes. The work is split into
// blocks of at most kBlock elements across all tensors, run by torch's intra-op threads (at::parallel_for, so
// torch.set_num_threads applies). GCC's target_clones builds the float32 loop for AVX-512, AVX2 and baseline
// x86-64 and picks one when the library loads.
//
// The file is also a (trivial) Python extension module, so setuptools builds it like any other; importing it
// registers the operators (TORCH_LIBRARY).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 16384;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIGN_OPTIM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SIGN_OPTIM_CLONES
#endif

struct Coefs {
  double keep, k0, ka, kb;
};

template <typename T>
inline T sgn(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

// float32: the hot loop (vectorized; `decay_wd` and the PowerSign term are hoisted out of it)
SIGN_OPTIM_CLONES void block_f32(float* __restrict p, const float* __restrict g, float* __restrict m, int64_t n,
                                 float w, float neg, const Coefs& c) {
  const float keep = static_cast<float>(c.keep), k0 = static_cast<float>(c.k0);
  const float ka = static_cast<float>(c.ka), kb = static_cast<float>(c.kb);
  const bool decay_wd = c.keep != 1.0, with_b = c.kb != 0.0;
  if (!with_b) {
    for (int64_t i = 0; i < n; i++) {
      const float gi = neg * g[i];
      const float mi = m[i] + w * (gi - m[i]);
      float pi = decay_wd ? p[i] * keep : p[i];
      pi = pi + k0 * gi;
      pi = pi + ka * (sgn(mi) * std::fabs(gi));
      m[i] = mi;
      p[i] = pi;
    }
  } else {
    for (int64_t i = 0; i < n; i++) {
      const float gi = neg * g[i];
      const float mi = m[i] + w * (gi - m[i]);
      float pi = decay_wd ? p[i] * keep : p[i];
      const float s = sgn(mi);
      pi = pi + k0 * gi;
      pi = pi + ka * (s * std::fabs(gi));
      pi = pi + kb * (std::fabs(s) * gi);
      m[i] = mi;
      p[i] = pi;
    }
  }
}

void block_f64(double* __restrict p, const double* __restrict g, double* __restrict m, int64_t n, double w,
               double neg, const Coefs& c) {
  const bool decay_wd = c.keep != 1.0;
  for (int64_t i = 0; i < n; i++) {
    const double gi = neg * g[i];
    const double mi = m[i] + w * (gi - m[i]);
    double pi = decay_wd ? p[i] * c.keep : p[i];
    const double s = sgn(mi);
    pi = pi + c.k0 * gi;
    pi = pi + c.ka * (s * std::fabs(gi));
    if (c.kb != 0.0) pi = pi + c.kb * (std::fabs(s) * gi);
    m[i] = mi;
    p[i] = pi;
  }
}

// half precision parameters (c10::Half, c10::BFloat16): float32 average and arithmetic, rounded once when stored
template <typename H>
void block_half(H* __restrict p, const H* __restrict g, float* __restrict m, int64_t n, float w, float neg,
                const Coefs& c) {
  const float keep = static_cast<float>(c.keep), k0 = static_cast<float>(c.k0);
  const float ka = static_cast<float>(c.ka), kb = static_cast<float>(c.kb);
  const bool decay_wd = c.keep != 1.0;
  for (int64_t i = 0; i < n; i++) {
    const float gi = neg * static_cast<float>(g[i]);
    const float mi = m[i] + w * (gi - m[i]);
    float pi = static_cast<float>(p[i]);
    if (decay_wd) pi = pi * keep;
    const float s = sgn(mi);
    pi = pi + k0 * gi;
    pi = pi + ka * (s * std::fabs(gi));
    if (c.kb != 0.0) pi = pi + kb * (std::fabs(s) * gi);
    m[i] = mi;
    p[i] = static_cast<H>(pi);
  }
}

at::ScalarType state_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The memory check of one tensor: plain strided contiguous memory on `device` (a subclass such as DTensor never
// reaches here: the dispatcher routes it to its own __torch_dispatch__; meta tensors go to the Meta kernel).
void check_memory(const at::Tensor& t, const char* what, int64_t k, c10::DeviceType device) {
  TORCH_CHECK_VALUE(t.defined(), "sign_optim fused step: ", what, "[", k, "] is undefined");
  TORCH_CHECK_VALUE(t.device().type() == device, "sign_optim fused step: ", what, "[", k, "] is on ", t.device(),
                    ", the kernel takes ", c10::DeviceTypeName(device, /*lower_case=*/true), " tensors");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "sign_optim fused step: ", what, "[", k, "] has layout ", t.layout(),
                    ", the kernel takes strided tensors");
  TORCH_CHECK_VALUE(t.is_contiguous(), "sign_optim fused step: ", what, "[", k,
                    "] is not contiguous (the kernel takes contiguous tensors)");
  TORCH_CHECK_VALUE(t.numel() == 0 || (t.has_storage() && t.data_ptr() != nullptr), "sign_optim fused step: ", what,
                    "[", k, "] has no storage");
}

// Every check of the operator, before any memory is touched. `device`: the kernel's device type.
void check_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList steps,
                  const at::Tensor& coefficients, c10::DeviceType device) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(exp_avgs.size()) == n &&
                        static_cast<int64_t>(steps.size()) == n,
                    "sign_optim fused step: params, grads, exp_avgs and state_steps must have the same length, got ",
                    n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", steps.size());
  TORCH_CHECK_VALUE(coefficients.device().is_cpu() && coefficients.scalar_type() == at::kDouble &&
                        coefficients.layout() == at::kStrided && coefficients.dim() == 2 &&
                        coefficients.size(1) == 4 && (coefficients.size(0) == n || coefficients.size(0) == 1) &&
                        coefficients.is_contiguous(),
                    "sign_optim fused step: coefficients must be a contiguous float64 CPU tensor of shape (", n,
                    ", 4) or (1, 4) (keep, k0, ka, kb per parameter), got ", coefficients.scalar_type(), " of shape ",
                    coefficients.sizes(), " on ", coefficients.device());
  for (int64_t k = 0; k < n; k++) {
    const at::Tensor &p = params[k], &g = grads[k], &m = exp_avgs[k], &s = steps[k];
    check_memory(p, "params", k, device);
    check_memory(g, "grads", k, device);
    check_memory(m, "exp_avgs", k, device);
    const auto dtype = p.scalar_type();
    TORCH_CHECK_TYPE(kernel_dtype(dtype), "sign_optim fused step: params[", k, "] has dtype ", dtype,
                     ", the kernel takes float32, float64, float16 and bfloat16");
    TORCH_CHECK_TYPE(g.scalar_type() == dtype, "sign_optim fused step: grads[", k, "] has dtype ", g.scalar_type(),
                     ", its parameter ", dtype);
    TORCH_CHECK_TYPE(m.scalar_type() == state_dtype(dtype), "sign_optim fused step: exp_avgs[", k, "] has dtype ",
                     m.scalar_type(), ", a ", dtype, " parameter keeps a ", state_dtype(dtype), " average");
    TORCH_CHECK_VALUE(g.numel() == p.numel() && m.numel() == p.numel(), "sign_optim fused step: params[", k,
                      "] has ", p.numel(), " elements, its gradient ", g.numel(), " and its average ", m.numel());
    TORCH_CHECK_VALUE(g.sizes() == p.sizes() && m.sizes() == p.sizes(), "sign_optim fused step: params[", k,
                      "] has shape ", p.sizes(), ", its gradient ", g.sizes(), " and its average (exp_avgs[", k,
                      "]) ", m.sizes(), "; was the parameter or its state replaced?");
    TORCH_CHECK_VALUE(s.defined() && s.device().is_cpu() && s.layout() == at::kStrided && s.numel() == 1 &&
                          (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble) && s.has_storage(),
                      "sign_optim fused step: state_steps[", k,
                      "] must be a 1-element float32 or float64 CPU tensor (capturable counters take the foreach "
                      "path)");
  }
}

void run_blocks(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, const at::Tensor& coefficients,
                double beta, bool maximize) {
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<int64_t> first_block(n + 1, 0);
  for (int64_t k = 0; k < n; k++) first_block[k + 1] = first_block[k] + (params[k].numel() + kBlock - 1) / kBlock;
  const int64_t blocks = first_block[n];
  const double* coef = coefficients.data_ptr<double>();
  const bool per_param = coefficients.size(0) == n && n != 1;
  const float w32 = static_cast<float>(1.0 - beta), neg32 = maximize ? -1.0f : 1.0f;
  const double w64 = 1.0 - beta, neg64 = maximize ? -1.0 : 1.0;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    int64_t k = std::upper_bound(first_block.begin(), first_block.end(), begin) - first_block.begin() - 1;
    for (int64_t b = begin; b < end; b++) {
      while (first_block[k + 1] <= b) k++;
      const int64_t start = (b - first_block[k]) * kBlock;
      const int64_t len = std::min(kBlock, params[k].numel() - start);
      const double* row = coef + (per_param ? 4 * k : 0);
      const Coefs c{row[0], row[1], row[2], row[3]};
      void* p = params[k].data_ptr();
      const void* g = grads[k].data_ptr();
      void* m = exp_avgs[k].data_ptr();
      switch (params[k].scalar_type()) {
        case at::kFloat:
          block_f32(static_cast<float*>(p) + start, static_cast<const float*>(g) + start,
                    static_cast<float*>(m) + start, len, w32, neg32, c);
          break;
        case at::kDouble:
          block_f64(static_cast<double*>(p) + start, static_cast<const double*>(g) + start,
                    static_cast<double*>(m) + start, len, w64, neg64, c);
          break;
        case at::kHalf:
          block_half(static_cast<c10::Half*>(p) + start, static_cast<const c10::Half*>(g) + start,
                     static_cast<float*>(m) + start, len, w32, neg32, c);
          break;
        default:
          block_half(static_cast<c10::BFloat16*>(p) + start, static_cast<const c10::BFloat16*>(g) + start,
                     static_cast<float*>(m) + start, len, w32, neg32, c);
      }
    }
  });
}

void fused_sign_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList state_steps,
                    const at::Tensor& coefficients, double beta, bool maximize) {
  check_inputs(params, grads, exp_avgs, state_steps, coefficients, c10::DeviceType::CPU);
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0.0 && beta < 1.0, "sign_optim fused step: beta must be in [0, 1), got ",
                    beta);
  run_blocks(params, grads, exp_avgs, coefficients, beta, maximize);
  for (const at::Tensor& s : state_steps) {  // checked above: 1 element, float32 or float64, CPU
    if (s.scalar_type() == at::kFloat) {
      *s.data_ptr<float>() += 1.0f;
    } else {
      *s.data_ptr<double>() += 1.0;
    }
  }
}

// The checks alone, for the kernels of other devices (the Triton kernel calls it before its launch).
void check_fused_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList state_steps, const at::Tensor& coefficients, c10::string_view device) {
  check_inputs(params, grads, exp_avgs, state_steps, coefficients, c10::Device(std::string(device)).type());
}

// The values of step counters (1-element float32/float64 CPU tensors) as one float64 tensor: one call, not one
// .item() per parameter.
at::Tensor step_values(at::TensorList steps) {
  const int64_t n = static_cast<int64_t>(steps.size());
  for (int64_t k = 0; k < n; k++) {
    const at::Tensor& s = steps[k];
    TORCH_CHECK_VALUE(s.defined() && s.device().is_cpu() && s.layout() == at::kStrided && s.numel() == 1 &&
                          (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble) && s.has_storage(),
                      "sign_optim step_values: steps[", k, "] must be a 1-element float32 or float64 CPU tensor");
  }
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  for (int64_t k = 0; k < n; k++)
    o[k] = steps[k].scalar_type() == at::kFloat ? static_cast<double>(*steps[k].data_ptr<float>())
                                                 : *steps[k].data_ptr<double>();
  return out;
}

// The bandwidth reference of benchmarks.bench_sign_optim: the bytes of a step (read p, g, m; write p, m) without
// the arithmetic, on the same threads and blocks as the step. float32 only.
void stream_copy_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(exp_avgs.size()) == n,
                    "sign_optim stream copy: the lists must have the same length");
  for (int64_t k = 0; k < n; k++) {
    check_memory(params[k], "params", k, c10::DeviceType::CPU);
    check_memory(grads[k], "grads", k, c10::DeviceType::CPU);
    check_memory(exp_avgs[k], "exp_avgs", k, c10::DeviceType::CPU);
    TORCH_CHECK_TYPE(params[k].scalar_type() == at::kFloat && grads[k].scalar_type() == at::kFloat &&
                         exp_avgs[k].scalar_type() == at::kFloat,
                     "sign_optim stream copy: float32 tensors only");
    TORCH_CHECK_VALUE(grads[k].numel() == params[k].numel() && exp_avgs[k].numel() == params[k].numel(),
                      "sign_optim stream copy: tensor ", k, " sizes differ");
  }
  std::vector<int64_t> first_block(n + 1, 0);
  for (int64_t k = 0; k < n; k++) first_block[k + 1] = first_block[k] + (params[k].numel() + kBlock - 1) / kBlock;
  at::parallel_for(0, first_block[n], 1, [&](int64_t begin, int64_t end) {
    int64_t k = std::upper_bound(first_block.begin(), first_block.end(), begin) - first_block.begin() - 1;
    for (int64_t b = begin; b < end; b++) {
      while (first_block[k + 1] <= b) k++;
      const int64_t start = (b - first_block[k]) * kBlock;
      const int64_t len = std::min(kBlock, params[k].numel() - start);
      float* __restrict p = params[k].data_ptr<float>() + start;
      float* __restrict m = exp_avgs[k].data_ptr<float>() + start;
      const float* __restrict g = grads[k].data_ptr<float>() + start;
      for (int64_t i = 0; i < len; i++) {
        const float gi = g[i], pi = p[i], mi = m[i];
        p[i] = mi + gi * 0.0f + pi * 0.0f;
        m[i] = pi;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(sign_optim, m) {
  m.def(
      "fused_sign_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] state_steps, "
      "Tensor coefficients, float beta, bool maximize) -> ()");
  m.def(
      "check_fused_inputs(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] state_steps, "
      "Tensor coefficients, str device) -> ()",
      &check_fused_inputs);
  m.def("step_values(Tensor[] steps) -> Tensor");
  m.def("stream_copy_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs) -> ()");
}

TORCH_LIBRARY_IMPL(sign_optim, CPU, m) {
  m.impl("fused_sign_", &fused_sign_cpu);
  m.impl("step_values", &step_values);
  m.impl("stream_copy_", &stream_copy_cpu);
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                    "sign_optim's native operators (registered with torch.library at import).", -1,
                                    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
