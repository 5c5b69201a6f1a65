"""DP-SGD under torch.distributed: torchrun with DistributedDataParallel or FSDP2 (``fully_shard``).

Every rank runs the same script. ``PrivacyEngine.make_private`` sees an initialised process
group of W > 1 ranks and switches to the scheme below. Every rank is given the whole dataset
of N examples; the DataLoader's ``batch_size`` B is the GLOBAL expected batch size and
q = B / N the sampling rate the accountant uses.

1. Sampling. Rank r owns the shard S_r = {i : i mod W = r} and includes each i in S_r
   independently with probability q, from its own random stream. The shards partition the
   dataset and all inclusions are independent, so the union of the ranks' batches is a
   Poisson sample of the whole dataset at rate q. Every rank takes round(1/q) steps an
   epoch; a rank's expected batch is about B / W, the global one B = qN.
2. Norms and clipping are local. DDP and FSDP are data parallel: example i lives on one rank,
   whose hooks see the example's whole input activations and output gradients (FSDP
   all-gathers a layer's weight before the layer runs forward or backward). So the
   per-example norm n_i and the clip factor c_i = min(1, C / (n_i + 1e-6)) come out of that
   rank alone, exactly as in one process; no partial norm crosses ranks. (Partial squared
   norms would have to be all-reduced only if one example's gradient were split over ranks,
   i.e. under tensor parallelism, which is refused.)
3. Reduction, explicit. Rank r holds S_r = sum_{i in its batch} c_i g_i, summed over its
   physical batches. Rank 0 adds the noise z ~ mechanism(scale sigma C), once per logical
   batch. Then one collective sums over ranks: the parameters that every rank holds whole
   (DDP) in one ``all_reduce(SUM)`` of a flat buffer; the parameters sharded on dim 0 (FSDP2
   DTensors) by one ``reduce_scatter(SUM)`` each, so that a rank receives only its shard.
   Every rank divides by B and steps:

       grad = (sum_r S_r + z) / B = (sum_i c_i g_i + z) / B,

   the single-process update, with the same sample of z at the same seed.

   The wrappers' own gradient collectives reduce the raw, unclipped gradients, which the
   engine never reads: DDP's all-reduce is replaced by a no-op communication hook; FSDP's
   reduce-scatter still runs, and its result is overwritten (redundant traffic, no effect on
   the update or on privacy).

Trust. The noise is drawn by rank 0 alone and enters before the reduction: the other ranks
and the network between them carry partial clipped sums without noise, and rank 0 knows z.
The guarantee is for what leaves the process group (parameters, checkpoints, anything
computed from them) against observers outside it; every rank, its host and the interconnect
are trusted, as the one process is in single-process DP-SGD. Splitting the noise (sigma /
sqrt(W) per rank from independent streams) would not remove that assumption: partial sums
would still cross the network with 1/W of the noise variance each, and colluding ranks could
subtract their shares.

Rules that follow (breaking one is an error, not a hang):
- every rank calls ``optimizer.step()`` once per physical batch and, under DDP or FSDP, runs
  forward and backward on every batch, even an empty one (the wrappers' collectives need
  every rank); with ``max_physical_batch_size`` every rank gets the same number of physical
  batches per logical batch (the loader pads with empty ones);
- dataset size, batch size, noise, clipping, mechanism and accountant must be the same on
  every rank (``make_private`` checks);
- a collective of the engine that fails (a rank exited) or waits longer than the process
  group's timeout (``init_process_group(timeout=...)``) raises :class:`DistributedError`;
- checkpoints are collective: rank 0 writes one file with the full model, the optimizer and
  the engine state (every rank's sampler state inside); to load, rank 0 reads it and
  broadcasts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from dpfa.errors import DistributedError, DPFAError, PrivacyParameterError, StateMismatchError
from dpfa.training.data_loader import PoissonBatchSampler, _fresh

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch: no DTensor, no FSDP2
    DTensor = Shard = None
try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover
    FSDPModule = None

#: the rank that draws and adds the noise
NOISE_RANK = 0
#: newer torch calls it reduce_scatter_single (reduce_scatter_tensor is deprecated there)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """This process's place in the default process group (rank r of W > 1)."""

    rank: int
    world_size: int
    #: where the engine's own small tensors (counts) go: the current GPU under NCCL, else the CPU
    device: torch.device = torch.device("cpu")

    @classmethod
    def current(cls) -> Optional["DistributedContext"]:
        """The context of an initialised process group of more than one rank, else None."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        world = dist.get_world_size()
        if world == 1:
            return None
        nccl = str(dist.get_backend()) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(dist.get_rank(), world, device)

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Turn a failed or timed-out collective into a DistributedError that says where."""
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as e:  # gloo and NCCL errors, DistError, DistBackendError
            raise DistributedError(
                f"Rank {self.rank} of {self.world_size}: {what} failed: {e}. Another rank has probably exited, "
                "crashed or not reached this point within the timeout given to "
                "torch.distributed.init_process_group(timeout=...); see that rank's log."
            ) from e

    def all_gather_object(self, obj: Any, what: str) -> List[Any]:
        out: List[Any] = [None] * self.world_size
        with self.collective(what):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, what: str) -> Any:
        box = [obj if self.rank == 0 else None]
        with self.collective(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def max_over_ranks(self, n: int) -> int:
        """max_r n_r: the number of physical batches every rank must yield."""
        t = torch.tensor([int(n)], dtype=torch.int64, device=self.device)
        with self.collective("agreeing on the number of physical batches"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def barrier(self, what: str) -> None:
        with self.collective(what):
            dist.barrier()

    def check_same(self, config: Dict[str, Any]) -> None:
        """Raise on every rank if any value of ``config`` differs between ranks."""
        gathered = self.all_gather_object(config, "comparing make_private's configuration across ranks")
        for key in config:
            values = [g.get(key) for g in gathered]
            if any(v != values[0] for v in values[1:]):
                seen = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
                raise PrivacyParameterError(
                    f"make_private got different {key} on different ranks ({seen}); every rank must use the same "
                    "dataset, batch size, noise, clipping, mechanism and accountant (the accountant assumes one "
                    "global sampling rate and one noise scale)."
                )


def sampler_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for rank ``rank``'s sampler: independent streams even when every rank has the same seed."""
    digest = hashlib.sha256(f"dpfa-poisson-sampler:{int(seed)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class DistributedPoissonBatchSampler(PoissonBatchSampler):
    """Rank ``rank``'s part of a Poisson sample of ``num_samples`` indices at rate ``sample_rate``.

    The rank owns the indices i with i mod ``world_size`` = ``rank`` and includes each one
    independently with probability q from its own ``generator``; with independent generators
    on the ranks, the union over ranks is a Poisson sample of all indices at rate q.
    """

    def __init__(self, num_samples: int, sample_rate: float, rank: int, world_size: int,
                 generator: Optional[torch.Generator] = None, steps: Optional[int] = None, secure: bool = False):
        super().__init__(num_samples, sample_rate, generator=generator, steps=steps, secure=secure)
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise PrivacyParameterError(f"Expected world_size={world_size!r} to be an integer >= 1.")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise PrivacyParameterError(f"Expected rank={rank!r} to be an integer in [0, {world_size}).")
        self.rank, self.world_size = rank, world_size
        self.indices = torch.arange(rank, self.num_samples, world_size)

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(self.steps):
            mask = torch.rand(len(self.indices), generator=_fresh(self.generator, self.secure)) < self.sample_rate
            yield self.indices[mask].tolist()


# ------------------------------------------------------------------ the wrapped module
def _skip_raw_gradient_allreduce(state, bucket):  # no annotations: DDP rejects string ones
    """DDP communication hook that leaves the bucket as it is: the engine reduces clipped sums itself."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _is_sharded(p: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(p, DTensor)


def _check_shard_layout(name: str, p: torch.Tensor, ctx: DistributedContext) -> None:
    """A DTensor parameter must be FSDP2's: Shard(0) over a 1-D mesh of all W ranks, torch.chunk rows."""
    mesh = p.device_mesh
    if mesh.ndim != 1 or mesh.size() != ctx.world_size or tuple(p.placements) != (Shard(0),):
        raise DPFAError(
            f"Parameter {name!r} is a DTensor with placements={tuple(p.placements)} on a mesh of shape "
            f"{tuple(mesh.shape)}; dpfa supports FSDP2 sharding only: Shard(0) over a 1-D mesh of all "
            f"{ctx.world_size} ranks (no tensor parallelism, no HSDP)."
        )
    rows = _shard_rows(p.shape[0], ctx.world_size, mesh.get_local_rank())
    if p.to_local().shape[0] != rows[1] - rows[0]:
        raise DPFAError(f"Parameter {name!r}: local shard has {p.to_local().shape[0]} rows, expected "
                        f"{rows[1] - rows[0]} (torch.chunk of {p.shape[0]} rows over {ctx.world_size} ranks).")


def _shard_rows(rows: int, world: int, rank: int) -> Tuple[int, int]:
    """Rows [start, stop) of dim 0 that FSDP2 gives ``rank``: torch.chunk, chunks of ceil(rows / world)."""
    size = math.ceil(rows / world)
    return min(rows, rank * size), min(rows, (rank + 1) * size)


def prepare_module(module: nn.Module, ctx: DistributedContext) -> Tuple[nn.Module, bool]:
    """(the module that gets the hooks, whether a DDP/FSDP wrapper needs every rank in forward and backward).

    DDP: its inner module gets the hooks and DDP's raw-gradient all-reduce is replaced by a
    no-op hook. FSDP2: the module itself; every trainable DTensor must be sharded FSDP2's way.
    A plain module: rank 0's parameters and buffers are broadcast, so that the replicas start
    equal (as DDP does when it wraps a module).
    """
    from torch.nn.parallel import DistributedDataParallel

    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = ()
    for name, sub in module.named_modules():
        if isinstance(sub, FullyShardedDataParallel):
            raise DPFAError(f"Module {name or '<root>'!r} is wrapped in FullyShardedDataParallel (FSDP1), which "
                            "dpfa does not support; shard it with torch.distributed.fsdp.fully_shard (FSDP2).")
    inner = module.module if isinstance(module, DistributedDataParallel) else module
    fsdp = FSDPModule is not None and any(isinstance(m, FSDPModule) for m in module.modules())
    wrapped = fsdp or inner is not module
    if wrapped:
        mha = [n for n, m in inner.named_modules() if isinstance(m, nn.MultiheadAttention)]
        if mha:
            raise DPFAError(
                f"Modules {mha} are nn.MultiheadAttention inside a DDP/FSDP wrapper; the engine must rebuild them "
                "from nn.Linear layers before the wrapper registers their parameters: call "
                "dpfa.training.multihead_attention.convert_multihead_attention(model) before wrapping it."
            )
    for name, p in inner.named_parameters():
        if _is_sharded(p):
            if not fsdp:
                raise DPFAError(f"Parameter {name!r} is a DTensor outside FSDP2; dpfa supports DDP and FSDP2 "
                                "(fully_shard) only, not tensor parallelism.")
            if p.requires_grad:
                _check_shard_layout(name, p, ctx)
    if inner is not module:
        try:
            module.register_comm_hook(None, _skip_raw_gradient_allreduce)
        except RuntimeError as e:
            raise DPFAError(f"Could not replace DDP's gradient all-reduce ({e}); call make_private on a fresh "
                            "DistributedDataParallel module with no communication hook, before any backward.") from e
    elif not fsdp:
        with torch.no_grad(), ctx.collective("broadcasting rank 0's parameters and buffers"):
            for t in list(inner.parameters()) + list(inner.buffers()):
                dist.broadcast(t.data, src=0)
    return inner, wrapped


# ------------------------------------------------------------------ the reduction
class ClippedSumReducer:
    """Sums the ranks' clipped sums (rank 0's carries the noise) with one collective per logical batch.

    Called by DPOptimizer with {parameter: this rank's sum (+ noise on rank 0)}, full shape;
    returns {parameter: the sum over ranks, in the parameter's own layout}: a plain tensor for
    a whole parameter (``all_reduce`` of one flat buffer per dtype), this rank's dim-0 shard as
    a DTensor for an FSDP2 parameter (``reduce_scatter_tensor`` of the zero-padded sum).
    """

    def __init__(self, ctx: DistributedContext, requires_backward: bool):
        self.ctx = ctx
        #: under DDP/FSDP a rank may not skip forward and backward on an empty batch
        self.requires_backward = requires_backward

    @property
    def adds_noise(self) -> bool:
        return self.ctx.rank == NOISE_RANK

    def __call__(self, totals: Dict[nn.Parameter, torch.Tensor]) -> Dict[nn.Parameter, torch.Tensor]:
        out: Dict[nn.Parameter, torch.Tensor] = {}
        whole: Dict[Tuple[torch.dtype, torch.device], List[nn.Parameter]] = {}
        for p, t in totals.items():
            if not _is_sharded(p):
                whole.setdefault((t.dtype, t.device), []).append(p)
        with self.ctx.collective("the all-reduce of the clipped gradient sums"):
            for ps in whole.values():
                flat = torch.cat([totals[p].reshape(-1) for p in ps])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                for p, part in zip(ps, flat.split([totals[p].numel() for p in ps])):
                    out[p] = part.view(totals[p].shape)
        with self.ctx.collective("the reduce-scatter of the clipped gradient sums"):
            for p, t in totals.items():
                if _is_sharded(p):
                    out[p] = self._reduce_scatter(p, t)
        return out

    @staticmethod
    def _reduce_scatter(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        mesh = p.device_mesh
        world, rank = mesh.size(), mesh.get_local_rank()
        size = math.ceil(full.shape[0] / world)
        padded = full.new_zeros((size * world, *full.shape[1:]))
        padded[: full.shape[0]] = full
        shard = full.new_empty((size, *full.shape[1:]))
        _reduce_scatter_single(shard, padded, op=dist.ReduceOp.SUM, group=mesh.get_group())
        start, stop = _shard_rows(full.shape[0], world, rank)
        return DTensor.from_local(shard[: stop - start].contiguous(), mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())


# ------------------------------------------------------------------ engine state and checkpoints
def gather_sampler_states(ctx: DistributedContext, state: Dict[str, Any]) -> Dict[str, Any]:
    """The engine state with every rank's sampler RNG state (a list indexed by rank) and the world size."""
    state = dict(state)
    states = ctx.all_gather_object(state.get("sampler_rng"), "gathering the ranks' sampler states")
    state["world_size"] = ctx.world_size
    if state.get("sampler_rng") is not None:
        state["sampler_rng"] = states
    return state


def local_sampler_state(state: Dict[str, Any], ctx: Optional[DistributedContext]) -> Optional[torch.Tensor]:
    """This rank's saved sampler RNG state; an error if the checkpoint came from another number of ranks."""
    saved = state.get("sampler_rng")
    world = int(state.get("world_size", 1))
    mine = 1 if ctx is None else ctx.world_size
    if saved is None:
        return None
    if world != mine:
        raise StateMismatchError(
            f"Checkpoint was saved by {world} ranks but this run has {mine}; each rank's sampler state is in it, so "
            f"resume with {world} ranks (or use secure_rng=True, whose checkpoints hold no sampler state)."
        )
    return saved[0 if ctx is None else ctx.rank] if world > 1 else saved


def save_checkpoint(engine, ctx: DistributedContext, path, module: nn.Module, optimizer=None, **extra) -> None:
    """Collective: full (unsharded) model and optimizer state and the engine state; rank 0 writes ``path``."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only
    with ctx.collective("gathering the checkpoint"):
        model_state = get_model_state_dict(module, options=options)
        optim_state = (None if optimizer is None else
                       get_optimizer_state_dict(module, optimizer.original_optimizer, options=options))
    engine_state = engine.state_dict()
    if ctx.rank == 0:
        torch.save({"module": model_state, "optimizer": optim_state, "privacy_engine": engine_state, **extra}, path)
    ctx.barrier("waiting for rank 0 to write the checkpoint")


def load_checkpoint(engine, ctx: DistributedContext, path, module: nn.Module, optimizer=None) -> Dict[str, Any]:
    """Collective: rank 0 reads ``path`` and broadcasts; returns the checkpoint without module and optimizer."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    ckpt = torch.load(path, weights_only=False) if ctx.rank == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    with ctx.collective("loading the checkpoint broadcast by rank 0"):
        set_model_state_dict(module, ckpt.get("module", {}), options=options)
        has_optim = ctx.broadcast_object(ckpt.get("optimizer") is not None, "loading the checkpoint")
        if optimizer is not None and has_optim:
            set_optimizer_state_dict(module, optimizer.original_optimizer, ckpt.get("optimizer", {}), options=options)
    rest = ctx.broadcast_object({k: v for k, v in ckpt.items() if k not in ("module", "optimizer")},
                                "broadcasting the engine state")
    engine.load_state_dict(rest["privacy_engine"])
    return rest
