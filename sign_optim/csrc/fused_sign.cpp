// AddSign and PowerSign in one pass over memory: the operator sign_optim::fused_sign_.
//
// For each element, with g' = maximize ? -g : g, w = 1 - beta and the parameter's row (keep, k0, ka, kb) of
// `coefficients` (keep = 1 - lr wd, k = -lr (c0, a, b): the coefficient form of sign_optim.functional):
//   m <- lerp(m, g', w)                                          (torch.lerp's two formulas, switching at w = 0.5)
//   p <- keep p + k0 g' + ka sign(m) |g'| + kb |sign(m)| g'     (each term added in this order)
// which is the single-tensor path's arithmetic, in its order. Reads p, g, m; writes p, m: 5 numbers.
//
// The operator receives the tensor lists, as torch's own fused optimizers do (torch._fused_adam_), and checks
// every argument natively before it touches any memory: device, layout, contiguity, dtype, size, storage, a
// finite coefficient table, and no memory shared between a tensor it writes (params, exp_avgs, state_steps) and
// any other argument (the loops read through restrict pointers). So it reads and writes only memory that is
// valid at this call; no pointer outlives the call. A refused call raises ValueError/TypeError
// (TORCH_CHECK_VALUE/TYPE) and changes nothing. The step counters (1-element float32 or float64 CPU tensors)
// advance by 1 in the same call. With torch's gradient-scaler flag `found_inf` non-zero (optional, a 1-element
// tensor on the parameters' device) the checked call changes nothing, as torch's fused optimizers skip.
//
// Autograd: the operator is an in-place update without a derivative, with kernels for torch's autograd keys
// (ADInplaceOrView bumps the version counter of every tensor it writes, so a backward through a graph that
// saved a parameter raises, as after torch's in-place ops; Autograd refuses a tensor that requires grad while
// grad mode is on). The Meta kernel (sign_optim.fused: the fake implementation of torch.compile) runs the
// same metadata checks, so a meta tensor among CPU tensors is refused instead of silently doing nothing.
//
// float32 and float64 parameters keep their moving average in their dtype; float16 and bfloat16 ones keep it in
// float32 and are updated in float32, rounded once when stored. The lists may mix dtypes. The work is cut into
// blocks of at most kBlock elements, split evenly by elements across torch's intra-op threads: at::parallel_for is
// OpenMP in torch's CPU builds and header-inline, so this file is compiled and linked with -fopenmp (setup.py)
// and torch.set_num_threads applies (sign_optim._parallel_probe reports the threads a block loop ran on). GCC's
// target_clones builds the float32 loop for AVX-512, AVX2 and baseline x86-64 and picks one when the library
// loads.
//
// The file is also a (trivial) Python extension module, so setuptools builds it like any other; importing it
// registers the operators (TORCH_LIBRARY).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <ATen/core/grad_mode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>
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

// torch.lerp(m, g, w) as torch computes it (aten/src/ATen/native/Lerp.h): m + w (g - m) for |w| < 0.5, else
// g - (g - m) (1 - w), so that w = 1 (beta = 0) gives g exactly. `small` and `omw` = 1 - w are loop invariants
// (the loops are unswitched on `small`).
template <typename T>
inline T lerp(T m, T g, T w, T omw, bool small) {
  const T d = g - m;
  return small ? m + w * d : g - d * omw;
}

