"""The GPU group: process-group start-up, rank roles, Ulysses sequence parallelism, and the
point-to-point plane of timestep-forcing pipeline parallelism (`parallel.mode tpp`, driven by
`model/parallel/tpp.py` through `broadcast_job`, `broadcast_tensor` and `ring_exchange` only).

The only module that knows about `torch.distributed`. A group is launched with
`torchrun --nproc-per-node N run_server.py ...`: rank 0 hosts the server and is also a DiT rank,
the other DiT ranks follow rank 0's clip jobs, and an optional last rank only decodes with the VAE.
Sequence parallelism is Ulysses (DeepSpeed-Ulysses, arXiv 2309.14509): every DiT rank holds 1/N of
the tokens, and around each self-attention call an all-to-all trades that for all tokens of 1/N of
the heads. One process (N=1) runs exactly the same code, where every exchange is the identity.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

ROLE_SERVER_DIT = "server+dit"  # rank 0: asyncio server, engine, and a share of the DiT
ROLE_DIT = "dit"  # follows rank 0's clip jobs, runs its share of the DiT
ROLE_VAE = "vae"  # only decodes latents handed over by rank 0


class LaunchError(RuntimeError):
    """The process group cannot start as launched; the message says what to change."""


# ----------------------------------------------------------------------------- layout (pure)


@dataclass(frozen=True)
class GroupLayout:
    """Who does what in a group of `world_size` processes; pure data, checked at construction."""

    world_size: int
    rank: int
    sp_size: int  # DiT ranks sharing one sequence (Ulysses degree)
    vae_rank: int | None  # the decode-only rank, or None when DiT ranks decode themselves
    pp_size: int = 1  # DiT ranks in a step pipeline (tpp: one sampling step each, whole sequences)

    @property
    def role(self) -> str:
        if self.rank == self.vae_rank:
            return ROLE_VAE
        return ROLE_SERVER_DIT if self.rank == 0 else ROLE_DIT

    @property
    def dit_ranks(self) -> tuple[int, ...]:
        return tuple(range(max(self.sp_size, self.pp_size)))

    @property
    def is_dit_rank(self) -> bool:
        return self.rank < max(self.sp_size, self.pp_size)

    @property
    def sp_rank(self) -> int:
        """This rank's index inside the sequence-parallel group (its token shard)."""
        return self.rank if self.rank < self.sp_size else 0

    @property
    def pp_rank(self) -> int:
        """The sampling step this rank owns in a step pipeline (0 outside one)."""
        return self.rank if self.rank < self.pp_size else 0


