# cython: language_level=3
"""Fragmentation kernels for the scheduler's FGD policy (Weng et al., USENIX ATC 2023).

A GPU's remaining room ``r`` is measured in thousandths of its allocatable memory (0..1000). For a task
class ``c`` asking ``k[c]`` GPUs with ``d[c, model]`` thousandths each, a node's fragmentation is the sum of
``r`` over its GPUs that cannot serve the class (``r < d``), or over all of its GPUs when fewer than
``k[c]`` of them can serve it. The expected fragmentation weighs classes by their popularity ``p[c]``.

The scheduler keeps three per-node aggregates up to date (``refresh_nodes``) so that the change of
expected fragmentation for placing on one GPU costs O(classes) (``single_gpu_delta``).
"""

import numpy as np
cimport cython


@cython.boundscheck(False)
@cython.wraparound(False)
def refresh_nodes(
    const float[::1] r,
    const int[::1] gpu_model,
    const int[::1] node_first,
    const int[::1] node_ngpu,
    const int[::1] nodes,
    const float[:, ::1] d,
    int[:, ::1] count_fit,
    float[:, ::1] sum_frag,
    float[::1] sum_r,
):
    """Recompute ``count_fit[n, c]``, ``sum_frag[n, c]`` and ``sum_r[n]`` for each node in ``nodes``."""
    cdef Py_ssize_t i, j, c, n, g, first, ng
    cdef Py_ssize_t nc = d.shape[0]
    cdef float rg, dc, total
    with nogil:
        for i in range(nodes.shape[0]):
            n = nodes[i]
            first = node_first[n]
            ng = node_ngpu[n]
            total = 0
            for c in range(nc):
                count_fit[n, c] = 0
                sum_frag[n, c] = 0
            for j in range(ng):
                g = first + j
                rg = r[g]
                total = total + rg
                for c in range(nc):
                    dc = d[c, gpu_model[g]]
                    if rg >= dc:
                        count_fit[n, c] += 1
                    else:
                        sum_frag[n, c] += rg
            sum_r[n] = total


@cython.boundscheck(False)
@cython.wraparound(False)
def single_gpu_delta(
    const long[::1] cand,
    const float[::1] take,
    const float[::1] r,
    const int[::1] gpu_node,
    const int[::1] gpu_model,
    const float[:, ::1] d,
    const int[::1] k,
    const float[::1] p,
    const int[:, ::1] count_fit,
    const float[:, ::1] sum_frag,
    const float[::1] sum_r,
    float[::1] out,
):
    """Change of expected node fragmentation if ``take[i]`` thousandths are placed on GPU ``cand[i]``.

    ``out[i]`` receives the delta; lower is better (FGD places where fragmentation grows least).
    """
    cdef Py_ssize_t i, c, g, n
    cdef Py_ssize_t nc = d.shape[0]
    cdef float rg, ra, dc, before, after, delta, sr_after
    cdef int cf
    # Candidates come in inventory order, so GPUs of one node are adjacent; one with the same node,
    # model, room and take as its predecessor has the same delta.
    cdef Py_ssize_t last_n = -1, last_model = -1
    cdef float last_rg = -1, last_take = -1, last_delta = 0
    with nogil:
        for i in range(cand.shape[0]):
            g = cand[i]
            n = gpu_node[g]
            rg = r[g]
            if n == last_n and rg == last_rg and take[i] == last_take and gpu_model[g] == last_model:
                out[i] = last_delta
                continue
            ra = rg - take[i]
            if ra < 0:
                ra = 0
            sr_after = sum_r[n] - rg + ra
            delta = 0
            for c in range(nc):
                dc = d[c, gpu_model[g]]
                if count_fit[n, c] >= k[c]:
                    before = sum_frag[n, c]
                else:
                    before = sum_r[n]
                cf = count_fit[n, c]
                after = sum_frag[n, c]
                if rg >= dc:
                    cf = cf - 1
                else:
                    after = after - rg
                if ra >= dc:
                    cf = cf + 1
                else:
                    after = after + ra
                if cf < k[c]:
                    after = sr_after
                delta = delta + p[c] * (after - before)
            out[i] = delta
            last_n = n
            last_rg = rg
            last_take = take[i]
            last_model = gpu_model[g]
            last_delta = delta


