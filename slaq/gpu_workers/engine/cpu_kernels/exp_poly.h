/* The constants of the kernels' fp32 exponential, shared by paged_decode.c and layer_ops.c:
 * x = n ln2 + r (ln2 split in two so that n ln2 is exact for the n that occur), then e^r by a
 * degree-6 polynomial, 1 + r + r^2 (C1 + r (C2 + ... + r C6)), and 2^n through the exponent
 * bits. Within 1 ulp of expf over the normal range. Each file keeps its own clamp and order of
 * operations (the attention's may fuse into multiply-adds; the layer ops' must not). */
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

#endif
