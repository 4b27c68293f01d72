/* quantize.h — float weights to the panel layout and back, and code packing. */
#ifndef QN_QUANTIZE_H
#define QN_QUANTIZE_H

#include "../qn_formats.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Output arrays of a quantization, sized per qn_formats.h; NULL where the format has none. */
typedef struct qn_qweight_out {
    uint8_t *codes;
    void *scales;
    void *offsets;
    uint16_t *supers;
    uint16_t *super_mins;
} qn_qweight_out;

/* Bytes of workspace qn_quantize needs with nthreads threads. */
int64_t qn_quantize_workspace_size(const qn_format *f, int64_t K, int nthreads);

/* Quantize w[N, K] (float32, row stride ldw) into out, in parallel over panels. */
qn_status qn_quantize(const qn_format *f, const float *w, int64_t N, int64_t K, int64_t ldw,
                      qn_qweight_out *out, void *workspace, int64_t ws_bytes);

/* GPTQ (Frantar et al., 2023): quantizes W[N, K] (float32, row-major, columns in processing
 * order) column by column, each column's rounding error spread over the columns not yet
 * quantized through U[K, K], the upper Cholesky factor of H^-1 (H = X^T X of calibration
 * inputs, damped; same column order, row-major); errors of a block of `block` columns
 * reach the later columns in one batched update. cols[j]: the input index of processing
 * column j (NULL: identity), which needs static_params. static_params: out already holds
 * the group parameters (e.g. from qn_quantize of the original W); else each group's (or
 * super-block's) parameters come from the quantizer's rule on the row as updated when
 * the group starts. out's arrays must be zero-filled; codes are written by the call.
 * Rows are independent: parallel over 16-row panels. *loss: sum of e^2 / 2 over all
 * weights, e = (w - q) / U[j, j] (GPTQ's objective). */
qn_status qn_gptq(const qn_format *f, const float *W, int64_t N, int64_t K, const float *U, const int64_t *cols,
                  int64_t block, int static_params, qn_qweight_out *out, double *loss);

/* codes[N, K] row-major uint8 (values < 2^bits, row stride ld) <-> the panel code layout
 * (out zero-filled to [n_panels][Kp/32][chunk bytes] first). */
qn_status qn_pack_codes(uint8_t *out, const uint8_t *codes, int bits, int64_t N, int64_t K, int64_t ld);
qn_status qn_unpack_codes(uint8_t *codes, const uint8_t *packed, int bits, int64_t N, int64_t K, int64_t ld);

/* out[N, K] (row stride ldo) = the float32 values of w: s*(q - z), s*q + m or s*lut[q],
 * each one rounding of float32 math, as GGUF's dequantizers compute them. */
qn_status qn_dequantize(float *out, const qn_qweight *w, int64_t ldo);

#ifdef __cplusplus
}
#endif
#endif
