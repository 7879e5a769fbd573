// Host-side test harness for kernels/rules.cuh (tests/test_cuda_c.py).
//
// Compiled by nvcc as a shared library (the real header path: the rules are __host__ __device__
// and go through nvcc's front end), loaded with ctypes. It applies a rule, picked by name from
// FO_RULES, elementwise over host arrays, either with plain float/double arithmetic or through
// the fo::ieee<> wrapper the device kernels use (on the host its operators are the plain C++
// ones, so this checks that the rules instantiate and behave identically with that type).

#include <cstring>

#include "rules.cuh"

namespace {

template <typename F>
F value(F x) { return x; }
template <typename F>
F value(fo::ieee<F> x) { return x.v; }

// Same element loop as the kernels' scalar path: load, convert to the arithmetic type A,
// transform the gradient, apply the rule, convert back, store.
template <typename F, typename A, class Op>
void run(long long n, F* p, const F* g, F* s0, F* s1, F* s2, const F* hraw, F gscale_,
         F clip_) {
    A h[FO_MAX_SCALARS];
    for (int k = 0; k < FO_MAX_SCALARS; ++k) h[k] = A(hraw[k]);
    const A gscale(gscale_), clip(clip_);
    F* sp[3] = {s0, s1, s2};
    for (long long i = 0; i < n; ++i) {
        A pk(p[i]);
        A s[3];
        for (int j = 0; j < Op::num_states; ++j) s[j] = A(sp[j][i]);
        Op::apply(pk, fo::transformed_grad(A(g[i]), gscale, clip), s, h);
        p[i] = value(pk);
        for (int j = 0; j < Op::num_states; ++j) sp[j][i] = value(s[j]);
    }
}

template <typename F>
int dispatch(const char* name, int use_ieee, long long n, F* p, const F* g, F* s0, F* s1, F* s2,
             const F* h, F gscale, F clip) {
#define FO_HOST_CASE(rule, nstates, nscalars)                                      \
    if (std::strcmp(name, #rule) == 0) {                                           \
        if (use_ieee) {                                                            \
            run<F, fo::ieee<F>, fo::op_##rule>(n, p, g, s0, s1, s2, h, gscale, clip); \
        } else {                                                                   \
            run<F, F, fo::op_##rule>(n, p, g, s0, s1, s2, h, gscale, clip);        \
        }                                                                          \
        return 0;                                                                  \
    }
    FO_RULES(FO_HOST_CASE)
#undef FO_HOST_CASE
    return -1;
}

#define FO_TABLE_ENTRY(rule, nstates, nscalars) #rule " " #nstates " " #nscalars ";"
const char rule_table[] = FO_RULES(FO_TABLE_ENTRY);
#undef FO_TABLE_ENTRY

}  // namespace

// "name nstates nscalars;" for every entry of FO_RULES, in order.
extern "C" const char* fo_host_rule_table() { return rule_table; }

extern "C" int fo_host_max_scalars() { return FO_MAX_SCALARS; }

// h points to FO_MAX_SCALARS values; unused state pointers may be null; (gscale, clip) is the
// `gs` pair of the loops (fo::transformed_grad). Returns -1 for an unknown rule name.
extern "C" int fo_host_apply_f32(const char* name, int use_ieee, long long n, float* p,
                                 const float* g, float* s0, float* s1, float* s2,
                                 const float* h, float gscale, float clip) {
    return dispatch<float>(name, use_ieee, n, p, g, s0, s1, s2, h, gscale, clip);
}

extern "C" int fo_host_apply_f64(const char* name, int use_ieee, long long n, double* p,
                                 const double* g, double* s0, double* s1, double* s2,
                                 const double* h, double gscale, double clip) {
    return dispatch<double>(name, use_ieee, n, p, g, s0, s1, s2, h, gscale, clip);
}
