// 2-D convolutions for XLA:CPU on oneDNN: forward, input gradient and weight gradient as XLA FFI
// handlers (`covid_flax/cpu_conv/__init__.py` builds this file on first use, registers the
// handlers and wraps them in a jax.custom_vjp).
//
// Arrays arrive in JAX's layouts: activations NHWC, weights HWIO, float32 or bfloat16 (bfloat16
// outputs, float32 accumulation inside oneDNN). Activations stay NHWC, which oneDNN's AVX-512 and
// AMX kernels take directly; weights go to the layout the primitive prefers (a small reorder per
// call). Measured per layer, NHWC beat oneDNN's blocked layouts plus the reorders of activations
// in and out (docs/performance.md), except for weight gradients on a CPU without AVX-512: there
// oneDNN's AVX2 kernel on NHWC runs up to 3.7x slower than the blocked one, so those reorder both
// activations into the primitive's layout (`BlockedWeightGradient`). Primitives are cached by
// shape; every call brings its own scratchpad, so the same primitive can run on several XLA
// threads at once (fake devices). The oneDNN C API is declared below (the subset used, ABI of
// oneDNN 3.x), so no oneDNN headers are needed: the library is `onednn-cpu-gomp` from PyPI, linked
// by path.
#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

extern "C" {
typedef int dnnl_status_t;  // dnnl_success = 0.
typedef int64_t dnnl_dims_t[12];
typedef struct dnnl_engine* dnnl_engine_t;
typedef struct dnnl_stream* dnnl_stream_t;
typedef struct dnnl_memory_desc* dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc* const_dnnl_memory_desc_t;
typedef struct dnnl_memory* dnnl_memory_t;
typedef struct dnnl_primitive_desc* dnnl_primitive_desc_t;
typedef struct dnnl_primitive* dnnl_primitive_t;
typedef struct dnnl_primitive_attr* dnnl_primitive_attr_t;
typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;

dnnl_status_t dnnl_engine_create(dnnl_engine_t*, int kind, size_t index);
dnnl_status_t dnnl_stream_create(dnnl_stream_t*, dnnl_engine_t, unsigned flags);
dnnl_status_t dnnl_stream_destroy(dnnl_stream_t);
dnnl_status_t dnnl_memory_desc_create_with_strides(dnnl_memory_desc_t*, int ndims,
                                                   const dnnl_dims_t dims, int data_type,
                                                   const dnnl_dims_t strides);
dnnl_status_t dnnl_memory_desc_create_with_tag(dnnl_memory_desc_t*, int ndims,
                                               const dnnl_dims_t dims, int data_type, int tag);
dnnl_status_t dnnl_memory_desc_destroy(dnnl_memory_desc_t);
int dnnl_memory_desc_equal(const_dnnl_memory_desc_t, const_dnnl_memory_desc_t);
size_t dnnl_memory_desc_get_size(const_dnnl_memory_desc_t);
dnnl_status_t dnnl_memory_create(dnnl_memory_t*, const_dnnl_memory_desc_t, dnnl_engine_t,
                                 void* handle);
dnnl_status_t dnnl_memory_destroy(dnnl_memory_t);
dnnl_status_t dnnl_primitive_attr_create(dnnl_primitive_attr_t*);
dnnl_status_t dnnl_primitive_attr_destroy(dnnl_primitive_attr_t);
dnnl_status_t dnnl_primitive_attr_set_scratchpad_mode(dnnl_primitive_attr_t, int mode);
dnnl_status_t dnnl_convolution_forward_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int prop_kind, int alg_kind, const_dnnl_memory_desc_t src,
    const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t bias, const_dnnl_memory_desc_t dst,
    const dnnl_dims_t strides, const dnnl_dims_t dilates, const dnnl_dims_t padding_l,
    const dnnl_dims_t padding_r, dnnl_primitive_attr_t attr);
dnnl_status_t dnnl_convolution_backward_data_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind, const_dnnl_memory_desc_t diff_src,
    const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t diff_dst, const dnnl_dims_t strides,
    const dnnl_dims_t dilates, const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    dnnl_primitive_desc_t hint_fwd_pd, dnnl_primitive_attr_t attr);
