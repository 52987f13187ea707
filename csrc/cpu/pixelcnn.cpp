// CPU kernels of the PixelCNN gated activation and of PixelCNN++'s concat-ELU.
//
// Gated activation: out = tanh(a + c_a) * sigmoid(b + c_b) (or
// (a + c_a) * sigmoid(b + c_b)), where a and b are the two channel halves of x [B, 2C, N] and the
// condition c [B, 2C] is broadcast over the N pixels here instead of being added as a tensor.
// One vectorised pass per (b, c) row of N pixels; the backward recomputes the gate from x rather
// than reading saved tanh / sigmoid tensors, and sums the condition's gradient in the same pass.
// float's tanh is fast_math.h's (a few ulp), not Sleef's, which cost three quarters of the time.
#include <optional>
#include <string>

#include <torch/library.h>

#include "fast_math.h"
#include "rows.h"

namespace vaekernels::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename T>
Vectorized<T> sigmoid(const Vectorized<T>& v) {
  // exp(-v) overflows to inf for very negative v and the quotient to 0, never NaN.
  const Vectorized<T> one(T(1));
  return one / (one + v.neg().exp());
}

// 1 - tanh(v)^2 = 4 e / (1 + e)^2 with e = exp(-2|v|): accurate relatively for every v, where
// 1 - t * t cancels for large |v| (to nothing past |v| ~ 9 in float).
template <typename T>
Vectorized<T> tanh_slope(const Vectorized<T>& v) {
  const Vectorized<T> e = (v.abs() * Vectorized<T>(T(-2))).exp();
  const Vectorized<T> inv = Vectorized<T>(T(1)) / (Vectorized<T>(T(1)) + e);
  return Vectorized<T>(T(4)) * e * inv * inv;
}

bool is_linear(const char* op, c10::string_view gate) {
  TORCH_CHECK(gate == "tanh" || gate == "linear", op, ": gate must be 'tanh' or 'linear', got '",
              std::string(gate.data(), gate.size()), "'");
  return gate == "linear";
}

// x is [B, 2C, N] with contiguous rows (its batch and channel strides are free, so a cropped
// convolution output is read in place); cond, when given, [B, 2C].
void check_gated(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& cond) {
  check_rank(op, "x", x, 3, "[B, 2C, N]");
  check_floating(op, "x", x, kCpu);
  TORCH_CHECK(x.size(1) % 2 == 0, op, ": x must have an even number of channels (2C), got ", x.size(1));
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, op, ": x must be contiguous in its last dim, got strides ",
              x.strides());
  if (cond.has_value()) check_tensor(op, "cond", *cond, {x.size(0), x.size(1)}, x, kCpu);
}

// Calls body(row, a, b, c_a, c_b) for every (batch, channel) row of the first half, in parallel.
template <typename scalar_t, typename Body>
void for_each_gate_row(const at::Tensor& x, const std::optional<at::Tensor>& cond, Body body) {
  const int64_t B = x.size(0), C = x.size(1) / 2, N = x.size(2);
  const scalar_t* base = x.const_data_ptr<scalar_t>();
  const at::Tensor cond_c = cond.has_value() ? cond->contiguous() : at::Tensor();
  const scalar_t* c_ptr = cond.has_value() ? cond_c.const_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, B * C, row_grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / C, c = row % C;
      const scalar_t* a = base + b * x.stride(0) + c * x.stride(1);
      const scalar_t c_a = c_ptr ? c_ptr[b * 2 * C + c] : scalar_t(0);
      const scalar_t c_b = c_ptr ? c_ptr[b * 2 * C + C + c] : scalar_t(0);
      body(row, a, a + C * x.stride(1), c_a, c_b);
    }
  });
}