// float32: the hot loop (vectorized; `decay_wd`, `small` and the PowerSign term are hoisted out of it)
SIGN_OPTIM_CLONES void block_f32(float* __restrict p, const float* __restrict g, float* __restrict m, int64_t n,
                                 float w, float neg, const Coefs& c) {
  const float keep = static_cast<float>(c.keep), k0 = static_cast<float>(c.k0);
  const float ka = static_cast<float>(c.ka), kb = static_cast<float>(c.kb);
  const float omw = 1.0f - w;
  const bool decay_wd = c.keep != 1.0, with_b = c.kb != 0.0, small = w < 0.5f;
  if (!with_b) {
    for (int64_t i = 0; i < n; i++) {
      const float gi = neg * g[i];
      const float mi = lerp(m[i], gi, w, omw, small);
      float pi = decay_wd ? p[i] * keep : p[i];
      pi = pi + k0 * gi;
      pi = pi + ka * (sgn(mi) * std::fabs(gi));
      m[i] = mi;
      p[i] = pi;
    }
  } else {
    for (int64_t i = 0; i < n; i++) {
      const float gi = neg * g[i];
      const float mi = lerp(m[i], gi, w, omw, small);
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
  const bool decay_wd = c.keep != 1.0, small = w < 0.5;
  const double omw = 1.0 - w;
  for (int64_t i = 0; i < n; i++) {
    const double gi = neg * g[i];
    const double mi = lerp(m[i], gi, w, omw, small);
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
  const float omw = 1.0f - w;
  const bool decay_wd = c.keep != 1.0, small = w < 0.5f;
  for (int64_t i = 0; i < n; i++) {
    const float gi = neg * static_cast<float>(g[i]);
    const float mi = lerp(m[i], gi, w, omw, small);
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

// The checks of one tensor. `real`: a call with data (not the Meta kernel / torch.compile's fake tensors), where
// the storage must be there. A subclass such as DTensor never reaches here: the dispatcher routes it to its own
// __torch_dispatch__.
void check_memory(const at::Tensor& t, const char* what, int64_t k, c10::DeviceType device, bool real) {
  TORCH_CHECK_VALUE(t.defined(), "sign_optim fused step: ", what, "[", k, "] is undefined");
  TORCH_CHECK_VALUE(t.device().type() == device, "sign_optim fused step: ", what, "[", k, "] is on ", t.device(),
                    ", the call's device is ", c10::DeviceTypeName(device, /*lower_case=*/true),
                    " (params[0]'s): the tensors of one call must be on one device");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "sign_optim fused step: ", what, "[", k, "] has layout ", t.layout(),
                    ", the kernel takes strided tensors");
  TORCH_CHECK_VALUE(t.is_contiguous(), "sign_optim fused step: ", what, "[", k,
                    "] is not contiguous (the kernel takes contiguous tensors)");
  if (real) {
    TORCH_CHECK_VALUE(t.numel() == 0 || (t.has_storage() && t.data_ptr() != nullptr), "sign_optim fused step: ",
                      what, "[", k, "] has no storage");
  }
}

// A tensor the operator writes may be updated in place here only where torch's own in-place ops may.
void check_writable(const at::Tensor& t, const char* what, int64_t k) {
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), "sign_optim fused step: ", what, "[", k,
                    "] is an inference tensor, which may only be updated in place inside torch.inference_mode()");
}

// The storage offsets (in elements) of every element of a strided tensor, sorted.
std::vector<int64_t> element_offsets(const at::Tensor& t) {
  std::vector<int64_t> out{t.storage_offset()};
  for (int64_t d = 0; d < t.dim(); d++) {
    std::vector<int64_t> next;
    next.reserve(out.size() * t.size(d));
    for (const int64_t base : out)
      for (int64_t i = 0; i < t.size(d); i++) next.push_back(base + i * t.stride(d));
    out.swap(next);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Whether two tensors whose byte intervals meet share an element: contiguous ones do; strided views of one
// storage with one element size are compared element by element (two columns of a matrix do not); anything
// else conservatively does.
bool share_elements(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_contiguous() && b.is_contiguous()) return true;
  if (a.element_size() != b.element_size() || !a.storage().is_alias_of(b.storage())) return true;
  const auto x = element_offsets(a), y = element_offsets(b);
  size_t i = 0, j = 0;
  while (i < x.size() && j < y.size()) {
    if (x[i] == y[j]) return true;
    x[i] < y[j] ? i++ : j++;
  }
  return false;
}

// The first pair of tensors that share memory where at least one is written (params, exp_avgs, state_steps; grads
// are only read): {list, index, list, index} (lists numbered 0 params, 1 grads, 2 exp_avgs, 3 state_steps), or {}.
// Tensors without memory here (empty, meta, a wrapper subclass without storage) take no part. One sort of the
// byte intervals per device; only the clusters of intervals that meet (a single tensor, almost always) are
// compared pairwise. The operator's check (all contiguous) and the optimizer's general path use it.
std::vector<int64_t> first_overlap(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList steps) {
  struct Span {
    int64_t device;
    uintptr_t lo, hi;
    int64_t list, k;
  };
  const at::TensorList lists[] = {params, grads, exp_avgs, steps};
  std::vector<Span> spans;
  spans.reserve(3 * params.size() + steps.size());
  for (int64_t l = 0; l < 4; l++) {
    for (int64_t k = 0; k < static_cast<int64_t>(lists[l].size()); k++) {
      const at::Tensor& t = lists[l][k];
      if (!t.defined() || t.numel() == 0 || t.is_meta() || !t.has_storage() || t.data_ptr() == nullptr) continue;
      int64_t extent = 1;
      for (int64_t d = 0; d < t.dim(); d++) extent += (t.size(d) - 1) * t.stride(d);
      const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
      const int64_t device = static_cast<int64_t>(t.device().type()) * 65536 + t.device().index() + 1;
      spans.push_back({device, lo, lo + static_cast<uintptr_t>(extent * t.element_size()), l, k});
    }
  }
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return std::tie(a.device, a.lo) < std::tie(b.device, b.lo); });
  size_t first = 0;
  uintptr_t reach = 0;
  for (size_t i = 0; i <= spans.size(); i++) {
    if (i == spans.size() || (i > first && (spans[i].device != spans[first].device || spans[i].lo >= reach))) {
      for (size_t a = first + 1; a < i; a++) {  // the cluster [first, i): intervals that meet
        for (size_t b = first; b < a; b++) {
          const Span &x = spans[a], &y = spans[b];
          if ((x.list != 1 || y.list != 1) && x.lo < y.hi && y.lo < x.hi &&
              share_elements(lists[x.list][x.k], lists[y.list][y.k]))
            return {x.list, x.k, y.list, y.k};
        }
      }
      first = i;
      reach = 0;
    }
    if (i < spans.size()) reach = std::max(reach, spans[i].hi);
  }
  return {};
}

// No memory shared between a tensor the operator writes and any other argument (or another tensor it writes):
// the loops read and write through restrict pointers and blocks run in parallel, so an overlap would be
// undefined behaviour (and a different answer from the other paths).
void check_no_overlap(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList steps) {
  static const char* names[] = {"params", "grads", "exp_avgs", "state_steps"};
  const auto found = first_overlap(params, grads, exp_avgs, steps);
  TORCH_CHECK_VALUE(found.empty(), "sign_optim fused step: ", names[found.empty() ? 0 : found[0]], "[",
                    found.empty() ? 0 : found[1], "] shares memory with ", names[found.empty() ? 0 : found[2]], "[",
                    found.empty() ? 0 : found[3],
                    "]: the operator writes params, exp_avgs and state_steps in place, so none of them may overlap "
                    "another argument (a parameter listed twice, a moving average or gradient that is a view of a "
                    "parameter); pass separate tensors (clone() one)");
}

// Every check of the operator, before any memory is touched. `device`: the kernel's device type; `real`: false for
// the Meta kernel (metadata only: its tensors have no data to read).
void check_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList steps,
                  const at::Tensor& coefficients, double beta, c10::DeviceType device, bool real) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(exp_avgs.size()) == n &&
                        static_cast<int64_t>(steps.size()) == n,
                    "sign_optim fused step: params, grads, exp_avgs and state_steps must have the same length, got ",
                    n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", steps.size());
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0.0 && beta < 1.0, "sign_optim fused step: beta must be in [0, 1), got ",
                    beta);
  // the step counters and the table are host data (read on the host, no device sync); the Meta kernel takes
  // them on the meta device as well
  const auto host = [&](const at::Tensor& t) {
    return t.device().is_cpu() || (!real && t.device().type() == device);
  };
  TORCH_CHECK_VALUE(host(coefficients) && coefficients.scalar_type() == at::kDouble &&
                        coefficients.layout() == at::kStrided && coefficients.dim() == 2 &&
                        coefficients.size(1) == 4 && (coefficients.size(0) == n || coefficients.size(0) == 1) &&
                        coefficients.is_contiguous(),
                    "sign_optim fused step: coefficients must be a contiguous float64 CPU tensor of shape (", n,
                    ", 4) or (1, 4) (keep, k0, ka, kb per parameter), got ", coefficients.scalar_type(), " of shape ",
                    coefficients.sizes(), " on ", coefficients.device());
  for (int64_t k = 0; k < n; k++) {
    const at::Tensor &p = params[k], &g = grads[k], &m = exp_avgs[k], &s = steps[k];
    check_memory(p, "params", k, device, real);
    check_memory(g, "grads", k, device, real);
    check_memory(m, "exp_avgs", k, device, real);
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
    TORCH_CHECK_VALUE(s.defined() && host(s) && s.layout() == at::kStrided && s.numel() == 1 &&
                          (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble) &&
                          (!real || s.has_storage()),
                      "sign_optim fused step: state_steps[", k,
                      "] must be a 1-element float32 or float64 CPU tensor (capturable counters take the foreach "
                      "path)");
  }
  if (!real) return;
  for (int64_t k = 0; k < n; k++) {
    check_writable(params[k], "params", k);
    check_writable(exp_avgs[k], "exp_avgs", k);
    check_writable(steps[k], "state_steps", k);
  }
  // a non-finite coefficient would turn every parameter into inf/NaN: refused with the row that holds it
  const double* coef = coefficients.data_ptr<double>();
  for (int64_t i = 0; i < coefficients.numel(); i++) {
    TORCH_CHECK_VALUE(std::isfinite(coef[i]), "sign_optim fused step: coefficients must be finite, got ", coef[i],
                      " in row ", i / 4, " (keep, k0, ka, kb)");
  }
  check_no_overlap(params, grads, exp_avgs, steps);
}