dnnl_status_t dnnl_convolution_backward_weights_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind, const_dnnl_memory_desc_t src,
    const_dnnl_memory_desc_t diff_weights, const_dnnl_memory_desc_t diff_bias,
    const_dnnl_memory_desc_t diff_dst, const dnnl_dims_t strides, const dnnl_dims_t dilates,
    const dnnl_dims_t padding_l, const dnnl_dims_t padding_r, dnnl_primitive_desc_t hint_fwd_pd,
    dnnl_primitive_attr_t attr);
dnnl_status_t dnnl_reorder_primitive_desc_create(dnnl_primitive_desc_t*, const_dnnl_memory_desc_t src,
                                                 dnnl_engine_t, const_dnnl_memory_desc_t dst,
                                                 dnnl_engine_t, dnnl_primitive_attr_t attr);
const_dnnl_memory_desc_t dnnl_primitive_desc_query_md(dnnl_primitive_desc_t, int what, int index);
dnnl_status_t dnnl_primitive_desc_destroy(dnnl_primitive_desc_t);
dnnl_status_t dnnl_primitive_destroy(dnnl_primitive_t);
dnnl_status_t dnnl_primitive_create(dnnl_primitive_t*, dnnl_primitive_desc_t);
dnnl_status_t dnnl_primitive_execute(dnnl_primitive_t, dnnl_stream_t, int nargs,
                                     const dnnl_exec_arg_t* args);
int dnnl_get_effective_cpu_isa(void);  // dnnl_cpu_isa_t (limited by ONEDNN_MAX_CPU_ISA).
}

namespace {

namespace ffi = xla::ffi;

// oneDNN 3.x enum values (oneapi/dnnl/dnnl_types.h, dnnl_common_types.h).
constexpr int kCpu = 1, kInOrder = 1, kBf16 = 2, kF32 = 3, kFormatAny = 1, kScratchpadUser = 1;
constexpr int kForwardTraining = 64, kConvolutionDirect = 1;
constexpr int kQuerySrc = 129, kQueryDiffSrc = 130, kQueryWeights = 131, kQueryDiffWeights = 132,
              kQueryDst = 133, kQueryDiffDst = 134, kQueryScratchpad = 136;
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgScratchpad = 80, kArgDiffSrc = 129,
              kArgDiffDst = 145, kArgDiffWeights = 161;

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

std::atomic<int64_t> calls{0}, nanoseconds{0};

ffi::Error Check(dnnl_status_t status, const char* what) {
  if (status == 0) return ffi::Error::Success();
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("oneDNN ") + what + " failed with status " + std::to_string(status));
}

#define RETURN_IF_ERROR(expr, what)         \
  do {                                      \
    ffi::Error _error = Check(expr, what);  \
    if (_error.failure()) return _error;    \
  } while (0)

dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e = nullptr;
    dnnl_engine_create(&e, kCpu, 0);
    return e;
  }();
  return engine;
}

// Weight gradients in oneDNN's blocked activation layouts (reordered from NHWC each call) where the
// CPU has no AVX-512: the seed CNN's 32->64 layer at 222², batch 32, on an AMD EPYC Zen 3 took
// 1,790 ms on NHWC and 477 blocked (TensorFlow's blocked kernel: 723). With AVX-512, NHWC is
// faster (Zen 4: 88 against 118 ms at 126²). 0x20 is dnnl_cpu_isa_t's avx512_core bit.
bool BlockedWeightGradients() {
  static const bool blocked = (dnnl_get_effective_cpu_isa() & 0x20) == 0;
  return blocked;
}

// oneDNN's threads are GNU OpenMP's; the caller says how many this call may use.
void SetThreads(int threads) {
  using Fn = void (*)(int);
  static Fn set = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  if (set != nullptr && threads > 0) set(threads);
}

struct Geometry {
  int64_t n, c, h, w, o, kh, kw, oh, ow;
  int data_type;
  int out_type;  // The forward output's: data_type, or float32 for bfloat16 inputs.
  dnnl_dims_t strides{}, dilates{}, pad_l{}, pad_r{};
};

// Blocks of 8 channels pad a layer with fewer (a 1-channel input: 8x the work; 32 against 117 ms
// for the seed CNN's first layer), so only layers whose channels fill them go blocked.
bool BlockedWeightGradient(const Geometry& g) {
  return BlockedWeightGradients() && g.c % 8 == 0 && g.o % 8 == 0;
}

// User (JAX) memory descriptors: NHWC activations, HWIO weights, over oneDNN's NCHW/OIHW dims.
dnnl_memory_desc_t Nhwc(int64_t n, int64_t c, int64_t h, int64_t w, int data_type) {
  dnnl_dims_t dims = {n, c, h, w}, strides = {h * w * c, 1, w * c, c};
  dnnl_memory_desc_t md = nullptr;
  dnnl_memory_desc_create_with_strides(&md, 4, dims, data_type, strides);
  return md;
}

