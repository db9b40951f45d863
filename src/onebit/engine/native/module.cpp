// pybind11 bindings of onebit.engine._native. numpy arrays in and out, no torch.
// Every entry point checks dtype, rank and sizes and raises ValueError with a one-line
// message; non-contiguous inputs are copied to C order. The GIL is released while computing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "onebit_kernels.hpp"

namespace py = pybind11;
using namespace onebit;

namespace onebit {
double probe_clock_ghz(std::int64_t iters);
double probe_popcnt_peak(std::int64_t iters, const std::string& path);
}  // namespace onebit

namespace {

[[noreturn]] void fail(const std::string& msg) { throw py::value_error(msg); }

std::string shape_str(const py::array& a) {
    std::ostringstream s;
    s << "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
    if (a.ndim() == 1) s << ",";
    s << ")";
    return s.str();
}

template <class T>
const char* dtype_name();
template <> const char* dtype_name<std::uint64_t>() { return "uint64"; }
template <> const char* dtype_name<std::uint8_t>() { return "uint8"; }
template <> const char* dtype_name<float>() { return "float32"; }
template <> const char* dtype_name<std::int32_t>() { return "int32"; }

template <class T>
bool dtype_is(const py::array& a) {
    const py::dtype d = a.dtype();
    const char kind = d.kind();
    if (py::ssize_t(d.itemsize()) != py::ssize_t(sizeof(T))) return false;
    if (std::is_floating_point<T>::value) return kind == 'f';
    if (std::is_unsigned<T>::value) return kind == 'u';
    return kind == 'i';
}

py::array require_ndarray(const py::handle& obj, const char* what) {
    if (!py::isinstance<py::array>(obj))
        fail(std::string(what) + " must be a numpy array, got " +
             std::string(py::str(py::type::of(obj).attr("__name__"))));
    return py::reinterpret_borrow<py::array>(obj);
}

// dtype check + C-contiguous (copy if needed) + rank check
template <class T>
py::array_t<T, py::array::c_style> get(const py::handle& obj, const char* what, int ndim) {
    py::array a = require_ndarray(obj, what);
    if (!dtype_is<T>(a))
        fail(std::string(what) + " must have dtype " + dtype_name<T>() + ", got " +
             std::string(py::str(a.dtype())));
    if (ndim >= 0 && a.ndim() != ndim)
        fail(std::string(what) + " must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a));
    return py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(a);
}

int check_threads(int threads) {
    if (threads < 0) fail("threads must be >= 0 (0 = all cores), got " + std::to_string(threads));
    return threads;
}

std::pair<std::int64_t, std::int64_t> pair_arg(const py::handle& obj, const char* what) {
    if (py::isinstance<py::bool_>(obj)) fail(std::string(what) + " must be an int or a pair of ints");
    if (py::isinstance<py::int_>(obj)) {
        const std::int64_t v = obj.cast<std::int64_t>();
        return {v, v};
    }
    if (py::isinstance<py::tuple>(obj) || py::isinstance<py::list>(obj)) {
        py::sequence s = py::reinterpret_borrow<py::sequence>(obj);
        if (s.size() == 2 && py::isinstance<py::int_>(s[0]) && py::isinstance<py::int_>(s[1]))
            return {s[0].cast<std::int64_t>(), s[1].cast<std::int64_t>()};
    }
    fail(std::string(what) + " must be an int or a pair of ints");
}

// scale / thresh of a threshold call, validated and turned into the epilogue's compare form
// (tcmp, flip; see OutSpec) in one vectorisable pass while the GIL is held.
struct ThresholdArgs {
    std::vector<std::int32_t> tcmp;
    std::vector<std::uint64_t> flip;
};

template <class T>
py::array_t<T, py::array::c_style> get_vec(const py::handle& obj, const char* what, std::int64_t N);

void threshold_args(const py::handle& s_obj, const py::handle& t_obj, std::int64_t N, ThresholdArgs& out,
                    OutSpec& spec) {
    py::array a = require_ndarray(s_obj, "scale");
    const bool i8 = dtype_is<std::int8_t>(a);
    if (!i8 && !dtype_is<std::int32_t>(a))
        fail("scale must have dtype int8 or int32, got " + std::string(py::str(a.dtype())));
    if (a.ndim() != 1) fail("scale must be 1-D, got shape " + shape_str(a));
    if (a.shape(0) != N)
        fail("scale must have " + std::to_string(N) + " entries (one per output), got " + std::to_string(a.shape(0)));
    auto t = get_vec<std::int32_t>(t_obj, "thresh", N);
    py::array s = i8 ? py::array(py::array_t<std::int8_t, py::array::c_style | py::array::forcecast>::ensure(a))
                     : py::array(py::array_t<std::int32_t, py::array::c_style | py::array::forcecast>::ensure(a));
    out.tcmp.resize(std::size_t(N));
    out.flip.resize(std::size_t((N + 63) / 64));
    if (!current_table().threshold_prep(s.data(), i8, t.data(), N, out.tcmp.data(), out.flip.data())) {
        for (std::int64_t n = 0; n < N; ++n) {
            const int v = i8 ? int(static_cast<const std::int8_t*>(s.data())[n])
                             : int(static_cast<const std::int32_t*>(s.data())[n]);
            if (v < -1 || v > 1)
                fail("scale entries must be -1, 0 or +1, got " + std::to_string(v) + " at index " + std::to_string(n));
        }
    }
    spec.mode = OutMode::Threshold;
    spec.tcmp = out.tcmp.data();
    spec.flip = out.flip.data();
}

template <class T>
py::array_t<T, py::array::c_style> get_vec(const py::handle& obj, const char* what, std::int64_t N) {
    auto v = get<T>(obj, what, 1);
    if (v.shape(0) != N)
        fail(std::string(what) + " must have " + std::to_string(N) + " entries (one per output), got " +
             std::to_string(v.shape(0)));
    return v;
}

// the prepared layout back to row-major [N][KW] words, returned with the given shape
py::array_t<std::uint64_t> unpack_layout(const PackedWeights& W, std::vector<py::ssize_t> shape) {
    py::array_t<std::uint64_t> out(shape);
    std::uint64_t* o = out.mutable_data();
    for (std::int64_t n = 0; n < W.N; ++n) {
        const std::int64_t g = n / GROUP, c = n % GROUP;
        const std::size_t ldw = std::size_t(W.group_panels(g)) * PANEL;
        for (std::int64_t k = 0; k < W.KW; ++k) o[n * W.KW + k] = W.group(g)[std::size_t(k) * ldw + std::size_t(c)];
    }
    return out;
}

// The dot products are int32, and the epilogue computes K - 2·popcount: below 2^30 neither overflows.
constexpr std::int64_t MAX_K = (std::int64_t(1) << 30) - 1;

void check_max_k(std::int64_t K) {
    if (K > MAX_K) fail("K = " + std::to_string(K) + " exceeds the engine's limit of 2^30 - 1 (int32 sums)");
}

// ===========================================================================================
class BinaryMatrix {
  public:
    BinaryMatrix(const py::handle& w_obj, std::int64_t K) {
        auto w = get<std::uint64_t>(w_obj, "w_bits", 2);
        if (K < 1) fail("K must be >= 1, got " + std::to_string(K));
        check_max_k(K);
        const std::int64_t N = w.shape(0), KW = w.shape(1);
        if (N < 1) fail("w_bits must have at least one row (output), got shape " + shape_str(w));
        if (KW != (K + 63) / 64)
            fail("w_bits has " + std::to_string(KW) + " words per row but K=" + std::to_string(K) +
                 " needs ceil(K/64)=" + std::to_string((K + 63) / 64));
        std::vector<std::uint64_t> keep(std::size_t(KW), ~std::uint64_t(0));
        if (K % 64) keep.back() = (std::uint64_t(1) << (K % 64)) - 1;
        const std::uint64_t* wp = w.data();
        py::gil_scoped_release nogil;
        W_ = pack_weights(wp, N, KW, K, keep);
    }

    std::int64_t N() const { return W_.N; }
    std::int64_t K() const { return W_.K; }
    std::int64_t KW() const { return W_.KW; }
    const PackedWeights& packed() const { return W_; }

    py::array_t<std::uint64_t> to_bits() const { return unpack_layout(W_, {W_.N, W_.KW}); }

    py::array_t<std::uint64_t, py::array::c_style> activations(const py::handle& obj) const {
        auto a = get<std::uint64_t>(obj, "a", 2);
        if (a.shape(1) != W_.KW)
            fail("a has " + std::to_string(a.shape(1)) + " words per row, the matrix expects " +
                 std::to_string(W_.KW) + " (K=" + std::to_string(W_.K) + ")");
        return a;
    }

    py::array gemm(const py::handle& a_obj, int threads) const {
        check_threads(threads);
        auto a = activations(a_obj);
        const std::int64_t M = a.shape(0);
        py::array_t<std::int32_t> out({M, W_.N});
        OutSpec spec;
        spec.mode = OutMode::Raw;
        spec.raw = out.mutable_data();
        run(a, spec, threads);
        return std::move(out);
    }

    py::array gemm_threshold(const py::handle& a_obj, const py::handle& s_obj, const py::handle& t_obj,
                             int threads) const {
        check_threads(threads);
        auto a = activations(a_obj);
        OutSpec spec;
        ThresholdArgs targs;
        threshold_args(s_obj, t_obj, W_.N, targs, spec);
        const std::int64_t M = a.shape(0);
        py::array_t<std::uint64_t> out({M, W_.ngroups});
        spec.bits = out.mutable_data();
        run(a, spec, threads);
        return std::move(out);
    }

    py::array gemm_affine(const py::handle& a_obj, const py::handle& m_obj, const py::handle& b_obj,
                          int threads) const {
        check_threads(threads);
        auto a = activations(a_obj);
        auto mul = get_vec<float>(m_obj, "mul", W_.N);
        auto add = get_vec<float>(b_obj, "add", W_.N);
        const std::int64_t M = a.shape(0);
        py::array_t<float> out({M, W_.N});
        OutSpec spec;
        spec.mode = OutMode::Affine;
        spec.affine = out.mutable_data();
        spec.mul = mul.data();
        spec.add = add.data();
        run(a, spec, threads);
        return std::move(out);
    }

  private:
    void run(const py::array_t<std::uint64_t, py::array::c_style>& a, const OutSpec& spec, int threads) const {
        const std::uint64_t* ap = a.data();
        const std::int64_t M = a.shape(0);
        py::gil_scoped_release nogil;
        gemm_driver(ap, std::size_t(W_.KW), M, W_, spec, threads);
    }

    PackedWeights W_;
};

// ===========================================================================================
class BinaryConv2d {
  public:
    BinaryConv2d(const py::handle& w_obj, std::int64_t C, std::int64_t kh, std::int64_t kw,
                 const py::handle& stride, const py::handle& padding, int pad_value) {
        auto w = get<std::uint64_t>(w_obj, "w_bits", 4);
        if (C < 1) fail("C must be >= 1, got " + std::to_string(C));
        if (kh < 1 || kw < 1) fail("kernel size must be >= 1, got " + std::to_string(kh) + "x" + std::to_string(kw));
        std::tie(sh_, sw_) = pair_arg(stride, "stride");
        std::tie(ph_, pw_) = pair_arg(padding, "padding");
        if (sh_ < 1 || sw_ < 1) fail("stride must be >= 1");
        if (ph_ < 0 || pw_ < 0) fail("padding must be >= 0");
        if (pad_value != 1 && pad_value != -1 && pad_value != 0)
            fail("pad_value must be +1, -1 or 0, got " + std::to_string(pad_value));
        check_max_k(kh * kw * C);
        CW_ = (C + 63) / 64;
        if (w.shape(1) != kh || w.shape(2) != kw || w.shape(3) != CW_)
            fail("w_bits must have shape (O, " + std::to_string(kh) + ", " + std::to_string(kw) + ", " +
                 std::to_string(CW_) + ") for C=" + std::to_string(C) + ", got " + shape_str(w));
        O_ = w.shape(0);
        if (O_ < 1) fail("w_bits must have at least one output channel, got shape " + shape_str(w));
        C_ = C;
        kh_ = kh;
        kw_ = kw;
        pad_value_ = pad_value;
        const std::int64_t T = kh * kw, Kc = T * CW_;
        std::vector<std::uint64_t> keep(std::size_t(Kc), ~std::uint64_t(0));
        const std::uint64_t cmask = (C % 64) ? ((std::uint64_t(1) << (C % 64)) - 1) : ~std::uint64_t(0);
        for (std::int64_t t = 0; t < T; ++t) keep[std::size_t(t * CW_ + CW_ - 1)] = cmask;
        const std::uint64_t* wp = w.data();
        py::gil_scoped_release nogil;
        W_ = pack_weights(wp, O_, Kc, T * C, keep);
        wsum_.assign(std::size_t(O_ * T), 0);
        for (std::int64_t o = 0; o < O_; ++o)
            for (std::int64_t t = 0; t < T; ++t) {
                std::int32_t pc = 0;
                for (std::int64_t c = 0; c < CW_; ++c) {
                    const std::uint64_t v = wp[std::size_t((o * T + t) * CW_ + c)] & keep[std::size_t(t * CW_ + c)];
                    pc += __builtin_popcountll(v);
                }
                wsum_[std::size_t(o * T + t)] = std::int32_t(C) - 2 * pc;
            }
    }

    std::pair<std::int64_t, std::int64_t> output_size(std::int64_t H, std::int64_t W) const {
        const std::int64_t eh = H + 2 * ph_ - kh_, ew = W + 2 * pw_ - kw_;
        if (H < 1 || W < 1 || eh < 0 || ew < 0)
            fail("input of " + std::to_string(H) + "x" + std::to_string(W) + " pixels is smaller than the " +
                 std::to_string(kh_) + "x" + std::to_string(kw_) + " kernel with padding " +
                 std::to_string(ph_) + "x" + std::to_string(pw_));
        return {eh / sh_ + 1, ew / sw_ + 1};
    }

    ConvGeom geometry(const py::array& x) const {
        if (x.shape(3) != CW_)
            fail("x has " + std::to_string(x.shape(3)) + " words per pixel, the conv expects " +
                 std::to_string(CW_) + " (C=" + std::to_string(C_) + ")");
        ConvGeom g;
        g.B = x.shape(0);
        g.H = x.shape(1);
        g.W = x.shape(2);
        g.C = C_;
        g.CW = CW_;
        g.O = O_;
        g.kh = kh_;
        g.kw = kw_;
        g.sh = sh_;
        g.sw = sw_;
        g.ph = ph_;
        g.pw = pw_;
        g.pad_value = pad_value_;
        std::tie(g.Ho, g.Wo) = output_size(g.H, g.W);
        return g;
    }

    template <class T>
    py::array run(const py::handle& x_obj, OutSpec spec, std::int64_t last, int threads) const {
        check_threads(threads);
        auto x = get<std::uint64_t>(x_obj, "x", 4);
        const ConvGeom g = geometry(x);
        py::array_t<T> out({g.B, g.Ho, g.Wo, last});
        T* o = out.mutable_data();
        if (spec.mode == OutMode::Raw) spec.raw = reinterpret_cast<std::int32_t*>(o);
        if (spec.mode == OutMode::Threshold) spec.bits = reinterpret_cast<std::uint64_t*>(o);
        if (spec.mode == OutMode::Affine) spec.affine = reinterpret_cast<float*>(o);
        const std::uint64_t* xp = x.data();
        {
            py::gil_scoped_release nogil;
            conv_driver(xp, g, W_, wsum_, spec, threads);
        }
        return std::move(out);
    }

    py::array conv(const py::handle& x, int threads) const {
        OutSpec spec;
        spec.mode = OutMode::Raw;
        return run<std::int32_t>(x, spec, O_, threads);
    }

    py::array conv_threshold(const py::handle& x, const py::handle& s_obj, const py::handle& t_obj,
                             int threads) const {
        OutSpec spec;
        ThresholdArgs targs;
        threshold_args(s_obj, t_obj, O_, targs, spec);
        return run<std::uint64_t>(x, spec, W_.ngroups, threads);
    }

    py::array conv_affine(const py::handle& x, const py::handle& m_obj, const py::handle& b_obj,
                          int threads) const {
        auto mul = get_vec<float>(m_obj, "mul", O_);
        auto add = get_vec<float>(b_obj, "add", O_);
        OutSpec spec;
        spec.mode = OutMode::Affine;
        spec.mul = mul.data();
        spec.add = add.data();
        return run<float>(x, spec, O_, threads);
    }

    std::int64_t O_ = 0, C_ = 0, CW_ = 0, kh_ = 0, kw_ = 0, sh_ = 1, sw_ = 1, ph_ = 0, pw_ = 0;
    int pad_value_ = 1;
    PackedWeights W_;
    std::vector<std::int32_t> wsum_;
};

// ===========================================================================================
py::array pack_signs_py(const py::handle& x_obj, int threads) {
    check_threads(threads);
    auto x = get<float>(x_obj, "x", -1);
    if (x.ndim() < 1) fail("x must have at least one dimension");
    const std::int64_t K = x.shape(x.ndim() - 1);
    if (K < 1) fail("x must have a non-empty last axis (K >= 1), got shape " + shape_str(x));
    std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
    shape.back() = (K + 63) / 64;
    std::int64_t M = 1;
    for (py::ssize_t i = 0; i + 1 < x.ndim(); ++i) M *= x.shape(i);
    py::array_t<std::uint64_t> out(shape);
    const float* xp = x.data();
    std::uint64_t* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        pack_signs_driver(xp, M, K, op, threads);
    }
    return std::move(out);
}

py::array maxpool_bits_py(const py::handle& x_obj, const py::handle& kernel, const py::handle& stride,
                          int threads) {
    check_threads(threads);
    auto x = get<std::uint64_t>(x_obj, "x", 4);
    std::int64_t kh, kw, sh, sw;
    std::tie(kh, kw) = pair_arg(kernel, "kernel");
    if (stride.is_none()) {
        sh = kh;
        sw = kw;
    } else {
        std::tie(sh, sw) = pair_arg(stride, "stride");
    }
    if (kh < 1 || kw < 1) fail("kernel must be >= 1");
    if (sh < 1 || sw < 1) fail("stride must be >= 1");
    const std::int64_t B = x.shape(0), H = x.shape(1), W = x.shape(2), CW = x.shape(3);
    if (H < kh || W < kw)
        fail("input of " + std::to_string(H) + "x" + std::to_string(W) + " pixels is smaller than the " +
             std::to_string(kh) + "x" + std::to_string(kw) + " pooling window");
    const std::int64_t Ho = (H - kh) / sh + 1, Wo = (W - kw) / sw + 1;
    py::array_t<std::uint64_t> out({B, Ho, Wo, CW});
    const std::uint64_t* xp = x.data();
    std::uint64_t* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        maxpool_driver(xp, B, H, W, CW, kh, kw, sh, sw, op, threads);
    }
    return std::move(out);
}

