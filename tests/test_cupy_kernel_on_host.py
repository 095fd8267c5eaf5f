"""The CuPy backend's statistics kernel (``mmfuse.backends.cupy._STATS_SOURCE``, CUDA C++) run
on the host: compiled by the system's C++ compiler with a small prelude that stands in for
CUDA's thread indices, ``__shared__`` memory and ``__syncthreads`` (one block at a time, its
threads as OS threads meeting at a barrier), so that the kernel's own source is checked
against the reference without a GPU or CuPy.  What it cannot check: CuPy's compilation
(NVRTC) and launch, and the device's arithmetic (the host's IEEE double and float are the same
formats; fused multiply-adds may differ in the last bit).  Skipped without a C++20 compiler."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import mmfuse.reference as ref

CUPY_SOURCE = Path(__file__).resolve().parents[1] / "mmfuse" / "backends" / "cupy.py"

_PRELUDE = r"""
#include <barrier>
#include <cmath>
#include <cstdio>
#include <thread>
#include <vector>
struct Idx { int x, y, z; };
thread_local Idx threadIdx;
Idx blockIdx;
std::barrier<>* g_barrier;
void __syncthreads() { g_barrier->arrive_and_wait(); }
#define __global__
#define __restrict__
#define __shared__ static
using std::pow;
using std::sqrt;
"""

_DRIVER = r"""
template <typename T>
int run(const char* in_path, const char* out_path) {
    FILE* f = std::fopen(in_path, "rb");
    int h[5];
    double ea[2];
    if (std::fread(h, sizeof(int), 5, f) != 5 || std::fread(ea, sizeof(double), 2, f) != 2) return 1;
    const int B = h[0], L = h[1], C = h[2], use_mask = h[3], apply = h[4];
    // the means and alpha in the kernel's accumulator type (A = double), the rest in T
    std::vector<T> x(B * L * C), g_std(B * C), out(B * L * C), std_(B * C);
    std::vector<double> g_mean(B * C), mean(B * C);
    std::vector<unsigned char> mask(B * L);
    if (std::fread(x.data(), sizeof(T), x.size(), f) != x.size()) return 1;
    if (std::fread(mask.data(), 1, mask.size(), f) != mask.size()) return 1;
    if (std::fread(g_mean.data(), sizeof(double), g_mean.size(), f) != g_mean.size()) return 1;
    if (std::fread(g_std.data(), sizeof(T), g_std.size(), f) != g_std.size()) return 1;
    std::fclose(f);
    const int blocks = B * ((C + CHANNELS - 1) / CHANNELS);
    for (int blk = 0; blk < blocks; ++blk) {
        blockIdx.x = blk;
        std::barrier<> barrier(CHANNELS * LANES_);
        g_barrier = &barrier;
        std::vector<std::thread> threads;
        for (int ty = 0; ty < LANES_; ++ty)
            for (int tx = 0; tx < CHANNELS; ++tx)
                threads.emplace_back([&, tx, ty] {
                    threadIdx = {tx, ty, 0};
                    KERNEL<T>(x.data(), reinterpret_cast<const bool*>(mask.data()), use_mask, L, C,
                              (T)ea[0], mean.data(), std_.data(), apply, g_mean.data(), g_std.data(),
                              ea[1], out.data());
                });
        for (auto& t : threads) t.join();
    }
    f = std::fopen(out_path, "wb");
    std::fwrite(mean.data(), sizeof(double), mean.size(), f);
    std::fwrite(std_.data(), sizeof(T), std_.size(), f);
    std::fwrite(out.data(), sizeof(T), out.size(), f);
    std::fclose(f);
    return 0;
}
int main(int argc, char** argv) { return argv[1][0] == 'f' ? run<float>(argv[2], argv[3]) : run<double>(argv[2], argv[3]); }
"""


def _kernel_source() -> tuple[str, str, int, int]:
    """The kernel's source, its instantiation (as the backend names it, the element type left
    open), and the backend's channels and lanes per block, read from the module's text (the
    module itself needs CuPy to import)."""
    text = CUPY_SOURCE.read_text()
    source = re.search(r'_STATS_SOURCE = r"""(.*?)"""', text, re.S).group(1)
    names = re.search(r'names = \[f"(stats_map<\{t\}[^"]*)"', text).group(1)
    channels = int(re.search(r"^STAT_CHANNELS = (\d+)", text, re.M).group(1))
    lanes = int(re.search(r"^STAT_LANES = (\d+)", text, re.M).group(1))
    instance = names.replace("{STAT_CHANNELS}", "CHANNELS").replace("{STAT_LANES}", "LANES_")
    return source, instance, channels, lanes


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    source, instance, channels, lanes = _kernel_source()
    # KERNEL<T>: the backend's instantiation, with T the driver's element type
    kernel = instance.replace("{t}", "T")
    work = tmp_path_factory.mktemp("cupy_kernel")
    program = (
        _PRELUDE + source + f"\nconstexpr int CHANNELS = {channels};\nconstexpr int LANES_ = {lanes};\n"
        + f"template <typename T> constexpr auto KERNEL = &{kernel};\n" + _DRIVER
    )
    (work / "kernel.cpp").write_text(program)
    done = subprocess.run(
        [compiler, "-std=c++20", "-O1", "-pthread", "-Wall", "-Werror", "-o", str(work / "kernel"),
         str(work / "kernel.cpp")],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0 and "barrier" in done.stderr and "No such file" in done.stderr:
        pytest.skip("the C++ compiler has no C++20 <barrier>")
    assert done.returncode == 0, done.stderr

    def run(x, mask, eps, apply, g_mean, g_std, alpha):
        batch, tokens, chans = x.shape
        dtype = x.dtype
        with open(work / "in.bin", "wb") as f:
            np.array([batch, tokens, chans, mask is not None, apply], np.int32).tofile(f)
            np.array([eps, alpha], np.float64).tofile(f)
            x.tofile(f)
            (mask if mask is not None else np.ones((batch, tokens), bool)).astype(np.uint8).tofile(f)
            np.asarray(g_mean, np.float64).tofile(f)  # (the kernel's accumulator type)
            np.asarray(g_std, dtype).tofile(f)
        kind = "f" if dtype == np.float32 else "d"
        subprocess.run([str(work / "kernel"), kind, str(work / "in.bin"), str(work / "out.bin")], check=True)
        n = batch * chans
        mean = np.fromfile(work / "out.bin", dtype=np.float64, count=n)  # (double, unrounded)
        rest = np.fromfile(work / "out.bin", dtype=dtype, offset=8 * n)
        return mean.reshape(batch, chans), rest[:n].reshape(batch, chans), rest[n:].reshape(x.shape)

    return run


def _case(rng, kind, dtype):
    # 37 channels: two channel tiles; a long axis: 32768 tokens per lane (float32 lane sums
    # drifted there: sigma thousands of ulps off in the numba-cuda transcription)
    shape = (1, 262144, 3) if kind == "long" else (2, 50, 37)
    x = 1.0 + 3.0 * rng.standard_normal(shape)
    mask = None
    if kind == "constant":  # lanes of a large value whose sum rounds, and lanes a few of
        # its ulps around it (float64: a folded offset, target - corr s, was 9.5 ulps off)
        value = 100000008.0 if dtype == np.float32 else 3e16 / 7
        x[:] = value
        x[1] += value * (2.0**-21 if dtype == np.float32 else 2.0**-50) * rng.standard_normal(shape[1:])
    elif kind == "long":  # a long axis of 1e5 + N(0, 1), and a constant lane of 1e5
        x = 1e5 + rng.standard_normal(shape)
        x[0, :, 1] = 1e5
    elif kind == "masked":
        mask = rng.random(shape[:2]) < 0.6
        mask[:, 0] = True
        x[~mask] = np.nan  # padding never enters the statistics
    guide = -3.0 + 20.0 * rng.standard_normal((shape[0], 40, shape[2]))
    return x.astype(dtype), mask, guide.astype(dtype)


@pytest.mark.parametrize("kind", ["random", "constant", "long", "masked"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_cupy_statistics_kernel_against_the_reference(host_kernel, kind, dtype, alpha):
    """The kernel's moments and zoom_shift within an ulp or two of the reference (float32:
    accumulated in double and rounded once), constant float32 lanes of 1e8 and a long axis
    included, where float32 accumulation and a map folding the correction into its offset
    were thousands of ulps off in the numba-cuda transcription of the same kernel."""
    rng = np.random.default_rng()
    x, mask, guide = _case(rng, kind, dtype)
    want_mean, want_std = ref.moments(x, mask=mask)
    mean, std, _ = host_kernel(x, mask, 1e-5, 0, want_mean[:, 0], want_std[:, 0], 1.0)
    g_mean, g_std = (a[:, 0].astype(dtype) for a in ref.moments(guide))
    _, _, y = host_kernel(x, mask, 1e-5, 1, g_mean, g_std, alpha)
    want = ref.zoom_shift(x, guide, alpha=alpha, mask=mask)
    # float32: accumulated in double and rounded once; float64: the double sums' own rounding
    # over up to 32768 tokens a lane, beside the reference's (an exact-arithmetic oracle's)
    # (the long axis' float64 sums of squares, 32768 terms a lane added in order: up to about
    # 60 ulps of sigma, as any such sum; the float32 outputs round that away)
    ulp = float(np.finfo(dtype).eps)
    ulps = 2 if dtype == np.float32 else (128 if kind == "long" else 16)
    size = np.abs(want_mean[:, 0]) + want_std[:, 0]  # the data's own scale, per lane
    mean_err = (np.abs(mean - want_mean[:, 0]) / (ulp * size)).max()
    std_err = (np.abs(std - want_std[:, 0]) / (ulp * want_std[:, 0])).max()
    assert mean_err <= ulps and std_err <= ulps, (mean_err, std_err)
    # the map: relative to the output's size (the guide's spread, or the mean the partial step keeps)
    scale = max(float(np.abs(guide).max()), float(np.nanmax(np.abs(want))))
    keep = np.isfinite(want)
    err = np.abs(y - want)[keep].max() / (ulp * scale)
    assert err <= ulps, err


def test_cupy_statistics_kernel_compiles_for_the_device(tmp_path):
    """The same source compiled to PTX by nvcc with the backend's language level (CuPy's
    NVRTC takes ``-std=c++14``), both instantiations the backend names: what the host's C++20
    build above cannot see (device code rules, an older language level).  Skipped without
    nvcc; nvcc is not NVRTC, but shares its front end."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    source, instance, channels, lanes = _kernel_source()
    params = re.search(r"stats_map\((.*?)\)\s*\{", source, re.S).group(1)
    lines = [source]
    for t in ("float", "double"):
        name = instance.replace("{t}", t).replace("CHANNELS", str(channels)).replace("LANES_", str(lanes))
        typed = re.sub(r"\bA\b", "double", re.sub(r"\bT\b", t, params))
        lines.append(f"template __global__ void {name}({typed});")
    (tmp_path / "kernel.cu").write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [nvcc, "-std=c++14", "-ptx", str(tmp_path / "kernel.cu"), "-o", str(tmp_path / "kernel.ptx")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert ".entry" in (tmp_path / "kernel.ptx").read_text()


@pytest.mark.parametrize("alpha", [0.5, 0.7])
def test_cupy_partial_step_where_the_means_cancel(host_kernel, alpha):
    """float32 means near 1e4 and -1e4 (unit spreads): a partial step's target near 0 within
    a few ulps of the outputs, the guide's mean and alpha taken in double (the kernel read the
    guide's mean rounded to float32, and alpha too: alpha times half an ulp of 1e4 there)."""
    rng = np.random.default_rng(17)
    x = (1e4 + rng.standard_normal((2, 9, 37))).astype(np.float32)
    guide = (-1e4 + rng.standard_normal((2, 7, 37))).astype(np.float32)
    g_mean, g_std = (a[:, 0] for a in ref.moments(guide))  # what the guide's launch writes
    _, _, y = host_kernel(x, None, 1e-5, 1, g_mean, g_std.astype(np.float32), alpha)
    want = ref.zoom_shift(x, guide, alpha=alpha)
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    assert np.all(np.abs(y - want) <= 4 * ulp + 1e-6 * np.abs(want).max()), np.max(np.abs(y - want) / ulp)


# --------------------------------------------------------------------------- the fusions' combine kernels

_COMBINE_DRIVER = r"""
#include <cstdio>
#include <vector>
template <typename T>
void lowrank_elem(long long i, const T* P, const T* C, const T* w, const T* bias, const bool* present,
                  int M, int rows, int R, int h, int flags, T& out) {
LOWRANK_BODY
}
template <typename T>
void cp_elem(long long i, const T* P, const T* C, const T* w, const T* bias, const bool* present,
             int M, int rows, int R, int h, int flags, T& q) {
CP_BODY
}
int main(int argc, char** argv) {
    // ints: cp, M, rows, n, R, h, flags; then P (M rows N), C (M N), w (R), bias (h), present (n M)
    FILE* f = std::fopen(argv[1], "rb");
    int a[7];
    if (std::fread(a, sizeof(int), 7, f) != 7) return 1;
    const int cp = a[0], M = a[1], rows = a[2], n = a[3], R = a[4], h = a[5], flags = a[6];
    const long long N = cp ? R : (long long)R * h, width = cp ? R : h;
    std::vector<double> P(M * rows * N), C(M * N), w(R), bias(h), out(n * width);
    std::vector<unsigned char> present(n * M);
    if (std::fread(P.data(), 8, P.size(), f) != P.size() || std::fread(C.data(), 8, C.size(), f) != C.size()
        || std::fread(w.data(), 8, w.size(), f) != w.size() || std::fread(bias.data(), 8, bias.size(), f) != bias.size()
        || std::fread(present.data(), 1, present.size(), f) != present.size()) return 1;
    std::fclose(f);
    const bool* pres = reinterpret_cast<const bool*>(present.data());
    for (long long i = 0; i < n * width; ++i) {
        if (cp) cp_elem<double>(i, P.data(), C.data(), w.data(), bias.data(), pres, M, rows, R, 1, flags, out[i]);
        else lowrank_elem<double>(i, P.data(), C.data(), w.data(), bias.data(), pres, M, rows, R, h, flags, out[i]);
    }
    f = std::fopen(argv[2], "wb");
    std::fwrite(out.data(), 8, out.size(), f);
    std::fclose(f);
    return 0;
}
"""


@pytest.fixture(scope="module")
def combine_kernel(tmp_path_factory):
    """The backend's two ElementwiseKernel bodies (``_LOWRANK_BODY``, ``_CP_BODY``) compiled for
    the host, one output element per call as CuPy's loop runs them; float64 operands."""
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    text = CUPY_SOURCE.read_text()
    bodies = {name: re.search(rf'{name} = r"""(.*?)"""', text, re.S).group(1) for name in ("_LOWRANK_BODY", "_CP_BODY")}
    program = _COMBINE_DRIVER.replace("LOWRANK_BODY", bodies["_LOWRANK_BODY"]).replace("CP_BODY", bodies["_CP_BODY"])
    work = tmp_path_factory.mktemp("cupy_combine")
    (work / "combine.cpp").write_text(program)
    done = subprocess.run(
        [compiler, "-std=c++17", "-O1", "-Wall", "-Werror", "-o", str(work / "combine"), str(work / "combine.cpp")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    def run(cp, P, C, w, bias, present, n, rank, width, flags):
        n_mod, rows = P.shape[:2]
        with open(work / "in.bin", "wb") as f:
            np.array([cp, n_mod, rows, n, rank, width, flags], np.int32).tofile(f)
            for a in (P, C, w, bias):
                np.ascontiguousarray(a, np.float64).tofile(f)
            np.asarray(present, np.uint8).tofile(f)
        subprocess.run([str(work / "combine"), str(work / "in.bin"), str(work / "out.bin")], check=True)
        return np.fromfile(work / "out.bin", dtype=np.float64).reshape(n, rank if cp else width)

    return run


@pytest.mark.parametrize("start", [0, 5])
def test_cupy_combine_kernels_take_their_chunks_present_rows(combine_kernel, start):
    """Both combine bodies on one batch chunk [start, B), as the backend launches them: the
    workspace's GEMM rows (rows of them, more than the chunk's; absent samples' rows NaN),
    the constant rows, and the chunk's own rows of ``present`` (the host's slice: the kernels
    had added a 32-bit row offset, which wrapped past 2**31 rows; a review's find), against
    the float64 reference's rows of the chunk."""
    rng = np.random.default_rng()
    dims, rank, out_dim, batch = (3, 5, 2), 3, 4, 12
    xs = [rng.standard_normal((batch, d)) for d in dims]
    present = rng.random((batch, len(dims))) < 0.6
    for m, x in enumerate(xs):
        x[~present[:, m]] = np.nan  # absent features never leak
    w, bias = rng.standard_normal(rank), rng.standard_normal(out_dim)
    n, rows = batch - start, batch - start + 3  # (the workspace has spare rows)
    stop = batch

    def workspace(mats):  # (M, rows, N) GEMM results of the chunk, spare rows NaN
        P = np.full((len(dims), rows, mats[0].shape[1]), np.nan)
        for m, (x, a) in enumerate(zip(xs, mats)):
            P[m, :n] = x[start:stop] @ a[: dims[m]]
        return P, np.stack([a[d] for a, d in zip(mats, dims)])

    factors = [rng.standard_normal((rank, d + 1, out_dim)) for d in dims]
    P, C = workspace([f.transpose(1, 0, 2).reshape(d + 1, rank * out_dim) for f, d in zip(factors, dims)])
    got = combine_kernel(0, P, C, w, bias, present[start:stop], n, rank, out_dim, 1 | 2 | 4 | 8)
    want = ref.lowrank_fusion(xs, factors, w, bias, present=present)[start:stop]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

    cp_factors = [rng.standard_normal((d + 1, rank)) for d in dims] + [rng.standard_normal((out_dim, rank))]
    P, C = workspace(cp_factors[:-1])
    q = combine_kernel(1, P, C, w, bias[:1], present[start:stop], n, rank, 1, 1 | 4 | 8)
    want = ref.cp_fusion(xs, (w, cp_factors), bias, present=present)[start:stop]
    np.testing.assert_allclose(q @ cp_factors[-1].T + bias, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flags", range(16))
def test_cupy_combine_kernels_follow_their_flags(combine_kernel, flags):
    """Both combine bodies under every subset of their flags (1: weights, 2: bias, 4:
    present, 8: the constant rows), the operands a flag leaves out poisoned (NaN, and a
    present mask of all False), as the backend's stand-ins are never to be read: against the
    reference without those operands.  Only the full set had been run, so a body reading an
    unflagged operand passed (a mutation review's find)."""
    rng = np.random.default_rng()
    dims, rank, out_dim, batch = (3, 5, 2), 3, 4, 9
    use_w, use_b, use_p, use_c = (bool(flags & f) for f in (1, 2, 4, 8))
    xs = [rng.standard_normal((batch, d)) for d in dims]
    present = rng.random((batch, len(dims))) < 0.6 if use_p else np.zeros((batch, len(dims)), bool)
    if use_p:
        for m, x in enumerate(xs):
            x[~present[:, m]] = np.nan
    w, bias = rng.standard_normal(rank), rng.standard_normal(out_dim)
    w_in, b_in = (w if use_w else np.full(rank, np.nan)), (bias if use_b else np.full(out_dim, np.nan))

    def workspace(mats):
        P = np.stack([x @ a[: dims[m]] for m, (x, a) in enumerate(zip(xs, mats))])
        C = np.stack([a[d] for a, d in zip(mats, dims)])
        return P, (C if use_c else np.full_like(C, np.nan))

    factors = [rng.standard_normal((rank, d + 1, out_dim)) for d in dims]
    P, C = workspace([f.transpose(1, 0, 2).reshape(d + 1, rank * out_dim) for f, d in zip(factors, dims)])
    got = combine_kernel(0, P, C, w_in, b_in, present, batch, rank, out_dim, flags)
    want = ref.lowrank_fusion(
        xs, factors if use_c else [f[:, :d] for f, d in zip(factors, dims)], w if use_w else None,
        bias if use_b else None, append_one=use_c, present=present if use_p else None,
    )  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

    cp_factors = [rng.standard_normal((d + 1, rank)) for d in dims] + [rng.standard_normal((out_dim, rank))]
    P, C = workspace(cp_factors[:-1])
    q = combine_kernel(1, P, C, w_in, b_in[:1], present, batch, rank, 1, flags & ~2)
    used = cp_factors if use_c else [a[:d] for a, d in zip(cp_factors, dims)] + cp_factors[-1:]
    want = ref.cp_fusion(xs, (w if use_w else None, used), append_one=use_c, present=present if use_p else None)
    np.testing.assert_allclose(q @ cp_factors[-1].T, want, rtol=1e-12, atol=1e-12)


def test_cupy_statistics_kernel_at_eps_0_leaves_a_channel_without_spread_unzoomed(host_kernel):
    """eps = 0 and a constant channel (sigma 0): its scale is 1, so it is shifted onto the
    guide's mean, not zoomed by 0 / 0 (the other tests' eps = 1e-5 never gave sigma 0, and a
    kernel without the test gave NaN there; a mutation review's find)."""
    rng = np.random.default_rng()
    x = rng.standard_normal((2, 7, 3))
    x[:, :, 0] = 3.7
    guide = 1.0 + 2.0 * rng.standard_normal((2, 5, 3))
    g_mean, g_std = (a[:, 0] for a in ref.moments(guide, eps=0.0))
    _, std, _ = host_kernel(x, None, 0.0, 0, g_mean, g_std, 1.0)
    assert np.all(std[:, 0] == 0.0)
    _, _, y = host_kernel(x, None, 0.0, 1, g_mean, g_std, 1.0)
    want = ref.zoom_shift(x, guide, eps=0.0)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)