def plan_layout(world_size: int, rank: int, num_heads: int, vae_rank: bool, mode: str = "ulysses") -> GroupLayout:
    """Split `world_size` processes into DiT ranks (+ one VAE rank); reject launches that cannot work."""
    if world_size < 1:
        raise LaunchError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise LaunchError(f"RANK {rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size})")
    if mode == "tpp":
        if vae_rank:
            raise LaunchError("--parallel.mode tpp has every rank own one sampling step and rank 0 decode; "
                              "set --parallel.vae_rank false")
        return GroupLayout(world_size=world_size, rank=rank, sp_size=1, vae_rank=None, pp_size=world_size)
    if mode != "ulysses":
        raise LaunchError(f"--parallel.mode {mode!r}: use ulysses or tpp")
    sp_size = world_size - 1 if vae_rank else world_size
    if sp_size < 1:
        raise LaunchError(
            "--parallel.vae_rank true needs at least 2 processes (one DiT rank and one VAE rank); "
            f"launched with {world_size}. Use torchrun --nproc-per-node 2 or set --parallel.vae_rank false."
        )
    if num_heads % sp_size != 0:
        divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        extra = " plus 1 VAE rank" if vae_rank else ""
        raise LaunchError(
            f"{sp_size} DiT ranks do not divide the DiT's {num_heads} attention heads; Ulysses sequence "
            f"parallelism needs a DiT rank count in {divisors}{extra} (set torchrun --nproc-per-node)."
        )
    return GroupLayout(world_size=world_size, rank=rank, sp_size=sp_size,
                       vae_rank=world_size - 1 if vae_rank else None)


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun put in the environment (or the single-process defaults)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launched: bool  # True under torchrun (a rendezvous address is set)


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK; missing means one process. Inconsistent values are errors."""
    env = os.environ if env is None else env
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    present = [n for n in names if n in env]
    if present and len(present) != len(names):
        missing = [n for n in names if n not in env]
        raise LaunchError(f"environment sets {present} but not {missing}; start the group with torchrun "
                          "--nproc-per-node N, which sets all of them")
    values = {}
    for name in names + ("LOCAL_WORLD_SIZE",):
        raw = env.get(name)
        if raw is None:
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise LaunchError(f"{name}={raw!r} is not an integer") from None
    world_size = values.get("WORLD_SIZE", 1)
    rank = values.get("RANK", 0)
    local_rank = values.get("LOCAL_RANK", 0)
    local_world_size = values.get("LOCAL_WORLD_SIZE", world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise LaunchError(f"RANK={rank} must be in 0..WORLD_SIZE-1 with WORLD_SIZE={world_size} >= 1")
    if not 0 <= local_rank < max(local_world_size, 1):
        raise LaunchError(f"LOCAL_RANK={local_rank} must be in 0..LOCAL_WORLD_SIZE-1 ({local_world_size})")
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=local_rank,
                     local_world_size=local_world_size, launched=bool(present) and world_size > 1)


def pick_device_and_backend(device: str, local_rank: int, world_size: int,
                            cuda_count: int | None = None) -> tuple[torch.device, str]:
    """One GPU per process under NCCL, gloo on the CPU; refuse launches with too few GPUs."""
    if device == "cpu":
        return torch.device("cpu"), "gloo"
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if count == 0:
        raise LaunchError(f"--runtime.device {device} but no CUDA GPU is visible; run on a GPU machine or "
                          "pass --runtime.device cpu (the group then uses gloo)")
    if world_size > 1 and device.startswith("cuda:"):
        raise LaunchError(f"--runtime.device {device} pins one GPU, but a group of {world_size} processes needs "
                          "one GPU each; pass --runtime.device cuda and each rank takes cuda:LOCAL_RANK")
    index = int(device.split(":")[1]) if ":" in device else local_rank
    if index >= count:
        raise LaunchError(f"process with LOCAL_RANK {local_rank} needs cuda:{index}, but only {count} GPU(s) are "
                          f"visible; launch at most {count} processes per node")
    return torch.device("cuda", index), "nccl"


# ----------------------------------------------------------------------------- the running group


class ParallelGroup:
    """A started group (or the single process): shards tokens and exchanges heads around attention."""

    def __init__(self, layout: GroupLayout, device: torch.device, backend: str | None,
                 sp_group: Any = None, control_group: Any = None) -> None:
        self.layout = layout
        self.device = device
        self.backend = backend  # None: no process group (one process)
        self.sp_group = sp_group  # DiT ranks (NCCL on GPUs)
        self.control_group = control_group  # every rank, on the CPU (gloo): clip jobs travel here

    # ---- facts
    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def sp_size(self) -> int:
        return self.layout.sp_size

    @property
    def sp_rank(self) -> int:
        return self.layout.sp_rank

    @property
    def pp_size(self) -> int:
        return self.layout.pp_size

    @property
    def pp_rank(self) -> int:
        return self.layout.pp_rank

    @property
    def role(self) -> str:
        return self.layout.role

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    # ---- sequence sharding (call around the DiT's block stack)
    def shard_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's contiguous 1/N of the tokens along `dim`; the length must split evenly."""
        n = self.sp_size
        if n == 1:
            return x
        length = x.shape[dim]
        if length % n != 0:
            raise LaunchError(
                f"a sequence of {length} tokens does not split over {n} DiT ranks; pick a resolution and "
                f"frames whose token count per latent frame is a multiple of {n}, or use fewer GPUs")
        # contiguous: the compiled block is specialised on strides, and a view of the full sequence
        # would give it a second layout to compile for
        return x.narrow(dim, self.sp_rank * (length // n), length // n).contiguous()

    def gather_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Concatenate every DiT rank's token shard along `dim`, in rank order (inverse of shard_tokens)."""
        if self.sp_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.sp_size)]
        dist.all_gather(parts, x, group=self.sp_group)
        return torch.cat(parts, dim=dim)

    # ---- Ulysses attention
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        """Self-attention over the whole sequence for token-sharded q/k/v [B, S/N, H, D].

        All-to-all turns each into [B, S, H/N, D], `attend` runs on full sequences of this rank's heads,
        and the result goes back to [B, S/N, H, D]. Keys may be longer than queries (a KV cache), as
        long as keys and values are sharded the same way; attention ignores key order, so shards of a
        cache kept per rank gather into a permutation of the full keys, which gives the same result.
        """
        n = self.sp_size
        if n == 1:
            return attend(q, k, v)
        heads = q.shape[2]
        if heads % n != 0 or k.shape[2] % n != 0:
            raise LaunchError(f"{heads} query / {k.shape[2]} key heads do not split over {n} DiT ranks")
        if q.shape == k.shape == v.shape:
            q, k, v = _seq_to_heads(torch.stack((q, k, v)), n, self.sp_group).unbind(0)
        else:
            q = _seq_to_heads(q.unsqueeze(0), n, self.sp_group)[0]
            k, v = _seq_to_heads(torch.stack((k, v)), n, self.sp_group).unbind(0)
        out = attend(q, k, v)
        return _heads_to_seq(out.unsqueeze(0), n, self.sp_group)[0]

    # ---- weights: per-layer sharding over the DiT ranks
    def shard_layers(self, model: torch.nn.Module, layers: Iterable[torch.nn.Module],
                     prefetch_layers: int = 1) -> torch.nn.Module:
        """Keep 1/N of each listed layer's weights on each DiT rank (FSDP2 `fully_shard` per layer).

        A layer's weights are all-gathered just before it runs (the next `prefetch_layers` ahead, on
        FSDP's own stream) and freed right after, so no rank ever holds the whole model: the peak is
        1/N of the layers plus about two of them, plus the small unlisted parts (embeddings, head),
        which stay whole on every rank. Parameters of a minority dtype inside a layer (float32
        modulation tables) stay whole too. Call on a model built on the meta device, then
        `model.to_empty(device=...)` and fill the weights shard by shard. Use one grad mode for every
        forward afterwards (inference_mode throughout): FSDP2 keeps its gather buffers across calls.
        """
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        if not self.distributed or self.sp_size == 1:
            return model
        mesh = DeviceMesh.from_group(self.sp_group, self.device.type)
        layers = list(layers)
        in_layers: set[torch.nn.Parameter] = set()
        for layer in layers:
            in_layers |= set(layer.parameters())
            fully_shard(layer, mesh=mesh, reshard_after_forward=True, ignored_params=_minority_dtype_params(layer))
        # A root over the whole model (managing none of the unlisted weights) ties the layers into one
        # FSDP state, so a layer may prefetch the next one.
        fully_shard(model, mesh=mesh, reshard_after_forward=True,
                    ignored_params={p for p in model.parameters() if p not in in_layers})
        if prefetch_layers > 0:
            for i, layer in enumerate(layers[:-1]):
                layer.set_modules_to_forward_prefetch(layers[i + 1:i + 1 + prefetch_layers])
        _gather_on_direct_calls(model, layers)
        return model

    # ---- control plane: rank 0 hands jobs to the followers
    def broadcast_job(self, job: Any) -> Any:
        """Rank 0 sends `job` (any picklable object) to every other rank; the others get it back."""
        if not self.distributed:
            return job
        box = [job if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank (reports and benchmarks)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control_group)
        return out

    def broadcast_tensor(self, tensor: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Rank 0's `tensor` on every rank (the data plane: NCCL on GPUs); the others pass None."""
        if not self.distributed:
            return tensor
        if self.rank == 0:
            out = tensor.contiguous()
        else:
            out = torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(out, src=0)
        return out

    def ring_exchange(self, send: torch.Tensor | None,
                      recv: tuple[tuple[int, ...], torch.dtype] | None) -> torch.Tensor | None:
        """Step pipeline hand-over: `send` goes to the next rank, a tensor of `recv`'s (shape, dtype) comes
        from the previous one (rank 0 hears from the last). Both in one grouped call, so no pair of ranks
        can wait on each other; a rank with nothing to pass on (pipeline filling or draining) passes None."""
        n = self.pp_size
        if n == 1:
            return send if recv is not None else None
        out = None if recv is None else torch.empty(recv[0], dtype=recv[1], device=self.device)
        ops = []
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send.contiguous(), (self.rank + 1) % n))
        if out is not None:
            ops.append(dist.P2POp(dist.irecv, out, (self.rank - 1) % n))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return out

    def send_to_rank(self, tensor: torch.Tensor, dst: int) -> None:
        """Hand a tensor to one rank (latents to the VAE rank, frames back)."""
        dist.send(tensor.contiguous(), dst=dst)

    def recv_from_rank(self, shape: tuple[int, ...], dtype: torch.dtype, src: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(out, src=src)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control_group)

    def shutdown(self) -> None:
        """Leave the group and hand the DiT back to single-process attention; safe to call twice."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
        self.backend = None
        if current() is self:
            set_current(_SINGLE)


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write the whole tensor `full` into `param`: all of it, or this rank's rows of a per-layer sharded one.

    FSDP2 shards dim 0 in `torch.chunk` pieces, so each rank can fill its shard from the whole tensor
    read one parameter at a time, and no rank ever holds more than one whole parameter.
    """
    if hasattr(param, "to_local"):
        local = param.to_local()
        mesh = param.device_mesh
        rank = mesh.get_local_rank() if mesh.ndim == 1 else mesh.get_coordinate()[0]
        rows = torch.chunk(full, mesh.size(), dim=0)
        if local.numel():
            local.copy_(rows[rank])
    else:
        param.copy_(full)


