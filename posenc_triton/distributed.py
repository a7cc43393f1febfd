"""Context-parallel ALiBi attention on ``torch.distributed``: ring attention over sequence shards.

Each rank of a process group holds a shard of the sequence (:func:`shard_sequence`); K and V
travel round the ring by ``batch_isend_irecv``, the next block in flight while the current one
is computed. Every (query chunk, key chunk) pair runs the dense ALiBi kernels with the pair's
global position offset, so the bias ``-m * |i - j|`` and the causal mask see global positions,
and returns ``(out, lse)``; pairs merge in fp32 (``logaddexp``). Causal pairs whose keys all
follow their queries are never computed; pairs whose keys all precede them run without a
masked tile. The backward recomputes each pair against the merged ``out`` and ``lse``: dQ
accumulates on its rank, dK/dV accumulators travel with their block and arrive home after a
full turn, each exchange overlapping the next pair's compute (ring-flash-attention's schedule).

Sharding, in ``n`` equal chunks of the sequence: ``"contiguous"`` gives rank ``r`` chunk ``r``
of ``W``; ``"zigzag"`` cuts ``2W`` chunks and gives rank ``r`` chunks ``r`` and ``2W - 1 - r``
(in that order), so that under a causal mask every rank computes ``2W + 1`` chunk pairs.

float64 inputs, and CPU tensors without Triton's interpreter, run the PyTorch reference on
all-gathered K and V instead (it materialises ``S_local x S`` scores).
"""

from __future__ import annotations

import struct
from typing import Optional

import torch
import torch.distributed as dist

from posenc_triton import _backend, _checks, alibi, alibi_ops
from posenc_triton.reference import alibi_attention_reference

SHARDINGS = ("zigzag", "contiguous")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KV_TAG, _GRAD_TAG = 0, 2  # P2P tags: K and V, then the dK and dV accumulators


# ------------------------------------------------------------------------------------------
# The group and the layout of the shards
# ------------------------------------------------------------------------------------------


def _group(group, sharding: str) -> tuple:
    """``(world, rank)`` of ``group`` (None: the world), after checking ``sharding``."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group first")
    return dist.get_world_size(group), dist.get_rank(group)


def chunk_ids(rank: int, world: int, sharding: str) -> tuple:
    """The chunks of the sequence rank ``rank`` holds, in its local order."""
    return (rank,) if sharding == "contiguous" else (rank, 2 * world - 1 - rank)


def _check_device(group, device: torch.device) -> None:
    """The group's backend must move tensors of ``device``: a clear error, never a hang."""
    backend = str(dist.get_backend(group))
    if ":" in backend:  # "cpu:gloo,cuda:nccl"
        devices = {pair.split(":")[0] for pair in backend.split(",")}
    else:
        devices = {"gloo": {"cpu"}, "nccl": {"cuda"}}.get(backend)
    if devices is not None and device.type not in devices:
        raise ValueError(f"group's backend {backend!r} cannot send {device.type} tensors "
                         f"(the inputs are on {device}); use a group of a backend for "
                         f"{device.type} (gloo: cpu, nccl: cuda)")


def _seq_dim(x: torch.Tensor, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}), got {dim!r}")
    return dim % x.dim()


def shard_sequence(x: torch.Tensor, dim: int, group=None, sharding: str = "zigzag"):
    """This rank's shard of the full-sequence tensor ``x`` (the same on every rank).

    Args:
        x: any tensor whose dimension ``dim`` is the sequence, of ``S`` tokens.
        dim: the sequence dimension.
        group: the process group; default None (the world, ``W`` ranks).
        sharding: ``"zigzag"`` (default) or ``"contiguous"`` (module docstring).

    Returns:
        ``x`` with ``S / W`` tokens along ``dim`` (a new tensor; autograd flows through).

    Raises:
        ValueError: ``S`` is not a multiple of the chunk count (``2W`` zigzag, ``W``
            contiguous), or a bad ``dim`` or ``sharding``.
    """
    world, rank = _group(group, sharding)
    dim = _seq_dim(x, dim)
    count = world * (2 if sharding == "zigzag" else 1)
    if x.shape[dim] % count:
        raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim}, not a multiple of "
                         f"{count}: {sharding} sharding over {world} ranks cuts {count} equal "
                         "chunks")
    chunks = x.chunk(count, dim)
    return torch.cat([chunks[c] for c in chunk_ids(rank, world, sharding)], dim)