// The one block scheduler of the operator: each tensor cut into blocks of at most kBlock elements (at multiples of
// kBlock within the tensor, so a result never depends on the thread count), and the blocks split across torch's
// intra-op threads (at::parallel_for, OpenMP: torch.set_num_threads applies) into contiguous runs of equal
// *elements*, not equal block counts: a model's many small biases beside its weight matrices would otherwise load
// the threads unevenly.
// body(k, start, len) handles elements [start, start + len) of tensor k.
template <typename F>
void for_each_block(const std::vector<int64_t>& numels, const F& body) {
  const int64_t n = static_cast<int64_t>(numels.size());
  std::vector<int64_t> first_block(n + 1, 0);
  for (int64_t k = 0; k < n; k++) first_block[k + 1] = first_block[k] + (numels[k] + kBlock - 1) / kBlock;
  const int64_t blocks = first_block[n];
  if (blocks == 0) return;
  std::vector<int64_t> before(blocks + 1, 0);  // before[b]: the elements of blocks [0, b)
  for (int64_t k = 0, b = 0; k < n; k++) {
    for (int64_t start = 0; start < numels[k]; start += kBlock, b++) {
      before[b + 1] = before[b] + std::min(kBlock, numels[k] - start);
    }
  }
  const int64_t total = before[blocks];
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    for (int64_t part = part_begin; part < part_end; part++) {
      // the blocks whose first element falls in this part's share of the elements
      const int64_t lo = std::lower_bound(before.begin(), before.end() - 1, total * part / parts) - before.begin();
      const int64_t hi = std::lower_bound(before.begin(), before.end() - 1, total * (part + 1) / parts) - before.begin();
      int64_t k = std::upper_bound(first_block.begin(), first_block.end(), lo) - first_block.begin() - 1;
      for (int64_t b = lo; b < hi; b++) {
        while (first_block[k + 1] <= b) k++;
        const int64_t start = (b - first_block[k]) * kBlock;
        body(k, start, std::min(kBlock, numels[k] - start));
      }
    }
  });
}