@cython.boundscheck(False)
@cython.wraparound(False)
def node_fragmentation(
    const float[::1] r_node,
    const int[::1] model_node,
    const float[:, ::1] d,
    const int[::1] k,
    const float[::1] p,
):
    """Expected fragmentation of one node whose GPUs have room ``r_node`` (used for multi-GPU replicas)."""
    cdef Py_ssize_t j, c
    cdef Py_ssize_t nc = d.shape[0]
    cdef Py_ssize_t ng = r_node.shape[0]
    cdef float total = 0, frag, dc, acc = 0
    cdef int cf
    for j in range(ng):
        total = total + r_node[j]
    for c in range(nc):
        cf = 0
        frag = 0
        for j in range(ng):
            dc = d[c, model_node[j]]
            if r_node[j] >= dc:
                cf += 1
            else:
                frag = frag + r_node[j]
        if cf < k[c]:
            frag = total
        acc = acc + p[c] * frag
    return acc


@cython.boundscheck(False)
@cython.wraparound(False)
def select_single_gpu(
    int policy,
    bint exclusive,
    const long[::1] caps,
    const long[::1] avail,
    const int[::1] nalloc,
    const unsigned char[::1] model_ok,
    const unsigned char[::1] node_ok,
    const int[::1] gpu_node,
    const int[::1] gpu_model,
    const long[::1] usable,
    const float[::1] r,
    const double[::1] node_room,
    const float[:, ::1] d,
    const int[::1] k,
    const float[::1] p,
    const int[:, ::1] count_fit,
    const float[:, ::1] sum_frag,
    const float[::1] sum_r,
):
    """Filter and score every GPU for a one-GPU replica in one pass; return (best GPU or -1, its score).

    ``policy``: 0 first-fit (inventory order), 1 best-fit (least node room, then least GPU room after
    placement), 2 FGD (least growth of expected node fragmentation). Feasible: the node is usable, the
    model allowed, ``avail >= cap``, and for an exclusive replica no allocation on the card.
    """
    cdef Py_ssize_t g, c, n
    cdef Py_ssize_t ng = caps.shape[0]
    cdef Py_ssize_t nc = d.shape[0]
    cdef Py_ssize_t best = -1
    cdef double best_score = 0, score
    cdef float rg, ra, take, dc, before, after, sr_after, delta
    cdef int cf
    cdef Py_ssize_t last_n = -1, last_model = -1
    cdef float last_rg = -1, last_take = -1, last_delta = 0
    with nogil:
        for g in range(ng):
            if avail[g] < caps[g] or not model_ok[g]:
                continue
            if exclusive and nalloc[g] != 0:
                continue
            n = gpu_node[g]
            if not node_ok[n]:
                continue
            if policy == 0:
                best = g
                best_score = g
                break
            rg = r[g]
            if exclusive:
                take = rg
            else:
                take = caps[g] * 1000.0 / (usable[g] if usable[g] > 0 else 1)
            ra = rg - take
            if ra < 0:
                ra = 0
            if policy == 1:
                score = (node_room[n] - take) * 100000.0 + ra
            else:
                if n == last_n and rg == last_rg and take == last_take and gpu_model[g] == last_model:
                    delta = last_delta
                else:
                    sr_after = sum_r[n] - rg + ra
                    delta = 0
                    for c in range(nc):
                        dc = d[c, gpu_model[g]]
                        if count_fit[n, c] >= k[c]:
                            before = sum_frag[n, c]
                        else:
                            before = sum_r[n]
                        cf = count_fit[n, c]
                        after = sum_frag[n, c]
                        if rg >= dc:
                            cf = cf - 1
                        else:
                            after = after - rg
                        if ra >= dc:
                            cf = cf + 1
                        else:
                            after = after + ra
                        if cf < k[c]:
                            after = sr_after
                        delta = delta + p[c] * (after - before)
                    last_n = n
                    last_rg = rg
                    last_take = take
                    last_model = gpu_model[g]
                    last_delta = delta
                score = delta
            if best < 0 or score < best_score:
                best = g
                best_score = score
    return best, best_score