dnnl_memory_desc_t Hwio(const Geometry& g) {
  dnnl_dims_t dims = {g.o, g.c, g.kh, g.kw}, strides = {1, g.o, g.kw * g.c * g.o, g.c * g.o};
  dnnl_memory_desc_t md = nullptr;
  dnnl_memory_desc_create_with_strides(&md, 4, dims, g.data_type, strides);
  return md;
}

dnnl_memory_desc_t Any(int64_t a, int64_t b, int64_t c, int64_t d, int data_type) {
  dnnl_dims_t dims = {a, b, c, d};
  dnnl_memory_desc_t md = nullptr;
  dnnl_memory_desc_create_with_tag(&md, 4, dims, data_type, kFormatAny);
  return md;
}

// One operand: the user's layout, the primitive's, and the reorder between them (null if equal).
struct Operand {
  int arg;
  bool is_output;
  dnnl_memory_desc_t user = nullptr;
  const_dnnl_memory_desc_t inner = nullptr;  // Owned by the primitive descriptor.
  dnnl_primitive_t reorder = nullptr;
  size_t inner_bytes = 0;
};

struct Primitive {
  dnnl_primitive_desc_t fwd_pd = nullptr, pd = nullptr;
  dnnl_primitive_t primitive = nullptr;
  const_dnnl_memory_desc_t scratchpad = nullptr;
  size_t scratchpad_bytes = 0;
  Operand operands[3];  // Two inputs, then the output, in the handler's argument order.
};

ffi::Error MakeReorder(Operand& op) {
  if (dnnl_memory_desc_equal(op.user, op.inner)) return ffi::Error::Success();
  dnnl_primitive_desc_t pd = nullptr;
  const_dnnl_memory_desc_t from = op.is_output ? op.inner : op.user;
  const_dnnl_memory_desc_t to = op.is_output ? op.user : op.inner;
  RETURN_IF_ERROR(dnnl_reorder_primitive_desc_create(&pd, from, Engine(), to, Engine(), nullptr),
                  "reorder descriptor");
  RETURN_IF_ERROR(dnnl_primitive_create(&op.reorder, pd), "reorder primitive");
  dnnl_primitive_desc_destroy(pd);
  op.inner_bytes = dnnl_memory_desc_get_size(op.inner);
  return ffi::Error::Success();
}

