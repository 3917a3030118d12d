# cython: language_level=3
"""Fragmentation kernels for the scheduler's FGD policy (Weng et al., USENIX ATC 2023).

A GPU's remaining room ``r`` is measured in thousandths of its allocatable memory (0..1000). For a task
class ``c`` asking ``k[c]`` GPUs with ``d[c, model]`` thousandths each (and, optionally, ``cls_cpu[c]`` CPU
and ``cls_mem[c]`` host memory), a node's fragmentation is the sum of ``r`` over its GPUs that cannot serve
the class (``r < d``), or over all of its GPUs when the class cannot run on the node at all: fewer than
``k[c]`` GPUs can serve it, or the node lacks the CPU or host memory. A class counts nothing on a node
whose GPUs are all of models it can never use (``d > 1000``). The expected fragmentation weighs classes by
their popularity ``p[c]``.

The scheduler keeps three per-node aggregates up to date (``refresh_nodes``) so that the change of
expected fragmentation for placing on one GPU costs O(classes) (``single_gpu_delta``). Host resources are
optional everywhere: without them only GPUs decide whether a class can run.
"""

import numpy as np
cimport cython
from cython.parallel cimport prange
from libc.math cimport floor

#: A demand above this (``d`` is at most 1000 for a class that fits) marks a model the class can never use
#: (not allowed, or its cards are too small): a node's GPUs of such a model are left out of the class's
#: fragmentation, so filling them neither rewards nor costs the placement.
cdef float NEVER_FITS = 1000.5

#: FGD's growth of fragmentation is compared in steps of this many popularity-weighted thousandths of a
#: GPU: candidates within one step tie, and the tie goes to packing (a replica that allows sharing: the node
#: left with the least room) or to inventory order (others), which keeps whole nodes free for whole-card
#: and multi-GPU replicas. Chosen on the workload-mix study (bench/workload_mixes.py).
FGD_QUANTUM = 1000.0
cdef double _QUANTUM = FGD_QUANTUM
#: Scale of the quantised growth against the tie-break (node room < 1e6 thousandths).
FGD_STEP = 1e6
cdef double _STEP = FGD_STEP


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
    """Recompute ``count_fit[n, c]``, ``sum_frag[n, c]`` and ``sum_r[n]`` for each node in ``nodes``.

    ``count_fit[n, c]`` is -1 when class ``c`` can use none of node ``n``'s GPUs (every one of a model with
    ``d > 1000``): the class then counts nothing on the node.
    """
    cdef Py_ssize_t i, j, c, n, g, first, ng
    cdef Py_ssize_t nc = d.shape[0]
    cdef float rg, dc, total
    cdef bint applicable
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
            for c in range(nc):
                applicable = False
                for j in range(ng):
                    if d[c, gpu_model[first + j]] <= NEVER_FITS:
                        applicable = True
                        break
                if not applicable:
                    count_fit[n, c] = -1
            sum_r[n] = total