// x of bitplane_gemm*: uint8 [M, K]; |sum| <= 255·K must fit int32
py::array_t<std::uint8_t, py::array::c_style> bitplane_input(const py::handle& x_obj, const BinaryMatrix& w) {
    auto x = get<std::uint8_t>(x_obj, "x", 2);
    if (x.shape(1) != w.K())
        fail("x has " + std::to_string(x.shape(1)) + " features, the matrix expects K=" + std::to_string(w.K()));
    if (255 * w.K() >= (std::int64_t(1) << 31))
        fail("bitplane_gemm needs 255*K < 2^31, got K=" + std::to_string(w.K()));
    return x;
}

// lo / hi of bitplane_gemm_outside: alike, int32 [P, N], P >= 1 dividing the M rows of x
using Bounds = py::array_t<std::int32_t, py::array::c_style>;
std::pair<Bounds, Bounds> outside_bounds(const py::handle& lo_obj, const py::handle& hi_obj, std::int64_t M,
                                         std::int64_t N) {
    auto lo = get<std::int32_t>(lo_obj, "lo", 2);
    auto hi = get<std::int32_t>(hi_obj, "hi", 2);
    if (lo.shape(1) != N || hi.shape(0) != lo.shape(0) || hi.shape(1) != N)
        fail("lo and hi must both have shape (P, " + std::to_string(N) + "), got " + shape_str(lo) + " and " +
             shape_str(hi));
    if (lo.shape(0) < 1 || M % lo.shape(0) != 0)
        fail("lo and hi must have a number of rows P >= 1 that divides the " + std::to_string(M) +
             " rows of x, got P=" + std::to_string(lo.shape(0)));
    return {lo, hi};
}