ffi::Error Make(Kind kind, const Geometry& g, Primitive& p) {
  dnnl_primitive_attr_t attr = nullptr;
  RETURN_IF_ERROR(dnnl_primitive_attr_create(&attr), "attribute");
  RETURN_IF_ERROR(dnnl_primitive_attr_set_scratchpad_mode(attr, kScratchpadUser), "scratchpad mode");
  dnnl_memory_desc_t src = Nhwc(g.n, g.c, g.h, g.w, g.data_type);
  dnnl_memory_desc_t wei = Any(g.o, g.c, g.kh, g.kw, g.data_type);
  dnnl_memory_desc_t dst = Nhwc(g.n, g.o, g.oh, g.ow, g.out_type);
  RETURN_IF_ERROR(dnnl_convolution_forward_primitive_desc_create(
                      &p.fwd_pd, Engine(), kForwardTraining, kConvolutionDirect, src, wei, nullptr,
                      dst, g.strides, g.dilates, g.pad_l, g.pad_r, attr),
                  "convolution forward descriptor");
  dnnl_memory_desc_t x = Nhwc(g.n, g.c, g.h, g.w, g.data_type), w = Hwio(g);
  dnnl_memory_desc_t y = Nhwc(g.n, g.o, g.oh, g.ow, g.out_type);
  if (kind == kForward) {
    p.pd = p.fwd_pd;
    p.fwd_pd = nullptr;
    p.operands[0] = {kArgSrc, false, x, dnnl_primitive_desc_query_md(p.pd, kQuerySrc, 0)};
    p.operands[1] = {kArgWeights, false, w, dnnl_primitive_desc_query_md(p.pd, kQueryWeights, 0)};
    p.operands[2] = {kArgDst, true, y, dnnl_primitive_desc_query_md(p.pd, kQueryDst, 0)};
  } else if (kind == kBackwardData) {
    RETURN_IF_ERROR(dnnl_convolution_backward_data_primitive_desc_create(
                        &p.pd, Engine(), kConvolutionDirect, src, wei, dst, g.strides, g.dilates,
                        g.pad_l, g.pad_r, p.fwd_pd, attr),
                    "convolution backward-data descriptor");
    p.operands[0] = {kArgDiffDst, false, y, dnnl_primitive_desc_query_md(p.pd, kQueryDiffDst, 0)};
    p.operands[1] = {kArgWeights, false, w, dnnl_primitive_desc_query_md(p.pd, kQueryWeights, 0)};
    p.operands[2] = {kArgDiffSrc, true, x, dnnl_primitive_desc_query_md(p.pd, kQueryDiffSrc, 0)};
  } else {
    if (BlockedWeightGradient(g)) {  // The primitive picks the activations' layout.
      dnnl_memory_desc_destroy(src);
      dnnl_memory_desc_destroy(dst);
      src = Any(g.n, g.c, g.h, g.w, g.data_type);
      dst = Any(g.n, g.o, g.oh, g.ow, g.out_type);
    }
    RETURN_IF_ERROR(dnnl_convolution_backward_weights_primitive_desc_create(
                        &p.pd, Engine(), kConvolutionDirect, src, wei, nullptr, dst, g.strides,
                        g.dilates, g.pad_l, g.pad_r, p.fwd_pd, attr),
                    "convolution backward-weights descriptor");
    p.operands[0] = {kArgSrc, false, x, dnnl_primitive_desc_query_md(p.pd, kQuerySrc, 0)};
    p.operands[1] = {kArgDiffDst, false, y, dnnl_primitive_desc_query_md(p.pd, kQueryDiffDst, 0)};
    p.operands[2] = {kArgDiffWeights, true, w,
                     dnnl_primitive_desc_query_md(p.pd, kQueryDiffWeights, 0)};
  }
  dnnl_memory_desc_destroy(src);
  dnnl_memory_desc_destroy(wei);
  dnnl_memory_desc_destroy(dst);
  dnnl_primitive_attr_destroy(attr);
  for (Operand& op : p.operands) {
    ffi::Error error = MakeReorder(op);
    if (error.failure()) return error;
  }
  p.scratchpad = dnnl_primitive_desc_query_md(p.pd, kQueryScratchpad, 0);
  p.scratchpad_bytes = p.scratchpad ? dnnl_memory_desc_get_size(p.scratchpad) : 0;
  RETURN_IF_ERROR(dnnl_primitive_create(&p.primitive, p.pd), "convolution primitive");
  return ffi::Error::Success();
}

// Primitives live as long as the process (one per layer shape and pass: a few dozen).
ffi::Error Lookup(Kind kind, const Geometry& g, const Primitive** out) {
  static std::mutex mutex;
  static std::map<std::vector<int64_t>, std::unique_ptr<Primitive>> cache;
  std::vector<int64_t> key = {kind, g.data_type, g.out_type, g.n, g.c, g.h, g.w, g.o, g.kh, g.kw, g.oh, g.ow};
  for (const int64_t* a : {g.strides, g.dilates, g.pad_l, g.pad_r}) key.insert(key.end(), a, a + 2);
  std::lock_guard<std::mutex> lock(mutex);
  auto& entry = cache[key];
  if (!entry) {
    auto made = std::make_unique<Primitive>();
    ffi::Error error = Make(kind, g, *made);
    if (error.failure()) {
      cache.erase(key);
      return error;
    }
    entry = std::move(made);
  }
  *out = entry.get();
  return ffi::Error::Success();
}

// Per-thread buffers for reordered operands (the weights in oneDNN's layout; without AVX-512 also
// a weight gradient's two activations) and the scratchpad, kept between calls instead of allocated
// and page-faulted in every call.
class Arena {
 public:
  void* Get(int slot, size_t bytes) {
    Slot& s = slots_[slot];
    if (bytes > s.bytes) {
      std::free(s.data);
      s.bytes = (bytes + 63) / 64 * 64;
      s.data = std::aligned_alloc(64, s.bytes);
    }
    return s.data;
  }
  ~Arena() {
    for (Slot& s : slots_) std::free(s.data);
  }

 private:
  struct Slot {
    void* data = nullptr;
    size_t bytes = 0;
  };
  Slot slots_[4];  // Three operands and the scratchpad.
};