cdef inline float _delta(
    Py_ssize_t n, Py_ssize_t model, float rg, float take, Py_ssize_t nc, Py_ssize_t nmodels,
    const float* d, const int* k, const float* p, const int* count_fit, const float* sum_frag, float sum_r_n,
    bint host, double cpu_free, double mem_free, double task_cpu, double task_mem,
    const double* cls_cpu, const double* cls_mem,
) noexcept nogil:
    """Change of node n's expected fragmentation when ``take`` thousandths leave GPU room ``rg``."""
    cdef float ra = rg - take
    cdef float dc, before, after, sr_after, delta = 0
    cdef int cf
    cdef Py_ssize_t c
    cdef bint host_before = True, host_after = True
    if ra < 0:
        ra = 0
    sr_after = sum_r_n - rg + ra
    for c in range(nc):
        cf = count_fit[n * nc + c]
        if cf < 0:
            continue  # the class can use none of the node's GPUs: their room is no loss to it
        dc = d[c * nmodels + model]
        if host:
            host_before = cpu_free >= cls_cpu[c] and mem_free >= cls_mem[c]
            host_after = cpu_free - task_cpu >= cls_cpu[c] and mem_free - task_mem >= cls_mem[c]
        if cf >= k[c] and host_before:
            before = sum_frag[n * nc + c]
        else:
            before = sum_r_n
        after = sum_frag[n * nc + c]
        if rg >= dc:
            cf = cf - 1
        else:
            after = after - rg
        if ra >= dc:
            cf = cf + 1
        else:
            after = after + ra
        if cf < k[c] or not host_after:
            after = sr_after
        delta = delta + p[c] * (after - before)
    return delta


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
    const double[::1] cpu_free=None,
    const double[::1] mem_free=None,
    double task_cpu=0,
    double task_mem=0,
    const double[::1] cls_cpu=None,
    const double[::1] cls_mem=None,
):
    """Change of expected node fragmentation if ``take[i]`` thousandths are placed on GPU ``cand[i]``.

    ``out[i]`` receives the delta; lower is better (FGD places where fragmentation grows least). With
    ``cpu_free``/``mem_free`` per node and the classes' ``cls_cpu``/``cls_mem``, a class the node cannot
    host for lack of CPU or memory counts all of the node's room as fragments, before and after the task
    takes ``task_cpu``/``task_mem``.
    """
    cdef Py_ssize_t i, g, n
    cdef Py_ssize_t nc = d.shape[0], nmodels = d.shape[1]
    cdef bint host = cpu_free is not None and cls_cpu is not None
    cdef const double* cpu_p = &cpu_free[0] if host and cpu_free.shape[0] > 0 else NULL
    cdef const double* mem_p = &mem_free[0] if host and mem_free.shape[0] > 0 else NULL
    cdef const double* ccpu_p = &cls_cpu[0] if host and nc > 0 else NULL
    cdef const double* cmem_p = &cls_mem[0] if host and nc > 0 else NULL
    cdef const float* d_p = &d[0, 0] if nc > 0 else NULL
    cdef const int* cf_p = &count_fit[0, 0] if count_fit.shape[0] > 0 and nc > 0 else NULL
    cdef const float* sf_p = &sum_frag[0, 0] if sum_frag.shape[0] > 0 and nc > 0 else NULL
    cdef Py_ssize_t last_n = -1, last_model = -1
    cdef float last_rg = -1, last_take = -1, last_delta = 0, rg
    if host and (cpu_p == NULL or mem_p == NULL):
        host = False
    with nogil:
        for i in range(cand.shape[0]):
            g = cand[i]
            n = gpu_node[g]
            rg = r[g]
            if n == last_n and rg == last_rg and take[i] == last_take and gpu_model[g] == last_model:
                out[i] = last_delta
                continue
            last_delta = _delta(
                n, gpu_model[g], rg, take[i], nc, nmodels, d_p, &k[0] if nc > 0 else NULL,
                &p[0] if nc > 0 else NULL, cf_p, sf_p, sum_r[n], host,
                cpu_p[n] if host else 0, mem_p[n] if host else 0, task_cpu, task_mem, ccpu_p, cmem_p,
            )
            out[i] = last_delta
            last_n = n
            last_rg = rg
            last_take = take[i]
            last_model = gpu_model[g]


@cython.boundscheck(False)
@cython.wraparound(False)
def node_fragmentation(
    const float[::1] r_node,
    const int[::1] model_node,
    const float[:, ::1] d,
    const int[::1] k,
    const float[::1] p,
    double cpu_free=1e300,
    double mem_free=1e300,
    const double[::1] cls_cpu=None,
    const double[::1] cls_mem=None,
):
    """Expected fragmentation of one node whose GPUs have room ``r_node`` (used for multi-GPU replicas)."""
    cdef Py_ssize_t j, c
    cdef Py_ssize_t nc = d.shape[0]
    cdef Py_ssize_t ng = r_node.shape[0]
    cdef float total = 0, frag, dc, acc = 0
    cdef int cf
    cdef bint host = cls_cpu is not None and cls_mem is not None
    cdef bint applicable
    for j in range(ng):
        total = total + r_node[j]
    for c in range(nc):
        cf = 0
        frag = 0
        applicable = False
        for j in range(ng):
            dc = d[c, model_node[j]]
            applicable = applicable or dc <= NEVER_FITS
            if r_node[j] >= dc:
                cf += 1
            else:
                frag = frag + r_node[j]
        if not applicable:
            continue
        if cf < k[c] or (host and (cpu_free < cls_cpu[c] or mem_free < cls_mem[c])):
            frag = total
        acc = acc + p[c] * frag
    return acc


cdef struct ScanArgs:
    int policy
    bint exclusive
    const long* caps
    const long* avail
    const int* nalloc
    const unsigned char* model_ok
    const unsigned char* node_ok
    const int* gpu_node
    const int* gpu_model
    const long* usable
    const float* r
    const double* node_room
    Py_ssize_t nc
    Py_ssize_t nmodels
    const float* d
    const int* k
    const float* p
    const int* count_fit
    const float* sum_frag
    const float* sum_r
    bint have_host
    bint host
    const double* cpu
    const double* mem
    double task_cpu
    double task_mem
    const double* cls_cpu
    const double* cls_mem