void run_blocks(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, const at::Tensor& coefficients,
                double beta, bool maximize) {
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<int64_t> numels(n);
  for (int64_t k = 0; k < n; k++) numels[k] = params[k].numel();
  const double* coef = coefficients.data_ptr<double>();
  const bool per_param = coefficients.size(0) == n && n != 1;
  const float w32 = static_cast<float>(1.0 - beta), neg32 = maximize ? -1.0f : 1.0f;
  const double w64 = 1.0 - beta, neg64 = maximize ? -1.0 : 1.0;
  for_each_block(numels, [&](int64_t k, int64_t start, int64_t len) {
    const double* row = coef + (per_param ? 4 * k : 0);
    const Coefs c{row[0], row[1], row[2], row[3]};
    void* p = params[k].data_ptr();
    const void* g = grads[k].data_ptr();
    void* m = exp_avgs[k].data_ptr();
    switch (params[k].scalar_type()) {
      case at::kFloat:
        block_f32(static_cast<float*>(p) + start, static_cast<const float*>(g) + start, static_cast<float*>(m) + start,
                  len, w32, neg32, c);
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
  });
}

// torch's fused-optimizer flag (GradScaler): a 1-element tensor; non-zero skips the step. The CPU kernel reads it
// here, as torch's fused CPU Adam does (a CPU tensor: no device to synchronize with, and no Python read).
bool skip_for(const std::optional<at::Tensor>& found_inf, c10::DeviceType device) {
  if (!found_inf.has_value() || !found_inf->defined()) return false;
  TORCH_CHECK_VALUE(found_inf->numel() == 1 && found_inf->device().type() == device,
                    "sign_optim fused step: found_inf must be a 1-element tensor on the parameters' device, got ",
                    found_inf->sizes(), " on ", found_inf->device());
  return found_inf->item().toDouble() != 0.0;
}

void fused_sign_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList state_steps,
                    const at::Tensor& coefficients, double beta, bool maximize,
                    const std::optional<at::Tensor>& found_inf) {
  check_inputs(params, grads, exp_avgs, state_steps, coefficients, beta, c10::DeviceType::CPU, /*real=*/true);
  if (skip_for(found_inf, c10::DeviceType::CPU)) return;  // checked first: a skipped call is still a valid one
  run_blocks(params, grads, exp_avgs, coefficients, beta, maximize);
  for (const at::Tensor& s : state_steps) {  // checked above: 1 element, float32 or float64, CPU
    if (s.scalar_type() == at::kFloat) {
      *s.data_ptr<float>() += 1.0f;
    } else {
      *s.data_ptr<double>() += 1.0;
    }
  }
}