at::Tensor gated_activation(const at::Tensor& x, const std::optional<at::Tensor>& cond, c10::string_view gate) {
  constexpr const char* op = "vaekernels::gated_activation";
  check_gated(op, x, cond);
  const bool linear = is_linear(op, gate);
  const int64_t B = x.size(0), C = x.size(1) / 2, N = x.size(2);
  at::Tensor out = at::empty({B, C, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_activation", [&] {
    using Vec = Vectorized<scalar_t>;
    scalar_t* out_base = out.data_ptr<scalar_t>();
    for_each_gate_row<scalar_t>(x, cond, [&](int64_t row, const scalar_t* a, const scalar_t* b, scalar_t c_a,
                                             scalar_t c_b) {
      scalar_t* o = out_base + row * N;
      const Vec ca(c_a), cb(c_b);
      auto value = [&](int64_t d, int64_t count) {
        const Vec pre = Vec::loadu(a + d, count) + ca;
        return (linear ? pre : tanh_of(pre)) * sigmoid(Vec::loadu(b + d, count) + cb);
      };
      int64_t d = 0;
      for (; d + Vec::size() <= N; d += Vec::size()) value(d, Vec::size()).store(o + d);
      if (d < N) value(d, N - d).store(o + d, N - d);
    });
  });
  return out;
}

// d/da = g * s * (1 - t^2) (tanh; see tanh_slope) or g * s (linear), d/db = g * t * s * (1 - s), with t the
// (tanh of the) first half and s the sigmoid of the second; the condition's gradient is their
// row sum. Returns an empty [0] tensor for it when there is no condition.
std::tuple<at::Tensor, at::Tensor> gated_activation_backward(const at::Tensor& grad, const at::Tensor& x,
                                                             const std::optional<at::Tensor>& cond,
                                                             c10::string_view gate) {
  constexpr const char* op = "vaekernels::gated_activation_backward";
  check_gated(op, x, cond);
  const bool linear = is_linear(op, gate);
  const int64_t B = x.size(0), C = x.size(1) / 2, N = x.size(2);
  check_grad(op, "grad", grad, {B, C, N}, x);
  // The gradient of a sum or a mean arrives expanded (stride 0): read in place, not materialised.
  at::Tensor grad_c = grad.to(x.scalar_type());
  if (N > 1 && grad_c.stride(2) != 0 && grad_c.stride(2) != 1) grad_c = grad_c.contiguous();
  const bool grad_per_row = N > 1 && grad_c.stride(2) == 0;
  at::Tensor grad_x = at::empty({B, 2 * C, N}, x.options());
  at::Tensor grad_cond = cond.has_value() ? at::empty({B, 2 * C}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_activation_backward", [&] {
    using Vec = Vectorized<scalar_t>;
    const scalar_t* g_base = grad_c.const_data_ptr<scalar_t>();
    scalar_t* gx_base = grad_x.data_ptr<scalar_t>();
    scalar_t* gc_base = cond.has_value() ? grad_cond.data_ptr<scalar_t>() : nullptr;
    for_each_gate_row<scalar_t>(x, cond, [&](int64_t row, const scalar_t* a, const scalar_t* b, scalar_t c_a,
                                             scalar_t c_b) {
      const int64_t batch = row / C, c = row % C;
      const scalar_t* g = g_base + batch * grad_c.stride(0) + c * grad_c.stride(1);
      scalar_t* ga_out = gx_base + (batch * 2 * C + c) * N;
      scalar_t* gb_out = ga_out + C * N;
      const Vec ca(c_a), cb(c_b), one(scalar_t(1));
      Vec sum_a(scalar_t(0)), sum_b(scalar_t(0));
      // Lanes past the row's end load zeros, so their gradient terms are zero in the sums too.
      auto step = [&](int64_t d, int64_t count) {
        const Vec g_d = grad_per_row ? Vec::set(Vec(scalar_t(0)), Vec(g[0]), count) : Vec::loadu(g + d, count);
        const Vec pre = Vec::loadu(a + d, count) + ca;
        const Vec s = sigmoid(Vec::loadu(b + d, count) + cb);
        const Vec t = linear ? pre : tanh_of(pre);
        const Vec gs = g_d * s;
        const Vec ga = linear ? gs : gs * tanh_slope(pre);
        const Vec gb = gs * t * (one - s);
        ga.store(ga_out + d, count);
        gb.store(gb_out + d, count);
        sum_a += ga;
        sum_b += gb;
      };
      vector_steps<scalar_t>(N, step);
      if (gc_base) {
        gc_base[batch * 2 * C + c] = at::vec::vec_reduce_all<scalar_t>(vec_add<scalar_t>, sum_a);
        gc_base[batch * 2 * C + C + c] = at::vec::vec_reduce_all<scalar_t>(vec_add<scalar_t>, sum_b);
      }
    });
  });
  return {grad_x, grad_cond};
}