cdef void _scan(const ScanArgs* a, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t* best_out, double* score_out) noexcept nogil:
    """Best feasible GPU in [lo, hi) (first one on ties, so chunks combine like one sequential scan)."""
    cdef Py_ssize_t g, n, best = -1
    cdef double best_score = 0, score
    cdef float rg, ra, take, delta
    cdef Py_ssize_t last_n = -1, last_model = -1
    cdef float last_rg = -1, last_take = -1, last_delta = 0
    for g in range(lo, hi):
        if a.avail[g] < a.caps[g] or not a.model_ok[g]:
            continue
        if a.exclusive and a.nalloc[g] != 0:
            continue
        n = a.gpu_node[g]
        if not a.node_ok[n]:
            continue
        if a.have_host and (a.cpu[n] < a.task_cpu or a.mem[n] < a.task_mem):
            continue
        if a.policy == 0:
            best = g
            best_score = g
            break
        rg = a.r[g]
        if a.exclusive:
            take = rg
        else:
            take = a.caps[g] * 1000.0 / (a.usable[g] if a.usable[g] > 0 else 1)
        ra = rg - take
        if ra < 0:
            ra = 0
        if a.policy == 1:
            score = (a.node_room[n] - take) * 100000.0 + ra
        else:
            if n == last_n and rg == last_rg and take == last_take and a.gpu_model[g] == last_model:
                delta = last_delta
            else:
                delta = _delta(
                    n, a.gpu_model[g], rg, take, a.nc, a.nmodels, a.d, a.k, a.p, a.count_fit, a.sum_frag,
                    a.sum_r[n], a.host, a.cpu[n] if a.host else 0, a.mem[n] if a.host else 0, a.task_cpu,
                    a.task_mem, a.cls_cpu, a.cls_mem,
                )
                last_n = n
                last_rg = rg
                last_take = take
                last_model = a.gpu_model[g]
                last_delta = delta
            score = floor(<double>delta / _QUANTUM + 0.5) * _STEP
            if a.exclusive:
                score = score + g
            else:
                score = score + (a.node_room[n] - take)
        if best < 0 or score < best_score:
            best = g
            best_score = score
    best_out[0] = best
    score_out[0] = best_score


#: Below this many GPUs one thread scans them all. Measured on a 2-core VM with 6,212 GPUs, two threads
#: did not pay for their wake-up; very large inventories may. Tests lower it to check the parallel path.
PARALLEL_GPUS = 32768


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
    const double[::1] cpu_free=None,
    const double[::1] mem_free=None,
    double task_cpu=0,
    double task_mem=0,
    const double[::1] cls_cpu=None,
    const double[::1] cls_mem=None,
):
    """Filter and score every GPU for a one-GPU replica in one pass; return (best GPU or -1, its score).

    ``policy``: 0 first-fit (inventory order), 1 best-fit (least node room, then least GPU room after
    placement), 2 FGD (least growth of expected node fragmentation, in steps of ``FGD_QUANTUM``; ties to
    the fullest node for a replica that allows sharing, else to inventory order). Feasible: the node is usable
    (``node_ok``; and, given ``cpu_free``/``mem_free``, has ``task_cpu``/``task_mem`` free), the model is
    allowed, ``avail >= cap``, and for an exclusive replica the card holds no allocation. Large clusters
    are scanned in two halves in parallel (OpenMP); the halves combine exactly as one scan would.
    """
    cdef Py_ssize_t ng = caps.shape[0]
    cdef Py_ssize_t nc = d.shape[0]
    cdef ScanArgs a
    cdef Py_ssize_t bests[2]
    cdef double scores[2]
    cdef Py_ssize_t t, mid
    if ng == 0:
        return -1, 0.0
    a.policy = policy
    a.exclusive = exclusive
    a.caps = &caps[0]
    a.avail = &avail[0]
    a.nalloc = &nalloc[0]
    a.model_ok = &model_ok[0]
    a.node_ok = &node_ok[0]
    a.gpu_node = &gpu_node[0]
    a.gpu_model = &gpu_model[0]
    a.usable = &usable[0]
    a.r = &r[0]
    a.node_room = &node_room[0]
    a.nc = nc
    a.nmodels = d.shape[1]
    a.d = &d[0, 0] if nc > 0 and d.shape[1] > 0 else NULL
    a.k = &k[0] if nc > 0 else NULL
    a.p = &p[0] if nc > 0 else NULL
    a.count_fit = &count_fit[0, 0] if count_fit.shape[0] > 0 and nc > 0 else NULL
    a.sum_frag = &sum_frag[0, 0] if sum_frag.shape[0] > 0 and nc > 0 else NULL
    a.sum_r = &sum_r[0] if sum_r.shape[0] > 0 else NULL
    a.have_host = cpu_free is not None and mem_free is not None and cpu_free.shape[0] > 0
    a.host = a.have_host and cls_cpu is not None and cls_mem is not None and nc > 0
    a.cpu = &cpu_free[0] if a.have_host else NULL
    a.mem = &mem_free[0] if a.have_host else NULL
    a.task_cpu = task_cpu
    a.task_mem = task_mem
    a.cls_cpu = &cls_cpu[0] if a.host else NULL
    a.cls_mem = &cls_mem[0] if a.host else NULL
    if policy == 0 or ng < PARALLEL_GPUS:
        with nogil:
            _scan(&a, 0, ng, &bests[0], &scores[0])
        return bests[0], scores[0]
    mid = ng // 2
    with nogil:
        for t in prange(2, num_threads=2, schedule="static"):
            if t == 0:
                _scan(&a, 0, mid, &bests[0], &scores[0])
            else:
                _scan(&a, mid, ng, &bests[1], &scores[1])
    if bests[0] < 0:
        return bests[1], scores[1]
    if bests[1] < 0 or scores[0] <= scores[1]:
        return bests[0], scores[0]
    return bests[1], scores[1]