// The checks alone, for the kernels of other devices (the Triton kernel calls it before its launch) and for the
// Meta kernel (`real` false: metadata only).
void check_fused_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList state_steps, const at::Tensor& coefficients, double beta, c10::string_view device,
                        bool real) {
  check_inputs(params, grads, exp_avgs, state_steps, coefficients, beta, c10::Device(std::string(device)).type(), real);
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

// How many distinct threads the operator's block scheduler runs `blocks` blocks of work on (a test and benchmark
// probe: at torch.set_num_threads(t) and enough blocks it is t; 1 when the build lacks OpenMP).
int64_t parallel_probe(int64_t blocks) {
  TORCH_CHECK_VALUE(blocks >= 0, "sign_optim parallel_probe: blocks must be >= 0, got ", blocks);
  std::mutex lock;
  std::set<int> threads;
  std::vector<int64_t> numels(static_cast<size_t>(blocks), kBlock);
  for_each_block(numels, [&](int64_t, int64_t, int64_t) {
    const int id = at::get_thread_num();
    std::lock_guard<std::mutex> guard(lock);
    threads.insert(id);
  });
  return static_cast<int64_t>(threads.size());
}

using FusedSignFn = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, double,
                          bool, const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<FusedSignFn>& fused_sign_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("sign_optim::fused_sign_", "").typed<FusedSignFn>();
  return op;
}

