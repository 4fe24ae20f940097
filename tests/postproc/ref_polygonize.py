"""A frozen copy of the polygonizer's kernels as they were before the run-based rewrite.

The equivalence tests (``test_polygonize_equivalence``) compare ``postproc.polygonize`` with this
copy on many random and synthetic tiles: identical instance labels, pixel counts, confidence sums
and polygons. The labelling and growth kernels and ``find_instances`` of commit 3938da8 are kept
verbatim so that the reference does not move with the code under test; the reference polygons
come from GDAL (``rasterio.features.shapes``), not from a copy of the old tracer.
"""

from __future__ import annotations

import math

import numpy as np
from rasterio.features import shapes
from shapely.geometry import shape

from postproc.numbacache import njit
from postproc.predio import quantize_probs

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


@njit(cache=True)
def _decide(codes: np.ndarray, lab: np.ndarray, qr: np.ndarray, qc: np.ndarray, m: int,
            src: tuple, win: tuple, wp: int, radius2: int) -> None:
    """For each queued pixel, the 4-neighbour in a blob whose seed pixel is nearest (or -1)."""
    src_dr, src_dc = src
    win_q, win_r, win_c = win
    for i in range(m):
        r = np.int64(qr[i])
        c = np.int64(qc[i])
        p = (r + 1) * wp + c + 1
        bd = radius2 + 1
        bq = -1
        bsr = 0
        bsc = 0
        for k in range(4):
            if k == 0:
                q, rr, cc = p + 1, r, c + 1
            elif k == 1:
                q, rr, cc = p + wp, r + 1, c
            elif k == 2:
                q, rr, cc = p - 1, r, c - 1
            else:
                q, rr, cc = p - wp, r - 1, c
            cq = codes[q]
            if cq == SEED:
                sr, sc = rr, cc
            elif cq == GROWN:
                sr, sc = rr + np.int64(src_dr[q]), cc + np.int64(src_dc[q])
            else:
                continue
            d2 = (r - sr) * (r - sr) + (c - sc) * (c - sc)
            # labels are loaded on ties only (rare): the load is a cache miss more often than not
            if d2 < bd or (d2 == bd and lab[q] < lab[bq]):
                bd, bq, bsr, bsc = d2, q, sr, sc
        win_q[i] = bq if bd <= radius2 else -1
        win_r[i] = bsr
        win_c[i] = bsc


@njit(cache=True)
def _apply(prob: np.ndarray, codes: np.ndarray, lab: np.ndarray, stats: tuple, qr: np.ndarray,
           qc: np.ndarray, m: int, src: tuple, win: tuple, nxt: tuple, radius2: int) -> tuple:
    """Claim the decided pixels, update blob stats, queue the eligible neighbours that the
    claimed pixel's seed is near enough to reach. Returns (pixels claimed, next queue length).
    """
    final, first, count, fsum = stats
    src_dr, src_dc = src
    win_q, win_r, win_c = win
    nr_, nc_ = nxt
    W = prob.shape[1]
    wp = W + 2
    flat = prob.reshape(-1)
    nn = 0
    claimed = 0
    for i in range(m):
        r = np.int64(qr[i])
        c = np.int64(qc[i])
        p = (r + 1) * wp + c + 1
        q = win_q[i]
        if q < 0:  # rare: every pixel queued had a seed within reach
            codes[p] = REJECTED
            continue
        # NOTE: reading the winner now is safe: a pixel claimed in this layer was QUEUED while
        # the layer decided, so it cannot be anyone's winner.
        codes[p] = GROWN
        lab[p] = lab[q]
        src_dr[p] = win_r[i] - r
        src_dc[p] = win_c[i] - c
        f = final[lab[q]]
        count[f] += 1
        j = 3 * (r * W + c)
        fsum[f] += min(np.int32(flat[j + 1]) + np.int32(flat[j + 2]), 255)
        if p < first[f]:
            first[f] = p
        claimed += 1
        sr = np.int64(win_r[i])
        sc = np.int64(win_c[i])
        for k in range(4):
            if k == 0:
                q, rr, cc = p + 1, r, c + 1
            elif k == 1:
                q, rr, cc = p + wp, r + 1, c
            elif k == 2:
                q, rr, cc = p - 1, r, c - 1
            else:
                q, rr, cc = p - wp, r - 1, c
            # NOTE: queue only what this seed can reach: evaluating (and rejecting) the band's
            # outer half in every layer cost more than growing the inner half. A pixel nearer
            # to another seed is queued by that seed's pixels.
            if codes[q] == ELIGIBLE and (rr - sr) * (rr - sr) + (cc - sc) * (cc - sc) <= radius2:
                codes[q] = QUEUED
                nr_[nn] = rr
                nc_[nn] = cc
                nn += 1
    return claimed, nn