// At most `slots` convolutions at once in this process: XLA may run independent ones (a layer's two
// gradients, fake devices) on several of its threads, and each brings `threads` OpenMP threads.
class Slots {
 public:
  void Acquire(int64_t slots) {
    std::unique_lock<std::mutex> lock(mutex_);
    free_.wait(lock, [&] { return busy_ < slots; });
    ++busy_;
  }
  void Release() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --busy_;
    }
    free_.notify_one();
  }

 private:
  std::mutex mutex_;
  std::condition_variable free_;
  int64_t busy_ = 0;
};

ffi::Error Execute(const Primitive& p, void* const data[3], int threads, int64_t slots) {
  static Slots running;
  running.Acquire(slots);
  const auto start = std::chrono::steady_clock::now();
  struct Releaser {
    ~Releaser() { running.Release(); }
  } releaser;
  SetThreads(threads);
  dnnl_stream_t stream = nullptr;
  RETURN_IF_ERROR(dnnl_stream_create(&stream, Engine(), kInOrder), "stream");
  std::unique_ptr<dnnl_stream, decltype(&dnnl_stream_destroy)> stream_guard(stream,
                                                                              dnnl_stream_destroy);
  std::vector<dnnl_memory_t> memories;
  auto memory = [&](const_dnnl_memory_desc_t md, void* handle) {
    dnnl_memory_t m = nullptr;
    dnnl_memory_create(&m, md, Engine(), handle);
    memories.push_back(m);
    return m;
  };
  thread_local Arena arena;
  std::vector<dnnl_exec_arg_t> args;
  dnnl_memory_t user_out = nullptr, inner_out = nullptr;
  ffi::Error status = ffi::Error::Success();
  for (int i = 0; i < 3 && status.success(); ++i) {
    const Operand& op = p.operands[i];
    dnnl_memory_t user = memory(op.user, data[i]);
    if (op.reorder == nullptr) {
      args.push_back({op.arg, user});
      continue;
    }
    dnnl_memory_t inner = memory(op.inner, arena.Get(i, op.inner_bytes));
    args.push_back({op.arg, inner});
    if (op.is_output) {
      user_out = user;
      inner_out = inner;
    } else {
      dnnl_exec_arg_t reorder_args[2] = {{kArgSrc, user}, {kArgDst, inner}};
      status = Check(dnnl_primitive_execute(op.reorder, stream, 2, reorder_args), "reorder");
    }
  }
  if (status.success() && p.scratchpad_bytes) {
    args.push_back({kArgScratchpad, memory(p.scratchpad, arena.Get(3, p.scratchpad_bytes))});
  }
  if (status.success()) {
    status = Check(dnnl_primitive_execute(p.primitive, stream, static_cast<int>(args.size()),
                                          args.data()),
                   "convolution");
  }
  if (status.success() && inner_out != nullptr) {
    dnnl_exec_arg_t reorder_args[2] = {{kArgSrc, inner_out}, {kArgDst, user_out}};
    status = Check(dnnl_primitive_execute(p.operands[2].reorder, stream, 2, reorder_args),
                   "reorder");
  }
  for (dnnl_memory_t m : memories) dnnl_memory_destroy(m);
  calls.fetch_add(1, std::memory_order_relaxed);
  nanoseconds.fetch_add(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start)
          .count(),
      std::memory_order_relaxed);
  return status;
}

ffi::Error MakeGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, const ffi::AnyBuffer& y,
                        ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                        ffi::Span<const int64_t> dilation, Geometry& g) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || yd.size() != 4 || strides.size() != 2 ||
      padding.size() != 4 || dilation.size() != 2) {
    return ffi::Error::InvalidArgument("onednn_conv: expects NHWC, HWIO, NHWC and 2-D geometry");
  }
  auto type = [](ffi::DataType t) {
    return t == ffi::DataType::F32 ? kF32 : t == ffi::DataType::BF16 ? kBf16 : 0;
  };
  g.data_type = type(x.element_type());
  g.out_type = type(y.element_type());
  if (g.data_type == 0 || type(w.element_type()) != g.data_type ||
      (g.out_type != g.data_type && g.out_type != kF32)) {
    return ffi::Error::InvalidArgument(
        "onednn_conv: float32, or bfloat16 with a bfloat16 or float32 output");
  }
  g.n = xd[0], g.h = xd[1], g.w = xd[2], g.c = xd[3];
  g.kh = wd[0], g.kw = wd[1], g.o = wd[3];
  g.oh = yd[1], g.ow = yd[2];
  for (int i = 0; i < 2; ++i) {
    g.strides[i] = strides[i];
    g.dilates[i] = dilation[i] - 1;  // oneDNN counts the gaps, XLA the step.
    g.pad_l[i] = padding[2 * i];
    g.pad_r[i] = padding[2 * i + 1];
  }
  return ffi::Error::Success();
}