py::array bitplane_gemm_py(const py::handle& x_obj, const BinaryMatrix& w, int threads) {
    check_threads(threads);
    auto x = bitplane_input(x_obj, w);
    const std::int64_t M = x.shape(0);
    py::array_t<std::int32_t> out({M, w.N()});
    const std::uint8_t* xp = x.data();
    std::int32_t* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        u8_driver(xp, M, w.packed(), op, threads);
    }
    return std::move(out);
}

py::array bitplane_gemm_outside_py(const py::handle& x_obj, const BinaryMatrix& w, const py::handle& lo_obj,
                                   const py::handle& hi_obj, int threads) {
    check_threads(threads);
    auto x = bitplane_input(x_obj, w);
    const std::int64_t M = x.shape(0);
    auto bounds = outside_bounds(lo_obj, hi_obj, M, w.N());
    py::array_t<std::uint64_t> out({M, (w.N() + 63) / 64});
    const OutsideBits o{bounds.first.data(), bounds.second.data(), bounds.first.shape(0), out.mutable_data()};
    const std::uint8_t* xp = x.data();
    {
        py::gil_scoped_release nogil;
        u8_driver(xp, M, w.packed(), nullptr, threads, &o);
    }
    return std::move(out);
}

py::array float_gemm_binary_py(const py::handle& x_obj, const BinaryMatrix& w, int threads) {
    check_threads(threads);
    auto x = get<float>(x_obj, "x", 2);
    if (x.shape(1) != w.K())
        fail("x has " + std::to_string(x.shape(1)) + " features, the matrix expects K=" + std::to_string(w.K()));
    const std::int64_t M = x.shape(0);
    py::array_t<float> out({M, w.N()});
    const float* xp = x.data();
    float* op = out.mutable_data();
    {
        py::gil_scoped_release nogil;
        float_driver(xp, M, w.packed(), op, threads);
    }
    return std::move(out);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "onebit native XNOR/popcount kernels (AVX-512 VPOPCNTDQ / AVX2 / portable)";

    m.def("available_paths", &available_paths, "Kernel paths this CPU supports, fastest first.");
    m.def("current_path", &current_path, "Name of the kernel path in use.");
    m.def(
        "set_path",
        [](const std::string& name) {
            if (!set_path(name)) {
                std::string valid;
                for (const auto& p : available_paths()) valid += (valid.empty() ? "" : ", ") + p;
                fail("kernel path '" + name + "' is unknown or not supported by this CPU (available: " + valid + ")");
            }
        },
        py::arg("name"), "Select the kernel path for all later calls.");
    m.def("max_threads", []() { return resolve_threads(0); }, "Threads used when threads=0.");
    m.def("_probe_clock_ghz", [](std::int64_t iters) { py::gil_scoped_release nogil; return probe_clock_ghz(iters); },
          py::arg("iters") = 2000000, "Core clock in GHz from a chain of dependent adds (one thread).");
    m.def("_probe_popcnt_peak",
          [](std::int64_t iters, const std::string& path) {
              py::gil_scoped_release nogil;
              return probe_popcnt_peak(iters, path);
          },
          py::arg("iters") = 2000000, py::arg("path") = "avx512",
          "In-register XOR + popcount + accumulate bit pairs per second (one thread) of path 'avx512' "
          "(VPOPCNTQ) or 'avx2' (nibble lookup); 0 where the CPU lacks it.");
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif

    m.def("pack_signs", &pack_signs_py, py::arg("x"), py::arg("threads") = 0,
          "float32[..., K] -> uint64[..., ceil(K/64)]; bit 1 iff x < 0 (-0.0 and NaN give 0 = +1).");
    m.def("maxpool_bits", &maxpool_bits_py, py::arg("x"), py::arg("kernel"), py::arg("stride") = py::none(),
          py::arg("threads") = 0, "Max pool of packed NHWC +-1 activations: AND of the window's bits.");
    m.def("bitplane_gemm", &bitplane_gemm_py, py::arg("x"), py::arg("w"), py::arg("threads") = 0,
          "uint8[M, K] x BinaryMatrix -> int32[M, N], exact sum_k x_k * w_k.");
    m.def("bitplane_gemm_outside", &bitplane_gemm_outside_py, py::arg("x"), py::arg("w"), py::arg("lo"),
          py::arg("hi"), py::arg("threads") = 0,
          "uint8[M, K] x BinaryMatrix, int32 lo/hi [P, N] -> uint64[M, ceil(N/64)]: bit n of row m is 1 iff "
          "sum_k x_k * w_k lies outside [lo[m % P, n], hi[m % P, n]].");
    m.def("float_gemm_binary", &float_gemm_binary_py, py::arg("x"), py::arg("w"), py::arg("threads") = 0,
          "float32[M, K] x BinaryMatrix -> float32[M, N]; float32 sum in increasing k per output.");

    py::class_<BinaryMatrix>(m, "BinaryMatrix")
        .def(py::init<const py::handle&, std::int64_t>(), py::arg("w_bits"), py::arg("K"))
        .def_property_readonly("N", &BinaryMatrix::N)
        .def_property_readonly("K", &BinaryMatrix::K)
        .def_property_readonly("KW", &BinaryMatrix::KW)
        .def("to_bits", &BinaryMatrix::to_bits, "The (masked) weight bits as uint64[N, KW].")
        .def("gemm", &BinaryMatrix::gemm, py::arg("a"), py::arg("threads") = 0)
        .def("gemm_threshold", &BinaryMatrix::gemm_threshold, py::arg("a"), py::arg("scale"),
             py::arg("thresh"), py::arg("threads") = 0)
        .def("gemm_affine", &BinaryMatrix::gemm_affine, py::arg("a"), py::arg("mul"), py::arg("add"),
             py::arg("threads") = 0);

    py::class_<BinaryConv2d>(m, "BinaryConv2d")
        .def(py::init<const py::handle&, std::int64_t, std::int64_t, std::int64_t, const py::handle&,
                      const py::handle&, int>(),
             py::arg("w_bits"), py::arg("C"), py::arg("kh"), py::arg("kw"), py::arg("stride") = 1,
             py::arg("padding") = 0, py::arg("pad_value") = 1)
        .def_property_readonly("O", [](const BinaryConv2d& c) { return c.O_; })
        .def_property_readonly("C", [](const BinaryConv2d& c) { return c.C_; })
        .def_property_readonly("kernel_size", [](const BinaryConv2d& c) { return py::make_tuple(c.kh_, c.kw_); })
        .def_property_readonly("stride", [](const BinaryConv2d& c) { return py::make_tuple(c.sh_, c.sw_); })
        .def_property_readonly("padding", [](const BinaryConv2d& c) { return py::make_tuple(c.ph_, c.pw_); })
        .def_property_readonly("pad_value", [](const BinaryConv2d& c) { return c.pad_value_; })
        .def_property_readonly("K", [](const BinaryConv2d& c) { return c.kh_ * c.kw_ * c.C_; })
        .def("to_bits", [](const BinaryConv2d& c) { return unpack_layout(c.W_, {c.O_, c.kh_, c.kw_, c.CW_}); },
             "The (masked) weight bits as uint64[O, kh, kw, CW].")
        .def("output_size", &BinaryConv2d::output_size, py::arg("H"), py::arg("W"))
        .def("conv", &BinaryConv2d::conv, py::arg("x"), py::arg("threads") = 0)
        .def("conv_threshold", &BinaryConv2d::conv_threshold, py::arg("x"), py::arg("scale"),
             py::arg("thresh"), py::arg("threads") = 0)
        .def("conv_affine", &BinaryConv2d::conv_affine, py::arg("x"), py::arg("mul"), py::arg("add"),
             py::arg("threads") = 0);
}