class _AllGather(torch.autograd.Function):
    """``[W, *x.shape]``, every rank's ``x``; the backward all-reduces the gradient and keeps
    this rank's slice (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, world, rank):
        ctx.group, ctx.rank = group, rank
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format)
                 for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


def _check_same(group, world: int, device: torch.device, names: tuple, values: list) -> None:
    """Every rank passes the same ``values`` (ints, or tuples of ints of one length): else a
    ``ValueError`` naming them, raised on every rank."""
    sizes = [len(v) if isinstance(v, tuple) else 1 for v in values]
    flat = [x for v in values for x in (v if isinstance(v, tuple) else (v,))]
    mine = torch.tensor(flat, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    for rank, theirs in enumerate(every):
        parts = theirs.cpu().split(sizes)
        theirs = [tuple(p.tolist()) if isinstance(v, tuple) else p.item()
                  for p, v in zip(parts, values)]
        differ = [f"{n} ({a} here, {b} on rank {rank})"
                  for n, a, b in zip(names, values, theirs) if a != b]
        if differ:
            raise ValueError(f"ranks disagree on {'; '.join(differ)}: every rank must pass "
                             "shards of one shape and the same options")


def unshard_sequence(x_local: torch.Tensor, dim: int, group=None, sharding: str = "zigzag"):
    """The full-sequence tensor from every rank's shard (an all-gather; the inverse of
    :func:`shard_sequence`, differentiable: the gradient of a shard sums every rank's).

    Args:
        x_local: this rank's shard, of ``S / W`` tokens along ``dim``; one shape on every rank.
        dim, group, sharding: as for :func:`shard_sequence`.

    Returns:
        ``[..., S, ...]`` along ``dim``, the same on every rank.

    Raises:
        ValueError: shards of different shapes across ranks, a shard that is not two equal
            chunks (zigzag), a group that cannot send the shard's device, a bad argument.
    """
    world, rank = _group(group, sharding)
    dim = _seq_dim(x_local, dim)
    _check_device(group, x_local.device)
    _check_same(group, world, x_local.device, ("x_local.dim()", "x_local.shape"),
                [x_local.dim(), tuple(x_local.shape) + (-1,) * (8 - x_local.dim())])
    per = 2 if sharding == "zigzag" else 1
    if x_local.shape[dim] % per:
        raise ValueError(f"x_local has {x_local.shape[dim]} tokens along dim {dim}: a zigzag "
                         "shard is two equal chunks")
    gathered = _AllGather.apply(x_local, group, world, rank)
    chunks = {}
    for r in range(world):
        chunks.update(zip(chunk_ids(r, world, sharding), gathered[r].chunk(per, dim)))
    return torch.cat([chunks[c] for c in range(world * per)], dim)


# ------------------------------------------------------------------------------------------
# The ring
# ------------------------------------------------------------------------------------------


class _Ring:
    """The ranks of ``group`` in a ring, and this rank's chunks of ``chunk`` tokens."""

    def __init__(self, group, world: int, rank: int, sharding: str, chunk: int, seq_dim: int):
        self.group, self.world, self.rank, self.sharding = group, world, rank, sharding
        self.chunk, self.seq_dim = chunk, seq_dim
        self.count = world * (2 if sharding == "zigzag" else 1)
        peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next, self.prev = peer((rank + 1) % world), peer((rank - 1) % world)

    def exchange(self, tensors: tuple, tag: int) -> tuple:
        """Send ``tensors`` to the next rank and receive as many from the previous one:
        ``(works, received)``; wait on ``works`` before reading ``received``."""
        received = tuple(torch.empty_like(t) for t in tensors)
        ops = []
        for i, (out, into) in enumerate(zip(tensors, received)):
            ops.append(dist.P2POp(dist.isend, out, self.next, self.group, tag + i))
            ops.append(dist.P2POp(dist.irecv, into, self.prev, self.group, tag + i))
        return dist.batch_isend_irecv(ops), received

    def pairs(self, step: int, is_causal: bool):
        """``(q_slot, k_slot, pos_offset, pair)`` for the chunk pairs of ring step ``step``:
        this rank's queries against the keys of rank ``rank - step``; ``pos_offset`` is the
        queries' global start minus the keys', ``pair`` numbers the pair globally."""
        src = (self.rank - step) % self.world
        for qs, qc in enumerate(chunk_ids(self.rank, self.world, self.sharding)):
            for ks, kc in enumerate(chunk_ids(src, self.world, self.sharding)):
                if not (is_causal and kc > qc):  # causal: keys after every query are unseen
                    yield qs, ks, (qc - kc) * self.chunk, qc * self.count + kc

    def part(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        return x.narrow(self.seq_dim, slot * self.chunk, self.chunk)


def _merge(acc, out, lse):
    """``(out, lse)`` of the keys of ``acc`` and of a new pair (``out`` ``[B, H, S, D]``, lse
    ``+inf`` where the pair showed no key), in fp32; ``acc`` None at first."""
    lse = lse.masked_fill(lse == float("inf"), float("-inf"))
    if acc is None:
        return out.float(), lse
    acc_out, acc_lse = acc
    merged = torch.logaddexp(acc_lse, lse)
    safe = merged.masked_fill(merged == float("-inf"), 0.0)
    weight_acc, weight = torch.exp(acc_lse - safe)[..., None], torch.exp(lse - safe)[..., None]
    return acc_out * weight_acc + out.float() * weight, merged


def _ring_forward(ring, q, k, v, slopes, is_causal, scale, layout, dropout_p, seed):
    """``(out, lse)`` of this rank's queries against the whole ring's keys: ``out`` float32
    shaped like ``q``, ``lse`` float32 ``[B, Hq, S_local]`` (``+inf`` for a row that sees no
    key)."""
    from posenc_triton.alibi_launch import bhsd

    kv, acc = (k.contiguous(), v.contiguous()), [None] * (2 if ring.sharding == "zigzag" else 1)
    for step in range(ring.world):
        if step + 1 < ring.world:
            works, incoming = ring.exchange(kv, _KV_TAG)
        for qs, ks, offset, pair in ring.pairs(step, is_causal):
            out, lse = alibi_ops.launch_alibi_fwd(
                ring.part(q, qs), ring.part(kv[0], ks), ring.part(kv[1], ks), slopes, None, None,
                None, 0, 0, is_causal, scale, layout, dropout_p,
                None if seed is None else seed + pair, pos_offset=offset,
                out_dtype=torch.float32)
            acc[qs] = _merge(acc[qs], bhsd(out, layout), lse)
        if step + 1 < ring.world:
            for work in works:
                work.wait()
            kv = incoming
    out = torch.cat([a[0] for a in acc], 2)
    lse = torch.cat([a[1] for a in acc], 2)
    out = out.transpose(1, 2).contiguous() if layout == "bshd" else out
    return out, lse.masked_fill(lse == float("-inf"), float("inf"))


def _ring_backward(ring, grad_out, q, k, v, slopes, out, lse, is_causal, scale, layout,
                   dropout_p, seed, slopes_grad):
    """``(dq, dk, dv, dslopes)`` of this rank's shards; ``dslopes`` this rank's share."""
    kv = (k.contiguous(), v.contiguous())
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dslopes = torch.zeros(slopes.shape, dtype=torch.float32, device=q.device)
    grads = None  # the dK, dV accumulators of the block held, from the previous rank
    for step in range(ring.world):
        if step + 1 < ring.world:
            works, incoming = ring.exchange(kv, _KV_TAG)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for qs, ks, offset, pair in ring.pairs(step, is_causal):
            dq_p, dk_p, dv_p, ds_p = alibi_ops.launch_alibi_bwd(
                ring.part(grad_out, qs), ring.part(q, qs), ring.part(kv[0], ks),
                ring.part(kv[1], ks), slopes, None, None, None, 0, 0, ring.part(out, qs),
                lse.narrow(2, qs * ring.chunk, ring.chunk), is_causal, scale, layout,
                dropout_p, None if seed is None else seed + pair, slopes_grad,
                pos_offset=offset, partial_rows=True)
            ring.part(dq, qs).add_(dq_p)
            ring.part(dk, ks).add_(dk_p)
            ring.part(dv, ks).add_(dv_p)
            if slopes_grad:
                dslopes += ds_p
        if grads is not None:  # what the ranks before added to this block, sent last step
            for work in grads[0]:
                work.wait()
            dk, dv = dk + grads[1][0], dv + grads[1][1]
        if ring.world == 1:
            return dq, dk, dv, dslopes
        grads = ring.exchange((dk, dv), _GRAD_TAG)
        if step + 1 < ring.world:
            for work in works:
                work.wait()
            kv = incoming
    for work in grads[0]:  # a full turn: this rank's own block, with every rank's share
        work.wait()
    return dq, *grads[1], dslopes


class RingAlibiFunction(torch.autograd.Function):
    """Ring ALiBi attention of checked arguments (:func:`ring_alibi_attention`'s)."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, ring, is_causal, scale, layout, dropout_p, seed):
        out, lse = _ring_forward(ring, q, k, v, slopes, is_causal, scale, layout, dropout_p,
                                 seed)
        # the fp32 output, not the rounded one, gives the slope gradient's delta (partial rows)
        ctx.save_for_backward(q, k, v, slopes, out, lse, seed)
        ctx.args = (ring, is_causal, scale, layout, dropout_p)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, slopes, out, lse, seed = ctx.saved_tensors
        ring, is_causal, scale, layout, dropout_p = ctx.args
        dq, dk, dv, dslopes = _ring_backward(
            ring, grad_out.contiguous(), q, k, v, slopes, out, lse, is_causal, scale, layout,
            dropout_p, seed, ctx.needs_input_grad[3])
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                dslopes if ctx.needs_input_grad[3] else None, *(None,) * 6)


def _reference(ring, q, k, v, slopes, is_causal, scale, layout, dropout_p):
    """The PyTorch reference on all-gathered K and V (float64, or CPU without Triton)."""
    k_full, v_full = (unshard_sequence(t, ring.seq_dim, ring.group, ring.sharding)
                      for t in (k, v))
    total = k_full.shape[ring.seq_dim]
    parts = [alibi_attention_reference(
        ring.part(q, qs), k_full, v_full, slopes, is_causal=is_causal, scale=scale,
        layout=layout, dropout_p=dropout_p, pos_offset=qc * ring.chunk - (total - ring.chunk))
        for qs, qc in enumerate(chunk_ids(ring.rank, ring.world, ring.sharding))]
    return torch.cat(parts, ring.seq_dim)


# ------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------


def ring_alibi_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         slopes: Optional[torch.Tensor] = None, *, group=None,
                         is_causal: bool = True, scale: Optional[float] = None,
                         layout: str = "bhsd", sharding: str = "zigzag",
                         dropout_p: float = 0.0, check_ranks: bool = True) -> torch.Tensor:
    """ALiBi attention of a sequence sharded over the ranks of ``group`` (context parallel).

    The full sequence is the concatenation of every rank's shard in the order ``sharding``
    says (:func:`shard_sequence` makes the shards, :func:`unshard_sequence` joins them). Every
    rank calls this with its shards; each gets the attention of its queries over all keys,
    with global positions, as :func:`~posenc_triton.alibi_attention` on the full sequence
    gives it. Needs an initialised process group (NCCL for CUDA, gloo for CPU tensors).

    Args:
        q: this rank's query shard, ``[B, Hq, S_local, D]`` (``layout="bhsd"``) or
            ``[B, S_local, Hq, D]`` (``"bshd"``); fp16, bf16, fp32 (kernels) or float64
            (reference). The sequence is ``W * S_local`` tokens; zigzag needs ``S_local`` even.
        k, v: this rank's key and value shards, ``S_local`` tokens and ``Hk`` heads
            (``Hq % Hk == 0``), q's dtype and device.
        slopes: float32 ``[Hq]`` or ``[B, Hq]``, the same on every rank; default
            :func:`~posenc_triton.alibi_slopes`. Slopes that require grad get this rank's
            share of their gradient (from its queries), not summed over the group: reduce it
            as any replicated weight's (DDP and FSDP do; by hand, ``all_reduce`` SUM).
        group: the process group; default None (the world).
        is_causal: causal (default True) or symmetric ALiBi, in global positions.
        scale: the score scale; default ``1 / sqrt(D)``.
        layout: ``"bhsd"`` (default) or ``"bshd"``, for q, k, v and the output.
        sharding: ``"zigzag"`` (default, balances causal work) or ``"contiguous"``.
        dropout_p: attention dropout in ``[0, 1)``; every chunk pair draws its own mask
            from one Philox key (the device's default generator). Default 0.0.
        check_ranks: first check, by an all-gather, that every rank passes the same shapes,
            dtype, options and slopes (a ``ValueError`` on every rank otherwise, not a hang).
            Default True; False saves that collective (and its host sync) per call.

    Returns:
        This rank's output shard, shaped like ``q`` in ``layout``. Autograd gives this rank's
        shards of dq, dk, dv.

    Raises:
        ValueError, TypeError: as :func:`~posenc_triton.alibi_attention` for the tensors;
            shards that differ across ranks, ``k`` and ``q`` of different lengths, an odd
            zigzag shard, a group whose backend cannot send the tensors' device. Packed
            input (``cu_seqlens``) and key padding masks are not taken: pad and mask
            outside, or shard whole sequences across the batch instead.
    """
    world, rank = _group(group, sharding)
    scale = alibi.check_args(q, k, v, slopes, is_causal, scale, layout)
    dropout_p = _checks.probability("dropout_p", dropout_p)
    _checks.check_bool("check_ranks", check_ranks)
    seq_dim = 2 if layout == "bhsd" else 1
    local = q.shape[seq_dim]
    if k.shape[seq_dim] != local:
        raise ValueError(f"k and v have {k.shape[seq_dim]} tokens but q has {local}: ring "
                         "attention takes shards of one sequence, of one length")
    if sharding == "zigzag" and local % 2:
        raise ValueError(f"q has {local} tokens: a zigzag shard is two equal chunks, so "
                         "S_local must be even (the sequence a multiple of 2W)")
    _check_device(group, q.device)
    heads = q.shape[1 if layout == "bhsd" else 2]
    slopes = alibi.alibi_slopes(heads, q.device) if slopes is None else slopes
    if check_ranks:
        bits = lambda x: struct.unpack("<q", struct.pack("<d", x))[0]
        _check_same(group, world, q.device,
                    ("q.shape", "k.shape", "dtype", "is_causal", "layout", "sharding",
                     "scale (bits)", "dropout_p (bits)", "slopes.shape"),
                    [tuple(q.shape), tuple(k.shape), _DTYPES.index(q.dtype), int(is_causal),
                     int(layout == "bshd"), SHARDINGS.index(sharding), bits(scale),
                     bits(dropout_p), tuple(slopes.shape) + (0,) * (2 - slopes.dim())])
        every = [torch.empty_like(slopes, dtype=torch.float32) for _ in range(world)]
        dist.all_gather(every, slopes.detach().float().contiguous(), group=group)
        for r, theirs in enumerate(every):
            if not torch.equal(theirs, slopes.detach().float()):
                raise ValueError(f"slopes differ across ranks (this rank {rank}, rank {r}): "
                                 "every rank must pass the same slopes")
    ring = _Ring(group, world, rank, sharding, local // (2 if sharding == "zigzag" else 1),
                 seq_dim)
    if not _backend.use_triton(q) or q.dtype == torch.float64:
        return _reference(ring, q, k, v, slopes, is_causal, scale, layout, dropout_p)
    seed = alibi_ops.draw_dropout_seed(q.device) if dropout_p > 0 else None
    return RingAlibiFunction.apply(q, k, v, slopes.contiguous(), ring, is_causal, scale,
                                   layout, dropout_p, seed)