def _minority_dtype_params(layer: torch.nn.Module) -> set[torch.nn.Parameter]:
    """Parameters whose dtype differs from most of the layer's (FSDP2 gathers one dtype per layer)."""
    params = list(layer.parameters())
    counts: dict[torch.dtype, int] = {}
    for p in params:
        counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    main = max(counts, key=counts.get) if counts else None
    return {p for p in params if p.dtype != main}


def _gather_on_direct_calls(root: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
    """Let code call a sharded layer's sub-modules outside the layer's forward (the DiT does, to cache text K/V).

    FSDP gathers a layer's weights only around the layer's own forward. A sub-module called on its own
    gathers its layer here instead; the layer stays gathered until another layer is gathered this way
    or runs its forward, so at most one extra layer is whole at a time.
    """
    state = {"open": None}
    running: set[int] = set()

    def close_open() -> None:
        if state["open"] is not None:
            state["open"].reshard()
            state["open"] = None

    def ready() -> None:
        # FSDP sets up its streams when the root first runs forward; the model's other entry points
        # (cache prefill, commit) call layers without going through the root
        root._get_fsdp_state()._lazy_init()

    for layer in layers:
        def before_layer(module, args, _layer=layer):
            ready()
            if state["open"] is _layer:
                state["open"] = None  # its own forward takes over (and reshards after)
            else:
                close_open()
            running.add(id(_layer))

        def after_layer(module, args, output, _layer=layer):
            running.discard(id(_layer))

        layer.register_forward_pre_hook(before_layer, prepend=True)
        layer.register_forward_hook(after_layer)
        for sub in layer.modules():
            if sub is layer or not any(True for _ in sub.parameters(recurse=False)):
                continue

            def before_sub(module, args, _layer=layer):
                # Compiled block code runs only inside its layer's own forward (weights gathered); returning
                # first keeps torch.compile from guarding on which layer this is (one graph for all layers).
                if torch.compiler.is_compiling() or id(_layer) in running or state["open"] is _layer:
                    return
                ready()
                close_open()
                _layer.unshard()
                state["open"] = _layer

            sub.register_forward_pre_hook(before_sub)


def _seq_to_heads(x: torch.Tensor, n: int, group: Any) -> torch.Tensor:
    """[T, B, S/n, H, D] (T stacked tensors) -> [T, B, S, H/n, D] by one all-to-all."""
    t, b, s, h, d = x.shape
    send = x.reshape(t, b, s, n, h // n, d).permute(3, 0, 1, 2, 4, 5).contiguous()  # [n, T, B, s, h/n, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's tokens, this rank's heads
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(t, b, n * s, h // n, d)


def _heads_to_seq(x: torch.Tensor, n: int, group: Any) -> torch.Tensor:
    """[T, B, S, H/n, D] -> [T, B, S/n, H, D], the inverse of `_seq_to_heads`."""
    t, b, s_full, hn, d = x.shape
    s = s_full // n
    send = x.reshape(t, b, n, s, hn, d).permute(2, 0, 1, 3, 4, 5).contiguous()  # [n, T, B, s, h/n, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: this rank's tokens, rank j's heads
    return recv.permute(1, 2, 3, 0, 4, 5).reshape(t, b, s, n * hn, d)


# ----------------------------------------------------------------------------- start-up and the current group

_SINGLE = ParallelGroup(GroupLayout(world_size=1, rank=0, sp_size=1, vae_rank=None), torch.device("cpu"), None)
_current: ParallelGroup = _SINGLE


def current() -> ParallelGroup:
    """The group this process belongs to (a one-process group until `start_group` runs)."""
    return _current


def set_current(group: ParallelGroup) -> ParallelGroup:
    """Make `group` the one the DiT's attention and token sharding use; returns the previous one."""
    from model.net import attention  # the DiT's hook; imported here so this module loads without the model

    global _current
    previous, _current = _current, group
    # one DiT rank shards nothing: the attention seam keeps its plain path (what kernels such as
    # runtime.attention_backend fp8 check for), the same arithmetic as a one-rank group
    attention.set_sequence_parallel(group if group.sp_size > 1 else None)
    return previous


def start_group(device: str, num_heads: int, vae_rank: bool = False,
                env: Mapping[str, str] | None = None, timeout_s: float = 600.0, mode: str = "ulysses") -> ParallelGroup:
    """Join the group torchrun launched (or stay a single process) and make it current."""
    launch = read_launch_env(env)
    layout = plan_layout(launch.world_size, launch.rank, num_heads, vae_rank, mode)
    torch_device, backend = pick_device_and_backend(device, launch.local_rank, launch.world_size)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if launch.world_size == 1:
        set_current(ParallelGroup(layout, torch_device, None))
        return current()
    if dist.is_initialized():
        if dist.get_world_size() != launch.world_size:
            raise LaunchError(f"a process group of {dist.get_world_size()} is already running, but WORLD_SIZE is "
                              f"{launch.world_size}")
    else:
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise LaunchError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are unset; start the group with "
                              "torchrun --nproc-per-node N, which sets them")
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = torch_device
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    sp_group = dist.new_group(list(layout.dit_ranks), backend=backend)
    control_group = dist.new_group(list(range(launch.world_size)), backend="gloo")
    if layout.pp_size > 1:
        # point-to-point calls must not be the first use of the communicator (NCCL's rule for batched p2p)
        dist.all_reduce(torch.zeros(1, device=torch_device))
    set_current(ParallelGroup(layout, torch_device, backend, sp_group, control_group))
    return current()


def start_group_from_config(cfg: Any, env: Mapping[str, str] | None = None) -> ParallelGroup:
    """`start_group` with the device, head count and VAE-rank switch taken from an AppConfig.

    Also checks, before any process group exists, that the configured frame size splits into whole
    token shards, so a bad launch fails at start-up rather than at the first session.
    """
    launch = read_launch_env(env)
    layout = plan_layout(launch.world_size, launch.rank, cfg.model.dit.num_heads, cfg.parallel.vae_rank,
                         cfg.parallel.mode)
    check_token_split(cfg, layout.sp_size)
    check_step_pipeline(cfg, layout.pp_size)
    return start_group(cfg.runtime.device, cfg.model.dit.num_heads, cfg.parallel.vae_rank, env,
                       mode=cfg.parallel.mode)


def check_step_pipeline(cfg: Any, ranks: int) -> None:
    """In tpp every DiT rank owns one sampling step: the step count must be the group size."""
    if cfg.parallel.mode != "tpp":
        return
    if cfg.sampler.sample_steps != ranks:
        raise LaunchError(f"--parallel.mode tpp runs one sampling step per GPU: --sampler.sample_steps "
                          f"{cfg.sampler.sample_steps} needs torchrun --nproc-per-node {cfg.sampler.sample_steps} "
                          f"(launched {ranks}), or set --sampler.sample_steps {ranks}")


def check_token_split(cfg: Any, sp_size: int) -> None:
    """Refuse a DiT rank count that does not divide the block's and the sink's token counts."""
    lh, lw = cfg.video.height // 8, cfg.video.width // 8  # latent grid (VAE 8x)
    per_frame = (lh // 2) * (lw // 2)  # patch 1x2x2
    block = cfg.model.dit.num_frames_per_block * per_frame
    # sink = reference frame + FramePack motion (newest frame, 2x bucket at 1/4, 4x bucket: 4 frames at 1/64)
    sink = 2 * per_frame + (lh // 4) * (lw // 4) + 4 * (lh // 8) * (lw // 8)
    bad = {name: n for name, n in (("block", block), ("sink", sink)) if n % sp_size}
    if bad:
        ok = [n for n in range(1, cfg.model.dit.num_heads + 1)
              if cfg.model.dit.num_heads % n == 0 and block % n == 0 and sink % n == 0]
        raise LaunchError(f"at --video.size {cfg.video.size} the DiT's token counts {bad} do not split over "
                          f"{sp_size} DiT ranks; use a DiT rank count in {ok} or another size")


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether a parameter is a per-layer shard (FSDP2 DTensor) rather than a whole local tensor."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