@njit(cache=True)
def grow(prob: np.ndarray, codes: np.ndarray, lab: np.ndarray, stats: tuple, nf: int,
         scratch: tuple, radius2: int, max_layers: int) -> int:
    """Grow seed blobs over eligible pixels, in place; return the number of pixels claimed.

    Layer by layer (synchronously, so no blob gets ahead by scan order) an eligible pixel joins
    the 4-neighbour whose seed pixel is nearest in Euclidean distance, if within ``radius2``
    (squared px, an integer: squared distances between pixels are); ties go to the smaller
    provisional label (arbitrary but deterministic). Joining through a 4-neighbour keeps every
    blob 4-connected, so one blob is one polygon, as in GDAL. ``stats`` is (final, first, count,
    fsum) from ``seed_label``, updated in place; the frontier is scratch[4:6][:nf] (the queue
    buffers are swapped between layers: reuse needs a new ``seed_label``).
    """
    # NOTE: two non-inlined helpers with plain scalars: a tuple-returning inline helper, or
    # one loop body with swapped queue arrays, compiled 3-9x slower.
    qa = (scratch[4], scratch[5])
    qb = (scratch[6], scratch[7])
    src = (scratch[8], scratch[9])
    win = (scratch[10], scratch[11], scratch[12])
    wp = prob.shape[1] + 2
    m = nf
    claimed = 0
    for layer in range(max_layers):
        if m == 0:
            break
        cur, nxt = (qa, qb) if layer % 2 == 0 else (qb, qa)
        _decide(codes, lab, cur[0], cur[1], m, src, win, wp, radius2)
        k, m = _apply(prob, codes, lab, stats, cur[0], cur[1], m, src, win, nxt, radius2)
        claimed += k
    if m > 0:  # the last layer's queue stays unclaimed
        last = qa if max_layers % 2 == 0 else qb
        for i in range(m):
            codes[(last[0][i] + 1) * wp + last[1][i] + 1] = ELIGIBLE
    return claimed


class RefWorkspace:
    """The old ``polygonize.Workspace`` (buffers of one tile size)."""

    def __init__(self, height: int, width: int) -> None:
        n = height * width
        cap = n + 2
        padded = (height + 2) * (width + 2)
        self.shape = (height, width)
        self.codes = np.zeros(padded, np.uint8)
        self.lab = np.zeros(padded, np.int32)
        i32 = np.int32
        self.scratch = (np.empty(cap, i32), np.empty(cap, np.int64),
                        np.empty(cap, np.int64), np.empty(cap, np.int64),
                        np.empty(n, i32), np.empty(n, i32),
                        np.empty(n, i32), np.empty(n, i32),
                        np.empty(padded, np.int8), np.empty(padded, np.int8),
                        np.empty(n, i32), np.empty(n, i32), np.empty(n, i32))
        runs = n // 2 + height + 2
        self.runs = (np.empty(runs, i32), np.empty(runs, i32), np.empty(runs, i32),
                     np.empty(runs, i32), np.empty(runs, np.uint8))


def ref_instances(prob: np.ndarray, building_threshold: float = 0.5,
                  footprint_threshold: float = 0.5, grow_radius: float = 3.0,
                  seedless_on: bool = True) -> dict:
    """The old ``find_instances``: labels raster (HxW int32), n, count and fsum per blob."""
    q = np.ascontiguousarray(quantize_probs(prob))
    ws = RefWorkspace(q.shape[0], q.shape[1])
    seed_t, fp_t = 255.0 * building_threshold, 255.0 * footprint_threshold
    final, n, first, count, fsum, nf, nrun = seed_label(q, seed_t, fp_t, ws.codes, ws.lab,
                                                        ws.scratch, ws.runs)
    r2 = int(math.floor(grow_radius * grow_radius + 1e-9))
    if r2 > 0 and n > 0:
        layers = int(math.floor(grow_radius * math.sqrt(2.0))) + 1
        grow(q, ws.codes, ws.lab, (final, first, count, fsum), nf, ws.scratch, r2, layers)
    if seedless_on and nrun > 0:
        final, first, count, fsum, n = seedless(
            q, ws.codes, ws.lab, (final, first, count, fsum), n, ws.runs, nrun, r2,
            ws.scratch[4])
    h, w = q.shape[:2]
    inblob = (ws.codes & 2) != 0
    lab = np.where(inblob, final[np.where(inblob, ws.lab, 0)], 0).astype(np.int32)
    labels = lab.reshape(h + 2, w + 2)[1:-1, 1:-1].copy()
    out = {"labels": labels, "n": n, "count": count.copy(), "fsum": fsum.copy(), "polys": {}}
    # Polygons of the reference blobs from GDAL (the library the tracer is tested against in
    # test_polygonize), not from a copy of the old tracer: blob id -> polygon.
    for geom, value in shapes(labels, mask=labels != 0, connectivity=4):
        out["polys"][int(value)] = shape(geom)
    return out