// The Autograd kernel. The operator has no derivative: with grad mode on it takes no tensor that requires grad
// (torch refuses an in-place op on a leaf that requires grad; an optimizer steps under torch.no_grad()).
void fused_sign_autograd(c10::DispatchKeySet keys, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList state_steps, const at::Tensor& coefficients, double beta, bool maximize,
                         const std::optional<at::Tensor>& found_inf) {
  if (at::GradMode::is_enabled()) {
    static const char* names[] = {"params", "grads", "exp_avgs", "state_steps"};
    const at::TensorList lists[] = {params, grads, exp_avgs, state_steps};
    for (int l = 0; l < 4; l++) {
      for (int64_t k = 0; k < static_cast<int64_t>(lists[l].size()); k++) {
        TORCH_CHECK_VALUE(!lists[l][k].defined() || !lists[l][k].requires_grad(), "sign_optim fused step: ",
                          names[l], "[", k, "] requires grad while grad mode is on; the operator updates in place and "
                          "has no derivative: call it under torch.no_grad() (as optimizer.step() does)");
      }
    }
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  fused_sign_op().redispatch(keys & c10::after_autograd_keyset, params, grads, exp_avgs, state_steps, coefficients,
                             beta, maximize, found_inf);
}

// The ADInplaceOrView kernel: the operator below it, then the version counter of every tensor it wrote is bumped,
// as torch's in-place operators do, so a backward through a graph that saved one of them raises.
void fused_sign_inplace(c10::DispatchKeySet keys, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList state_steps, const at::Tensor& coefficients, double beta, bool maximize,
                        const std::optional<at::Tensor>& found_inf) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    fused_sign_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, params, grads, exp_avgs, state_steps,
                               coefficients, beta, maximize, found_inf);
  }
  for (const at::TensorList list : {params, exp_avgs, state_steps}) {
    for (const at::Tensor& t : list) {
      if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    }
  }
}

}  // namespace

TORCH_LIBRARY(sign_optim, m) {
  m.def(
      "fused_sign_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] state_steps, "
      "Tensor coefficients, float beta, bool maximize, Tensor? found_inf=None) -> ()");
  m.def(
      "check_fused_inputs(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] state_steps, "
      "Tensor coefficients, float beta, str device, bool real=True) -> ()",
      &check_fused_inputs);
  m.def("step_values(Tensor[] steps) -> Tensor");
  m.def("_parallel_probe(int blocks) -> int", &parallel_probe);
  m.def("_first_overlap(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] state_steps) -> int[]",
        &first_overlap);
}

TORCH_LIBRARY_IMPL(sign_optim, CPU, m) {
  m.impl("fused_sign_", &fused_sign_cpu);
  m.impl("step_values", &step_values);
}

// An in-place operator without a derivative: no tensor that requires grad while grad mode is on (Autograd), and
// the version counters of the written tensors are bumped (ADInplaceOrView).
TORCH_LIBRARY_IMPL(sign_optim, Autograd, m) {
  m.impl("fused_sign_", TORCH_FN(fused_sign_autograd));
}

TORCH_LIBRARY_IMPL(sign_optim, ADInplaceOrView, m) {
  m.impl("fused_sign_", TORCH_FN(fused_sign_inplace));
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                    "sign_optim's native operators (registered with torch.library at import).", -1,
                                    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