// Concat-ELU: x [B, C, H, W] (each example contiguous; its batch stride may be anything, 0 too)
// -> [elu(x), elu(-x)] [B, 2C, H + top + bottom, W + left + right], zero-padded by padding =
// [left, right, top, bottom] ([] for none), as F.pad(elu(cat([x, -x], 1)), padding): the padded
// input of PixelCNN++'s shifted convolutions, written in the same pass instead of a copy. One of
// elu(v) and elu(-v) is linear, the other expm1(-|v|): one transcendental per element, where
// elu(cat([x, -x])) makes the concatenation, the negation and two expm1 passes' worth of lanes.
struct ConcatEluShape {
  int64_t B, C, H, W, left, right, top, bottom;

  ConcatEluShape(const char* op, const at::Tensor& x, at::IntArrayRef padding) {
    check_rank(op, "x", x, 4, "[B, C, H, W]");
    check_floating(op, "x", x, kCpu);
    TORCH_CHECK(padding.empty() || padding.size() == 4, op, ": padding must be [] or [left, right, top, bottom], got ",
                padding);
    B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    left = right = top = bottom = 0;
    if (!padding.empty()) left = padding[0], right = padding[1], top = padding[2], bottom = padding[3];
    TORCH_CHECK(left >= 0 && right >= 0 && top >= 0 && bottom >= 0, op, ": padding must be >= 0, got ", padding);
    TORCH_CHECK(B == 0 || x.select(0, 0).is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), op,
                ": x must be channels last or have each example contiguous, got strides ", x.strides());
  }

  int64_t padded_height() const { return H + top + bottom; }
  int64_t padded_width() const { return W + left + right; }
  // Where element m = (c, h, w) of an example goes in the first half of its padded output.
  int64_t out_offset(int64_t m) const {
    const int64_t c = m / (H * W), h = m / W % H, w = m % W;
    return (c * padded_height() + h + top) * padded_width() + left + w;
  }
  int64_t out_example() const { return 2 * C * padded_height() * padded_width(); }
  int64_t half() const { return C * padded_height() * padded_width(); }

  // body(b, m, count) over runs of an example's C H W elements that stay within one row of W, in
  // parallel.
  template <typename Body>
  void for_each_run(Body body) const {
    const int64_t M = C * H * W;
    at::parallel_for(0, B * M, 32768, [&](int64_t begin, int64_t end) {
      while (begin < end) {
        const int64_t b = begin / M, m = begin % M, count = std::min(end - begin, W - m % W);
        body(b, m, count);
        begin += count;
      }
    });
  }

  // Zeros on the padding of both halves of every example's output.
  template <typename T>
  void zero_padding(T* out) const {
    if (left == 0 && right == 0 && top == 0 && bottom == 0) return;
    const int64_t Hp = padded_height(), Wp = padded_width();
    at::parallel_for(0, B * 2 * C, 64, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        T* image = out + plane * Hp * Wp;
        std::fill(image, image + top * Wp, T(0));
        std::fill(image + (top + H) * Wp, image + Hp * Wp, T(0));
        for (int64_t h = top; h < top + H; ++h) {
          std::fill(image + h * Wp, image + h * Wp + left, T(0));
          std::fill(image + h * Wp + left + W, image + (h + 1) * Wp, T(0));
        }
      }
    });
  }
};

