/* qn_common.c — the thread-local error message and format-descriptor checks. */
#include <stdarg.h>
#include <stdio.h>

#include "qn_common.h"
#include "qn_formats.h"

static _Thread_local char g_errmsg[512];

qn_status qn_set_error(qn_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_errmsg, sizeof g_errmsg, fmt, ap);
    va_end(ap);
    return st;
}

const char *qn_last_error(void) { return g_errmsg; }

qn_status qn_format_check(const qn_format *f) {
    if (!f) return qn_set_error(QN_EINVAL, "format: missing descriptor");
    int b = f->bits;
    if (!(b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8))
        return qn_set_error(QN_EINVAL, "format: bits must be 2, 3, 4, 5, 6 or 8, got %d", b);
    int g = f->group;
    if (!(g == 0 || g == 16 || g == 32 || g == 64 || g == 128 || g == 256))
        return qn_set_error(QN_EINVAL, "format: group must be 16, 32, 64, 128, 256 or 0 (per row), got %d", g);
    if (f->kind < QN_SYM || f->kind > QN_LUT)
        return qn_set_error(QN_EINVAL, "format: unknown kind %d", f->kind);
    if (f->scale < QN_SCALE_F32 || f->scale > QN_SCALE_NESTED_I8)
        return qn_set_error(QN_EINVAL, "format: unknown scale type %d", f->scale);
    if (f->kind == QN_ASYM && f->offset != QN_OFF_MIN && f->offset != QN_OFF_ZERO)
        return qn_set_error(QN_EINVAL, "format: asym needs offset 'min' or 'zero'");
    if (f->kind != QN_ASYM && f->offset != QN_OFF_NONE)
        return qn_set_error(QN_EINVAL, "format: only asym formats have offsets");
    if (f->scale == QN_SCALE_NESTED_U6 && !(f->kind == QN_ASYM && f->offset == QN_OFF_MIN &&
                                            g == 32 && (b == 4 || b == 5)))
        return qn_set_error(QN_EINVAL, "format: nested 6-bit scales are for q4_k/q5_k layouts only");
    if (f->scale == QN_SCALE_NESTED_I8 && !(f->kind == QN_SYM && g == 16 && b == 6))
        return qn_set_error(QN_EINVAL, "format: nested int8 scales are for the q6_k layout only");
    if (f->kind == QN_LUT) {
        int n = 1 << b;
        for (int i = 0; i < n; i++)
            if (!(f->lut[i] == f->lut[i]) || f->lut[i] > 3.4e38f || f->lut[i] < -3.4e38f)
                return qn_set_error(QN_EINVAL, "format: lut entry %d is not finite", i);
    }
    if (f->rule < QN_RULE_DEFAULT || f->rule > QN_RULE_KQUANT)
        return qn_set_error(QN_EINVAL, "format: unknown quantization rule %d", f->rule);
    return QN_OK;
}

qn_status qn_format_check_k(const qn_format *f, int64_t K) {
    (void)f;
    if (K <= 0) return qn_set_error(QN_EINVAL, "K must be positive, got %lld", (long long)K);
    return QN_OK;
}
