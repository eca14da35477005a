/* The constants of the kernels' fp32 exponential, shared by every C kernel here (cpu_kernels):
 * x = n ln2 + r (ln2 split in two so that n ln2 is exact for the n that occur), then e^r by a
 * degree-6 polynomial, 1 + r + r^2 (C1 + r (C2 + ... + r C6)), and 2^n through the exponent
 * bits. Within 1 ulp of expf over the normal range. The layer ops keep their own clamp and order
 * of operations (no multiply-add contraction there); the attention kernels share exp_neg below
 * and their vector versions of it (which may fuse into multiply-adds). */
#ifndef SLAQ_EXP_POLY_H
#define SLAQ_EXP_POLY_H

#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
#define EXP_C6 1.9875691500e-4f
#define EXP_C5 1.3981999507e-3f
#define EXP_C4 8.3334519073e-3f
#define EXP_C3 4.1665795894e-2f
#define EXP_C2 1.6666665459e-1f
#define EXP_C1 5.0000001201e-1f

#include <math.h>
#include <stdint.h>

/* The attention kernels' softmax weights: e^x for x <= 0. Inputs below EXP_FLOOR (and -inf)
 * give e^-87, about 1.6e-38: still a normal float, and nothing beside the row's maximum (which
 * gives 1). NaN stays NaN, and never reaches the int conversion. */
#define EXP_FLOOR -87.0f

static inline float exp_neg(float x) {
    if (x != x) return x;
    if (x < EXP_FLOOR) x = EXP_FLOOR;
    float n = floorf(x * LOG2E + 0.5f);
    float r = x - n * LN2_HI - n * LN2_LO;
    float p = EXP_C6;
    p = p * r + EXP_C5;
    p = p * r + EXP_C4;
    p = p * r + EXP_C3;
    p = p * r + EXP_C2;
    p = p * r + EXP_C1;
    p = p * r * r + r + 1.0f;
    union { float f; int32_t i; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

#endif