// x [B, C, H, W] laid out channels last (each pixel's C channels contiguous), and not also
// channels first (as where C = 1 or H = W = 1).
bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

// [elu(v), elu(-v)] of each of count elements of src into first and second (see concat_elu).
template <typename scalar_t>
void concat_elu_run(const scalar_t* src, scalar_t* first, scalar_t* second, int64_t count) {
  using Vec = Vectorized<scalar_t>;
  auto step = [&](int64_t d, int64_t lanes) {
    const Vec v = Vec::loadu(src + d, lanes);
    // A NaN fails v > 0 and reaches both halves through expm1 and the negation.
    const Vec curved = expm1_of(v.abs().neg());
    const Vec positive = v > Vec(scalar_t(0));
    Vec::blendv(curved, v, positive).store(first + d, lanes);
    Vec::blendv(v.neg(), curved, positive).store(second + d, lanes);
  };
  vector_steps<scalar_t>(count, step);
}

// The gradient g_1 elu'(v) - g_2 elu'(-v) of count elements into dst (see concat_elu_backward).
template <typename scalar_t>
void concat_elu_backward_run(const scalar_t* src, const scalar_t* g_first, const scalar_t* g_second, scalar_t* dst,
                             int64_t count) {
  using Vec = Vectorized<scalar_t>;
  auto step = [&](int64_t d, int64_t lanes) {
    const Vec v = Vec::loadu(src + d, lanes);
    const Vec g1 = Vec::loadu(g_first + d, lanes), g2 = Vec::loadu(g_second + d, lanes);
    const Vec zero(scalar_t(0)), one(scalar_t(1)), e = v.abs().neg().exp();
    const Vec slope = Vec::blendv(e, one, v > zero), mirrored_slope = Vec::blendv(e, one, v < zero);
    (g1 * slope - g2 * mirrored_slope).store(dst + d, lanes);
  };
  vector_steps<scalar_t>(count, step);
}

// Concat-ELU of a channels-last x, channels last out (as oneDNN's convolutions run fastest on
// CPU): each pixel's row of C channels gives its row [elu(x), elu(-x)] of 2C, and each padded
// row of the output is written whole, its padding zeros included.
at::Tensor concat_elu_channels_last(const at::Tensor& x, const ConcatEluShape& shape) {
  const int64_t C = shape.C, H = shape.H, W = shape.W, Hp = shape.padded_height(), Wp = shape.padded_width();
  at::Tensor out = at::empty({shape.B, 2 * C, Hp, Wp}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "concat_elu", [&] {
    const scalar_t* x_base = x.const_data_ptr<scalar_t>();
    scalar_t* out_base = out.data_ptr<scalar_t>();
    at::parallel_for(0, shape.B * Hp, row_grain(2 * C * Wp), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / Hp, h = row % Hp - shape.top;
        scalar_t* out_row = out_base + row * Wp * 2 * C;
        if (h < 0 || h >= H) {
          std::fill(out_row, out_row + Wp * 2 * C, scalar_t(0));
          continue;
        }
        std::fill(out_row, out_row + shape.left * 2 * C, scalar_t(0));
        std::fill(out_row + (shape.left + W) * 2 * C, out_row + Wp * 2 * C, scalar_t(0));
        const scalar_t* x_row = x_base + (b * H + h) * W * C;
        for (int64_t w = 0; w < W; ++w) {
          scalar_t* first = out_row + (shape.left + w) * 2 * C;
          concat_elu_run(x_row + w * C, first, first + C, C);
        }
      }
    });
  });
  return out;
}

