// Elementwise math for the kernels' loops, written so that g++ -O3 -fno-trapping-math vectorises
// the loops that call it (std::exp is a call per element, which stops vectorisation); used by the
// recurrence kernel's gate loop. kernels.py puts every header's text into each kernel's build key.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace iacn_vec {

// exp for float in a form the compiler vectorises (Cephes' expf polynomial on a range-reduced
// argument, relative error < 2e-7; arguments clamped to [-87, 88], where float's exp is finite and
// normal). ATen's exp is vectorised too, but only as a whole-tensor op: inside a kernel's loop over
// a few rows, one dispatched op per step and function costs more than the arithmetic.
inline float exp_of(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // x = m ln 2 + r, |r| <= ln 2 / 2; m rounded to nearest by the 1.5 * 2^23 trick (no call, so vectorised)
  const float m = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = x - m * 0.693359375f;
  r = r - m * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(m) + 127) << 23;  // 2^m
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
inline double exp_of(double x) { return std::exp(x); }  // float64: the tests' precision, not speed

template <typename T>
inline T sigmoid_of(T x) {
  return T(1) / (T(1) + exp_of(-x));
}
template <typename T>
inline T tanh_of(T x) {
  return T(1) - T(2) / (T(1) + exp_of(T(2) * x));  // absolute error ~1e-7 in float
}

}  // namespace iacn_vec
