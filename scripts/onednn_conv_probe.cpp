// How fast oneDNN runs this codebase's convolutions on this CPU (issue #34: is a oneDNN path worth
// building?). Times forward, input-gradient and weight-gradient convolutions of one 3x3 VALID
// layer, batch 32, float32 and bfloat16 (bf16 in, f32 accumulate/out), oneDNN's preferred
// (blocked) layouts, and prints one JSON line per dtype. Build and run (no install needed):
//
//   pip download --no-deps -d /tmp/dnnl onednn-cpu-gomp onednn-devel
//   (cd /tmp/dnnl && for w in *.whl; do unzip -oq $w -d x; done)
//   I=$(dirname $(find /tmp/dnnl/x -name dnnl.hpp -path '*include/dnnl.hpp'))
//   L=$(dirname $(find /tmp/dnnl/x -name 'libdnnl.so.3' -path '*gomp*'))
//   g++ -O2 -std=c++17 scripts/onednn_conv_probe.cpp -I$I -L$L -l:libdnnl.so.3 \
//       -Wl,-rpath,$L -o /tmp/onednn_conv_probe
//   for l in "1 32 128" "32 64 126" "64 64 62" "64 128 30"; do   # seed_cnn at 128^2
//     OMP_NUM_THREADS=2 /tmp/onednn_conv_probe $l; done
//
// (`onednn` itself is built with SYCL and needs Intel's GPU runtime; `onednn-cpu-gomp` is the
// CPU-only library, v3.2, which links against the newer `onednn-devel` headers for this API.)
#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "oneapi/dnnl/dnnl.hpp"

using namespace dnnl;
using dt = memory::data_type;

template <typename F>
double time_ms(F f, int reps) {
  f();  // Warm-up (and primitive JIT).
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) f();
  auto end = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::milli>(end - start).count() / reps;
}

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s IN_CHANNELS OUT_CHANNELS INPUT_SIZE\n", argv[0]);
    return 2;
  }
  const int n = 32, ic = std::atoi(argv[1]), oc = std::atoi(argv[2]), h = std::atoi(argv[3]);
  const int k = 3, oh = h - k + 1;
  engine eng(engine::kind::cpu, 0);
  stream s(eng);
  const memory::dims src_d = {n, ic, h, h}, wei_d = {oc, ic, k, k}, dst_d = {n, oc, oh, oh};
  const memory::dims strides = {1, 1}, pad = {0, 0};
  for (dt type : {dt::f32, dt::bf16}) {
    auto any = memory::format_tag::any;
    auto src_md = memory::desc(src_d, type, any), wei_md = memory::desc(wei_d, type, any);
    auto out_md = memory::desc(dst_d, dt::f32, any), grad_md = memory::desc(dst_d, type, any);
    auto fwd_pd = convolution_forward::primitive_desc(eng, prop_kind::forward_training,
        algorithm::convolution_direct, src_md, wei_md, out_md, strides, pad, pad);
    memory src(fwd_pd.src_desc(), eng), wei(fwd_pd.weights_desc(), eng), dst(fwd_pd.dst_desc(), eng);
    convolution_forward fwd(fwd_pd);
    double forward = time_ms([&] {
      fwd.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
      s.wait();
    }, 5);
    auto data_pd = convolution_backward_data::primitive_desc(eng, algorithm::convolution_direct,
        memory::desc(src_d, dt::f32, any), wei_md, grad_md, strides, pad, pad, fwd_pd);
    memory dd(data_pd.diff_dst_desc(), eng), ds(data_pd.diff_src_desc(), eng),
        w2(data_pd.weights_desc(), eng);
    convolution_backward_data data(data_pd);
    double input_grad = time_ms([&] {
      data.execute(s, {{DNNL_ARG_DIFF_DST, dd}, {DNNL_ARG_WEIGHTS, w2}, {DNNL_ARG_DIFF_SRC, ds}});
      s.wait();
    }, 5);
    auto weights_pd = convolution_backward_weights::primitive_desc(eng,
        algorithm::convolution_direct, src_md, memory::desc(wei_d, dt::f32, any), grad_md,
        strides, pad, pad, fwd_pd);
    memory s2(weights_pd.src_desc(), eng), dd2(weights_pd.diff_dst_desc(), eng),
        dw(weights_pd.diff_weights_desc(), eng);
    convolution_backward_weights weights(weights_pd);
    double weight_grad = time_ms([&] {
      weights.execute(s, {{DNNL_ARG_SRC, s2}, {DNNL_ARG_DIFF_DST, dd2}, {DNNL_ARG_DIFF_WEIGHTS, dw}});
      s.wait();
    }, 5);
    double gflop = 2.0 * n * oc * oh * oh * ic * k * k / 1e9;
    std::printf("{\"measure\": \"onednn_conv\", \"layer\": \"%d->%d@%d\", \"dtype\": \"%s\", "
                "\"forward_ms\": %.1f, \"input_grad_ms\": %.1f, \"weight_grad_ms\": %.1f, "
                "\"gflop_each\": %.2f, \"impl\": \"%s\"}\n",
                ic, oc, h, type == dt::f32 ? "float32" : "bfloat16", forward, input_grad,
                weight_grad, gflop, fwd_pd.impl_info_str());
  }
  return 0;
}