at::Tensor concat_elu_backward_channels_last(const at::Tensor& grad, const at::Tensor& x,
                                             const ConcatEluShape& shape) {
  const int64_t C = shape.C, H = shape.H, W = shape.W, Hp = shape.padded_height(), Wp = shape.padded_width();
  const at::Tensor grad_c = grad.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "concat_elu_backward", [&] {
    const scalar_t* x_base = x.const_data_ptr<scalar_t>();
    const scalar_t* g_base = grad_c.const_data_ptr<scalar_t>();
    scalar_t* gx_base = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, shape.B * H, row_grain(3 * C * W), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, h = row % H;
        const scalar_t* g_row = g_base + ((b * Hp + h + shape.top) * Wp + shape.left) * 2 * C;
        for (int64_t w = 0; w < W; ++w) {
          const int64_t pixel = (row * W + w) * C;
          const scalar_t* g_first = g_row + w * 2 * C;
          concat_elu_backward_run(x_base + pixel, g_first, g_first + C, gx_base + pixel, C);
        }
      }
    });
  });
  return grad_x;
}

at::Tensor concat_elu(const at::Tensor& x, at::IntArrayRef padding) {
  const ConcatEluShape shape("vaekernels::concat_elu", x, padding);
  if (is_channels_last(x)) return concat_elu_channels_last(x, shape);
  at::Tensor out = at::empty({shape.B, 2 * shape.C, shape.padded_height(), shape.padded_width()}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "concat_elu", [&] {
    const scalar_t* x_base = x.const_data_ptr<scalar_t>();
    scalar_t* out_base = out.data_ptr<scalar_t>();
    shape.zero_padding(out_base);
    shape.for_each_run([&](int64_t b, int64_t m, int64_t count) {
      const scalar_t* src = x_base + b * x.stride(0) + m;
      scalar_t* first = out_base + b * shape.out_example() + shape.out_offset(m);
      concat_elu_run(src, first, first + shape.half(), count);
    });
  });
  return out;
}

// d/dx = g_1 elu'(x) - g_2 elu'(-x), where elu'(u) is 1 for u > 0 and exp(u) otherwise, so NaN at
// a NaN (as torch's vectorised ELU gives it; its scalar tail gives 1): e = exp(-|x|) (not 1 +
// expm1, which loses e below float's epsilon) is elu'(x) for x <= 0 and elu'(-x) for x >= 0.
// grad [B, 2C, H + top + bottom, W + left + right] in any layout; its padding is not read.
at::Tensor concat_elu_backward(const at::Tensor& grad, const at::Tensor& x, at::IntArrayRef padding) {
  constexpr const char* op = "vaekernels::concat_elu_backward";
  const ConcatEluShape shape(op, x, padding);
  check_grad(op, "grad", grad, {shape.B, 2 * shape.C, shape.padded_height(), shape.padded_width()}, x);
  if (is_channels_last(x)) return concat_elu_backward_channels_last(grad, x, shape);
  const at::Tensor grad_c = grad.to(x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty({shape.B, shape.C, shape.H, shape.W}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "concat_elu_backward", [&] {
    const scalar_t* x_base = x.const_data_ptr<scalar_t>();
    const scalar_t* g_base = grad_c.const_data_ptr<scalar_t>();
    scalar_t* gx_base = grad_x.data_ptr<scalar_t>();
    const int64_t M = shape.C * shape.H * shape.W;
    shape.for_each_run([&](int64_t b, int64_t m, int64_t count) {
      const scalar_t* src = x_base + b * x.stride(0) + m;
      const scalar_t* g_first = g_base + b * shape.out_example() + shape.out_offset(m);
      const scalar_t* g_second = g_first + shape.half();
      concat_elu_backward_run(src, g_first, g_second, gx_base + b * M + m, count);
    });
  });
  return grad_x;
}
}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace vaekernels::cpu

TORCH_LIBRARY_IMPL(vaekernels, CPU, m) {
  m.impl("gated_activation", &vaekernels::cpu::gated_activation);
  m.impl("gated_activation_backward", &vaekernels::cpu::gated_activation_backward);
  m.impl("concat_elu", &vaekernels::cpu::concat_elu);
  m.impl("concat_elu_backward", &vaekernels::cpu::concat_elu_backward);
}
