"""Numba kernels of the polygonizer, part 1: classify and label pixels. Arrays in, arrays out.

Layout, shared by ``postproc.grow`` and ``postproc.trace``: pixel (r, c) of an HxW tile spans
[c, c+1] x [r, r+1]. Rasters are stored flat with a one-pixel border of zeros, width
``Wp = W + 2``: pixel (r, c) is at ``(r + 1) * Wp + c + 1``. The border spares every bounds check,
and flat indices spare divisions. ``codes`` says what a pixel is (``SEED``/``GROWN`` are in a blob,
tested as ``code >= SEED``); ``lab`` holds a provisional union-find id there (garbage elsewhere),
and ``final[lab]`` maps it to the compact blob id 1..n, which spares a relabelling pass.

Each kernel is checked against the library result it replaces in ``tests/postproc`` (blobs and
polygons against ``rasterio.features.shapes``, i.e. GDAL's polygonize with 4-connectivity).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from postproc.numbacache import njit

# NOTE: a pixel is in a blob when its code is >= SEED (seed, or GROWN + the layer that claimed
# it, see postproc.grow); classify writes ELIGIBLE + (SEED - ELIGIBLE) * seed, branch-free.
# Growth queues a pixel for an even layer as QUEUED, for an odd one as QUEUED_ODD.
NONE, ELIGIBLE, QUEUED, REJECTED, QUEUED_ODD, KEPT, SEED, GROWN = 0, 1, 2, 3, 4, 8, 64, 128

@njit(cache=True, inline="always")
def _find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True, inline="always")
def _union(parent: np.ndarray, a: int, b: int) -> int:
    # NOTE: the smaller id becomes the root, so a root is its component's first pixel in raster
    # order, and flattening in increasing id order needs one sweep.
    ra = _find(parent, a)
    rb = _find(parent, b)
    if ra < rb:
        parent[rb] = ra
        return ra
    parent[ra] = rb
    return rb


@njit(cache=True)
def _flatten(parent: np.ndarray, n: int, first_prov: np.ndarray) -> tuple:
    """Map provisional ids 0..n to compact ids; return (final, n_final, first pixel per final)."""
    final = np.zeros(n + 1, np.int32)
    first = np.zeros(n + 1, np.int64)
    k = 0
    for i in range(1, n + 1):
        p = parent[i]
        if p == i:
            k += 1
            final[i] = k
            first[k] = first_prov[i]
        else:
            final[i] = final[p]  # p < i is already resolved
    return final, k, first[: k + 1].copy()


@njit(cache=True)
def label_values(values: np.ndarray, codes: np.ndarray, lab: np.ndarray, scratch: tuple
                 ) -> tuple:
    """4-connected components of equal non-zero values (what GDAL calls a polygon's blob).

    Fills the padded ``codes`` (``SEED`` where a value is non-zero) and ``lab`` (provisional
    labels); ``scratch`` is the workspace's. Returns ``(final, n, first, count)``: the id map,
    the blob count, each blob's first pixel (padded flat index, raster order) and pixel count.
    """
    parent, first_prov, cnt_prov = scratch[0], scratch[1], scratch[2]
    H, W = values.shape
    Wp = W + 2
    n = np.int64(0)  # NOTE: not 0, which compiled _flatten once more for a literal int
    for r in range(H):
        o = (r + 1) * Wp + 1
        for c in range(W):
            p = o + c
            v = values[r, c]
            if v == 0:
                codes[p] = NONE
                continue
            codes[p] = SEED
            up = lab[p - Wp] if r > 0 and values[r - 1, c] == v else 0
            left = lab[p - 1] if c > 0 and values[r, c - 1] == v else 0
            if up == 0 and left == 0:
                n += 1
                parent[n] = n
                first_prov[n] = p
                cnt_prov[n] = 0
                k = n
            elif up != 0 and left != 0:
                k = _union(parent, up, left) if up != left else up
            else:
                k = up + left
            lab[p] = k
            cnt_prov[k] += 1
    final, k, first = _flatten(parent, n, first_prov)
    count = np.zeros(k + 1, np.int64)
    for i in range(1, n + 1):
        count[final[i]] += cnt_prov[i]
    return final, k, first, count


# NOTE: the row kernels run without numba's reference counting (``_nrt=False``; they allocate
# nothing): a call that passes a handful of arrays otherwise costs ~10 ns of atomic increments
# and decrements, more than the work of a row of background. ``postproc.blobs`` calls them.
row_kernel = njit(cache=True, _nrt=False)


@row_kernel
def classify_row(frow: np.ndarray, st: int, ft: int, crow: np.ndarray, rb: np.ndarray) -> None:
    """One row of HxWx3 uint8 probabilities -> ``crow`` (its row of ``codes``) and ``rb`` (the
    same, 8-byte aligned): NONE, ELIGIBLE (building + boundary > ``ft``) or SEED (building >
    ``st``; a seed is eligible too, since ft <= st).

    NOTE: uint8 arithmetic only (building + boundary > ft as boundary > ft - building), and
    explicit loops: LLVM vectorises them 32 pixels wide, 4x faster than with uint16 sums; numba
    compiles numpy slice assignment to a slow generic copy.
    """
    for c in range(crow.shape[0]):
        b = frow[3 * c + 1]
        e = (b > ft) | (frow[3 * c + 2] > np.uint8(ft - b))
        crow[c] = np.uint8(e) + np.uint8(SEED - ELIGIBLE) * np.uint8(b > st)
    for c in range(crow.shape[0]):
        rb[c] = crow[c]


@intrinsic
def _ctz(typingctx, x):  # noqa: ARG001 (numba's signature)
    """Trailing zero bits of a non-zero uint64: one tzcnt instruction."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(types.uint64), codegen


HIGH = np.uint64(0x8080808080808080)  # bit 7 of every byte of a word


@row_kernel
def row_runs(rb: np.ndarray, width: int, r: int, runs: tuple, nrun: int, seeds: tuple) -> tuple:
    """Row runs of ``rb`` (zero past ``width``): eligible runs appended to ``runs`` (row, first
    col, end col, parent, has seed) from ``nrun`` on, this row's seed runs to ``seeds`` (first
    col, end col). Returns (nrun, number of seed runs).

    NOTE: 8 pixels a word: bit 7 of each byte flags eligible (byte + 0x7f; bytes are 0, 1 or
    64) and seed pixels (byte << 1), a shift by a byte compares each with the one before, and
    the starts and ends of runs are the set bits, found with tzcnt: no branch per pixel (a
    byte-by-byte scan mispredicted at every run boundary).
    """
    run_r, run_c0, run_c1, run_parent, run_seed = runs
    s0, s1 = seeds
    words = rb.view(np.uint64)
    ones = np.uint64(0x0101010101010101)
    low = np.uint64(0x7F7F7F7F7F7F7F7F)
    row0 = nrun
    ne = 0  # eligible runs ended
    ns = 0  # seed runs started
    nse = 0  # seed runs ended
    last = np.uint64(0)  # the previous pixel, as the top byte of a word
    pe = np.uint64(0)  # the previous pixel's flags, at bit 7
    ps = np.uint64(0)
    for wi in range(width // 8 + 1):
        w = words[wi]
        if w == ones * last:  # no boundary in these 8 pixels
            continue
        e = (w + low) & HIGH
        sd = (w << np.uint64(1)) & HIGH
        ep = (e << np.uint64(8)) | pe
        sp = (sd << np.uint64(8)) | ps
        x0 = 8 * wi
        m = e & ~ep
        while m:
            x = x0 + np.int64(_ctz(m) >> np.uint64(3))
            run_r[nrun] = r
            run_c0[nrun] = x
            run_parent[nrun] = nrun
            run_seed[nrun] = 0
            nrun += 1
            m &= m - np.uint64(1)
        m = ep & ~e
        while m:
            run_c1[row0 + ne] = x0 + np.int64(_ctz(m) >> np.uint64(3))
            ne += 1
            m &= m - np.uint64(1)
        m = sd & ~sp
        while m:
            s0[ns] = x0 + np.int64(_ctz(m) >> np.uint64(3))
            ns += 1
            m &= m - np.uint64(1)
        m = sp & ~sd
        while m:
            s1[nse] = x0 + np.int64(_ctz(m) >> np.uint64(3))
            nse += 1
            m &= m - np.uint64(1)
        last = w >> np.uint64(56)
        pe = e >> np.uint64(56)
        ps = sd >> np.uint64(56)
    j = row0  # flag the eligible runs that hold a seed run
    for i in range(ns):
        while run_c1[j] <= s0[i]:
            j += 1
        run_seed[j] = 1
    return nrun, ns


@row_kernel
def join_runs(runs: tuple, prev0: int, prev1: int, row0: int, nrun: int) -> None:
    """Union the runs of two consecutive rows ([prev0, prev1) and [row0, nrun)) that share a
    column: 4-connected."""
    run_c0, run_c1, run_parent = runs[1], runs[2], runs[3]
    i, j = prev0, row0
    while i < prev1 and j < nrun:
        if run_c0[i] < run_c1[j] and run_c0[j] < run_c1[i]:
            _union(run_parent, i, j)
        if run_c1[i] < run_c1[j]:
            i += 1
        else:
            j += 1


@row_kernel
def label_row(seeds: tuple, ns: int, above: tuple, na: int, segs: tuple, frow: np.ndarray,
              o: int, lab: np.ndarray, uf: tuple, n: int) -> tuple:
    """Label one row's seed runs with the provisional labels that a pixel-by-pixel union-find
    scan (up, then left) gives them: growth breaks ties by these labels.

    Per pixel, that scan takes the left neighbour's label, the upper one's where there is no
    left, a new label where neither is a seed, and the root of both where they differ. So a
    label changes inside a run only where a segment of constant label of the row above
    (``above``: first col, end col, label; ``na`` of them) begins with a label unlike the
    current one, and then to the union's root. Writes this row's segments to ``segs``, its
    labels to ``lab`` (``o``: flat index of the row's first pixel) and, per provisional label,
    the first pixel, pixel count and sum of min(255, building + boundary) (``uf``: parent and
    those three; ``frow``: the row's probabilities). Returns (segments, labels so far).
    """
    s0, s1 = seeds
    p0, p1, plab = above
    g0, g1, glab = segs
    parent, first_prov, cnt_prov, sum_prov = uf
    j = 0
    ng = 0
    for i in range(ns):
        a = np.int64(s0[i])
        b = np.int64(s1[i])
        while j < na and p1[j] <= a:
            j += 1
        jj = j
        if j < na and p0[j] <= a:
            k = np.int64(plab[j])
            jj = j + 1
        else:
            n += 1
            parent[n] = n
            first_prov[n] = o + a
            cnt_prov[n] = 0
            sum_prov[n] = 0
            k = n
        start = a
        while jj < na and p0[jj] < b:
            u = np.int64(plab[jj])
            if u != k:
                nk = _union(parent, u, k)
                if nk != k:
                    g0[ng], g1[ng], glab[ng] = start, p0[jj], k
                    ng += 1
                    start = np.int64(p0[jj])
                    k = nk
            jj += 1
        g0[ng], g1[ng], glab[ng] = start, b, k
        ng += 1
    for i in range(ng):
        a, b, k = np.int64(g0[i]), np.int64(g1[i]), np.int64(glab[i])
        cnt_prov[k] += b - a
        # NOTE: slices and loops from 0 (no negative indices to wrap) let LLVM vectorise these
        seg_lab = lab[o + a:o + b]
        for x in range(b - a):
            seg_lab[x] = k
        seg_prob = frow[3 * a:3 * b]
        s = 0
        for x in range(b - a):
            s += min(np.int32(seg_prob[3 * x + 1]) + np.int32(seg_prob[3 * x + 2]), 255)
        sum_prov[k] += s
    return ng, n


@row_kernel
def frontier_row(codes: np.ndarray, o: int, width: int, wp: int, mb: np.ndarray,
                 out: np.ndarray) -> int:
    """Queue (``QUEUED``, columns into ``out``) the eligible pixels of the row at flat index
    ``o`` that have a seed among their 4-neighbours: growth's first layer there. ``mb``: one
    row, zero past the width. Returns how many."""
    # NOTE: row slices let LLVM vectorise this loop (flat offsets do not)
    cur = codes[o:o + width]
    left = codes[o - 1:o - 1 + width]
    right = codes[o + 1:o + 1 + width]
    up = codes[o - wp:o - wp + width]
    down = codes[o + wp:o + wp + width]
    for c in range(width):
        mb[c] = np.uint8(cur[c] == ELIGIBLE) & (
            np.uint8(left[c] == SEED) | np.uint8(right[c] == SEED)
            | np.uint8(up[c] == SEED) | np.uint8(down[c] == SEED))
    words = mb.view(np.uint64)
    n = 0
    for wi in range(width // 8 + 1):
        m = words[wi]  # bytes 0 or 1: bit 0 of a byte flags a pixel
        while m:
            c = 8 * wi + np.int64(_ctz(m) >> np.uint64(3))
            cur[c] = QUEUED
            out[n] = c
            n += 1
            m &= m - np.uint64(1)
    return n


@njit(cache=True)
def finish(parent: np.ndarray, first_prov: np.ndarray, cnt_prov: np.ndarray,
           sum_prov: np.ndarray, n: int) -> tuple:
    """Compact ids: (final, blob count, first pixel, pixel count, confidence sum per blob).
    ``first_prov`` may hold any pixel of its label's blob: a blob's first is their minimum."""
    final, k, first = _flatten(parent, n, first_prov)
    count = np.zeros(k + 1, np.int64)
    fsum = np.zeros(k + 1, np.int64)
    for i in range(1, n + 1):
        f = final[i]
        count[f] += cnt_prov[i]
        fsum[f] += sum_prov[i]
        first[f] = min(first[f], first_prov[i])
    return final, k, first, count, fsum


@njit(cache=True)
def seedless(prob: np.ndarray, codes: np.ndarray, lab: np.ndarray, stats: tuple, n: int,
             runs: tuple, nrun: int, radius2: int, stack: np.ndarray) -> tuple:
    """Turn eligible components without any seed into blobs, after eroding their outer band.

    A building too thin for an interior (a sliver cut by the tile edge, a tiny hut) is all
    boundary band. Its component keeps the pixels with no in-tile non-eligible pixel within
    ``radius2`` (squared px): the band's outer half goes, the tile edge counts as building.
    Each 4-connected piece of what is kept becomes a blob. Returns (final, first, count, fsum,
    n) extended by the new blobs (their provisional ids follow the existing ones).
    """
    final, first, count, fsum = stats
    run_r, run_c0, run_c1, run_parent, run_seed = runs
    H, W = prob.shape[0], prob.shape[1]
    wp = W + 2
    flat = prob.reshape(-1)
    # NOTE: a run's parent never follows it (the smaller root wins a union), so one pass in
    # run order points every run at its root, and the roots collect their runs' seed flags
    # (in place: nothing reads these after this kernel). Most tiles have no seedless
    # component, and a find per run and flag cost more than the rest of this kernel.
    for i in range(nrun):
        root = run_parent[i]
        if root != i:
            root = run_parent[root]
            run_parent[i] = root
            run_seed[root] |= run_seed[i]
    rad = int(np.sqrt(radius2))
    kept = 0
    for i in range(nrun):
        if run_seed[run_parent[i]]:
            continue
        r = np.int64(run_r[i])
        for c in range(run_c0[i], run_c1[i]):
            ok = True
            for dr in range(-rad, rad + 1):
                rr = r + dr
                if rr < 0 or rr >= H:
                    continue
                for dc in range(-rad, rad + 1):
                    cc = c + dc
                    if dr * dr + dc * dc > radius2 or cc < 0 or cc >= W:
                        continue
                    if codes[(rr + 1) * wp + cc + 1] == NONE:
                        ok = False
                        break
                if not ok:
                    break
            if ok:
                codes[(r + 1) * wp + c + 1] = KEPT
                kept += 1
    if kept == 0:
        return final, first, count, fsum, n
    base = final.shape[0]
    final2 = np.concatenate((final, np.zeros(kept, np.int32)))
    first2 = np.concatenate((first, np.zeros(kept, np.int64)))
    count2 = np.concatenate((count, np.zeros(kept, np.int64)))
    fsum2 = np.concatenate((fsum, np.zeros(kept, np.int64)))
    nb = 0
    for i in range(nrun):  # runs are in raster order: a flood starts at its blob's first pixel
        if run_seed[run_parent[i]]:  # NOTE: KEPT is only in seedless runs; skip the rest's pixels
            continue
        r = np.int64(run_r[i])
        for c in range(run_c0[i], run_c1[i]):
            p0 = (r + 1) * wp + c + 1
            if codes[p0] != KEPT:
                continue
            prov = base + nb
            f = n + 1 + nb
            nb += 1
            final2[prov] = f
            first2[f] = p0
            codes[p0] = SEED
            top = 0
            stack[top] = p0
            top += 1
            while top > 0:
                top -= 1
                p = np.int64(stack[top])
                lab[p] = prov
                count2[f] += 1
                j = 3 * ((p // wp - 1) * W + p % wp - 1)
                fsum2[f] += min(np.int32(flat[j + 1]) + np.int32(flat[j + 2]), 255)
                for q in (p + 1, p + wp, p - 1, p - wp):
                    if codes[q] == KEPT:
                        codes[q] = SEED
                        stack[top] = q
                        top += 1
    return final2[: base + nb], first2[: n + 1 + nb], count2[: n + 1 + nb], \
        fsum2[: n + 1 + nb], n + nb
