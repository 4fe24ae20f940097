"""Numba kernels of the polygonizer, part 1: classify and label pixels. Arrays in, arrays out.

Layout, shared by ``postproc.grow`` and ``postproc.trace``: pixel (r, c) of an HxW tile spans
[c, c+1] x [r, r+1]. Rasters are stored flat with a one-pixel border of zeros, width
``Wp = W + 2``: pixel (r, c) is at ``(r + 1) * Wp + c + 1``. The border spares every bounds check,
and flat indices spare divisions. ``codes`` says what a pixel is (``SEED``/``GROWN`` are in a blob,
tested as ``code & 2``); ``lab`` holds a provisional union-find id there (garbage elsewhere), and
``final[lab]`` maps it to the compact blob id 1..n, which spares a relabelling pass.

Each kernel is checked against the library result it replaces in ``tests/postproc`` (blobs and
polygons against ``rasterio.features.shapes``, i.e. GDAL's polygonize with 4-connectivity).
"""

from __future__ import annotations

import numpy as np
from numba import njit

NONE, ELIGIBLE, SEED, GROWN, QUEUED, REJECTED, KEPT = 0, 1, 2, 3, 4, 5, 8

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
    n = 0
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


@njit(cache=True)
def seed_label(prob: np.ndarray, seed_t: float, fp_t: float, codes: np.ndarray, lab: np.ndarray,
               scratch: tuple, runs: tuple) -> tuple:
    """Classify pixels and label the seeds in one pass over an HxWx3 uint8 probability map.

    Seed: building > ``seed_t``; eligible for growth: building + boundary > ``fp_t`` (0..255
    units). Fills the padded ``codes`` and ``lab``; ``scratch`` holds reusable buffers (see
    ``polygonize.Workspace``). Returns ``(final, n, first, count, fsum, nf)``: the id map, the blob
    count, per blob its first pixel, pixel count and sum of min(255, building + boundary), and the
    number of queued eligible pixels 4-adjacent to a seed, as rows/cols in scratch[4:6][:nf],
    and the number of runs: the row runs of eligible pixels, 4-connected by union-find, with a
    flag for runs holding a seed (``runs``: row, first col, end col, parent, has seed). Runs are
    how ``seedless`` finds the components without a seed at almost no cost.
    """
    parent, first_prov, cnt_prov, sum_prov, qr, qc = scratch[:6]
    H, W = prob.shape[0], prob.shape[1]
    Wp = W + 2
    flat = prob.reshape(-1)
    st = np.uint16(seed_t)
    ft = np.uint16(fp_t)
    # Pass 1, branch-free so that it vectorises: 0 none, 1 eligible, 2 seed (a seed is eligible
    # too, since fp_t <= seed_t).
    for r in range(H):
        # NOTE: row slices let LLVM vectorise this loop (3x faster than flat offsets)
        crow = codes[(r + 1) * Wp + 1:(r + 1) * Wp + 1 + W]
        frow = flat[r * W * 3:(r + 1) * W * 3]
        for c in range(W):
            b = np.uint16(frow[3 * c + 1])
            fp = b + np.uint16(frow[3 * c + 2])
            crow[c] = np.uint8(fp > ft) + np.uint8(b > st)
    # Pass 2: label seeds (union-find on up/left) and queue the eligible pixels next to them.
    run_r, run_c0, run_c1, run_parent, run_seed = runs
    nrun = 0
    prev0 = prev1 = 0  # the previous row's runs
    nf = 0
    n = 0
    for r in range(H):
        o = (r + 1) * Wp + 1
        row0 = nrun
        last_c = -2
        for x in range(W):
            p = o + x  # NOTE: not a running p += 1, which defeats LLVM here (5x slower)
            code = codes[p]
            if code == NONE:
                continue
            if x != last_c + 1:  # a new run
                if nrun > row0:
                    run_c1[nrun - 1] = last_c + 1
                run_r[nrun] = r
                run_c0[nrun] = x
                run_parent[nrun] = nrun
                run_seed[nrun] = 0
                nrun += 1
            last_c = x
            if code == SEED:
                run_seed[nrun - 1] = 1
                cu = codes[p - Wp]
                cl = codes[p - 1]
                up = lab[p - Wp] if cu == SEED else 0
                left = lab[p - 1] if cl == SEED else 0
                if up == 0 and left == 0:
                    n += 1
                    parent[n] = n
                    first_prov[n] = p
                    cnt_prov[n] = 0
                    sum_prov[n] = 0
                    k = n
                elif up != 0 and left != 0:
                    k = _union(parent, up, left) if up != left else up
                else:
                    k = up + left
                lab[p] = k
                cnt_prov[k] += 1
                j = 3 * (r * W + x)
                sum_prov[k] += min(np.int32(flat[j + 1]) + np.int32(flat[j + 2]), 255)
                # queue eligible neighbours seen earlier (left, up); later ones look back at us
                if cl == ELIGIBLE:
                    codes[p - 1] = QUEUED
                    qr[nf] = r
                    qc[nf] = x - 1
                    nf += 1
                if cu == ELIGIBLE:
                    codes[p - Wp] = QUEUED
                    qr[nf] = r - 1
                    qc[nf] = x
                    nf += 1
            elif codes[p - 1] == SEED or codes[p - Wp] == SEED:
                codes[p] = QUEUED
                qr[nf] = r
                qc[nf] = x
                nf += 1
        if nrun > row0:
            run_c1[nrun - 1] = last_c + 1
        # runs of this row and the previous one that share a column are 4-connected
        i, j = prev0, row0
        while i < prev1 and j < nrun:
            if run_c0[i] < run_c1[j] and run_c0[j] < run_c1[i]:
                _union(run_parent, i, j)
            if run_c1[i] < run_c1[j]:
                i += 1
            else:
                j += 1
        prev0, prev1 = row0, nrun
    final, k, first = _flatten(parent, n, first_prov)
    count = np.zeros(k + 1, np.int64)
    fsum = np.zeros(k + 1, np.int64)
    for i in range(1, n + 1):
        count[final[i]] += cnt_prov[i]
        fsum[final[i]] += sum_prov[i]
    return final, k, first, count, fsum, nf, nrun


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
    seeded = np.zeros(nrun, np.uint8)
    for i in range(nrun):
        if run_seed[i]:
            seeded[_find(run_parent, i)] = 1
    rad = int(np.sqrt(radius2))
    kept = 0
    for i in range(nrun):
        if seeded[_find(run_parent, i)]:
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