// x, w -> y (forward); dy, w -> dx (input gradient); x, dy -> dw (weight gradient): every pass
// sees all three arrays' shapes in its two operands and its result.
template <Kind kind>
ffi::Error Conv(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
                ffi::Span<const int64_t> dilation, int64_t threads, int64_t slots) {
  Geometry g;
  ffi::Error error = kind == kForward        ? MakeGeometry(a, b, *out, strides, padding, dilation, g)
                     : kind == kBackwardData ? MakeGeometry(*out, b, a, strides, padding, dilation, g)
                                             : MakeGeometry(a, *out, b, strides, padding, dilation, g);
  if (error.failure()) return error;
  const Primitive* p = nullptr;
  error = Lookup(kind, g, &p);
  if (error.failure()) return error;
  void* const data[3] = {a.untyped_data(), b.untyped_data(), out->untyped_data()};
  return Execute(*p, data, static_cast<int>(threads), slots);
}

}  // namespace

#define COVID_FLAX_CONV_HANDLER(name, kind)                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, Conv<kind>,            \
                                ffi::Ffi::Bind()             \
                                    .Arg<ffi::AnyBuffer>()   \
                                    .Arg<ffi::AnyBuffer>()   \
                                    .Ret<ffi::AnyBuffer>()   \
                                    .Attr<ffi::Span<const int64_t>>("strides") \
                                    .Attr<ffi::Span<const int64_t>>("padding") \
                                    .Attr<ffi::Span<const int64_t>>("dilation") \
                                    .Attr<int64_t>("threads") \
                                    .Attr<int64_t>("slots"));

COVID_FLAX_CONV_HANDLER(CovidFlaxOnednnConvForward, kForward)
COVID_FLAX_CONV_HANDLER(CovidFlaxOnednnConvBackwardData, kBackwardData)
COVID_FLAX_CONV_HANDLER(CovidFlaxOnednnConvBackwardWeights, kBackwardWeights)

// 1 if oneDNN has every pass of a small convolution of this data type (2: bfloat16; 3: float32) on
// this CPU in the types the custom VJP asks for, else 0: the forward pass with a float32 or an
// own-type output, both gradients with an own-type output gradient (`_conv_bwd` casts it back).
// oneDNN 3.x has no bfloat16 convolutions without AVX-512 (an AVX2-only CPU), and says so only
// when a primitive is made.
extern "C" int CovidFlaxOnednnConvSupports(int data_type) {
  Geometry g;
  g.n = 2, g.c = 3, g.h = g.w = 8, g.o = 4, g.kh = g.kw = 3, g.oh = g.ow = 8;
  g.data_type = data_type;
  for (int i = 0; i < 2; ++i) g.strides[i] = 1, g.pad_l[i] = g.pad_r[i] = 1;
  const std::pair<Kind, int> passes[] = {{kForward, kF32},
                                         {kForward, data_type},
                                         {kBackwardData, data_type},
                                         {kBackwardWeights, data_type}};
  for (auto [kind, out_type] : passes) {
    g.out_type = out_type;
    Primitive p;
    bool made = Make(kind, g, p).success();
    for (Operand& op : p.operands) {
      if (op.reorder) dnnl_primitive_destroy(op.reorder);
      if (op.user) dnnl_memory_desc_destroy(op.user);
    }
    if (p.primitive) dnnl_primitive_destroy(p.primitive);
    if (p.pd) dnnl_primitive_desc_destroy(p.pd);
    if (p.fwd_pd) dnnl_primitive_desc_destroy(p.fwd_pd);
    if (!made) return 0;
  }
  return 1;
}

// How many convolutions this process has run on oneDNN (tests: proof the path ran), and the time
// spent in them (benchmarks: the convolutions' share of a step).
extern "C" int64_t CovidFlaxOnednnConvCalls() { return calls.load(); }
extern "C" int64_t CovidFlaxOnednnConvNanoseconds() { return nanoseconds.load(); }
extern "C" int CovidFlaxOnednnConvBlockedWeightGradients() { return BlockedWeightGradients(); }
