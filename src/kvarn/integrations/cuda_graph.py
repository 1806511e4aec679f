"""Decoding (greedy or sampled) over a KVarNCache with each decode step recorded once as a CUDA graph.

Why: a decode step of transformers' eager forward is ~1,500-1,700 kernel launches for an 8B
model, each costing a few microseconds of Python and driver time; with a compressed cache the GPU
finishes its part long before the host has issued the next step (docs/gpu.md, "End to end").
Recorded once and replayed, a step costs one graph launch on the host.

What makes a KVarN decode step replayable (docs/cache.md, "CUDA-graph decoding"):

* every launch depends only on shapes: the decode kernels read per-row lengths from device
  counters, and ``KVarNLayer`` in ``graph_steps`` mode writes the new token at the offset its
  device counter holds (never at a host offset, which a graph would freeze);
* no op reads device data on the host, and the static inputs (token, positions) are advanced on
  the device by the step itself, so consecutive replays need no host-to-device copy; the next
  token is chosen inside the step too (argmax, or a draw from the filtered distribution with
  exponential noise: ``kvarn.integrations.sampling``);
* what a graph cannot do, the host does between replays: ``KVarNLayer.after_graph_step``
  advances the host mirrors of the counters and, when tails fill (every tile-size steps), runs the
  tile compression eagerly. Tile storage is reserved for the whole run up front, so buffers never
  move; if they do anyway (a caller's reserve was too small) the step is recorded again.

Steps that cannot be replayed (a row's 16-bit sink tile not yet full after a short prompt) run
eagerly until they can. Without CUDA (``capture=False``) the same device step runs eagerly: that
is the twin the tests compare against ``model.generate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvarn.attention.triton import dispatch
from kvarn.attention.triton.copy_policy import graph_step_copies
from kvarn.cache.cache import KVarNCache
from kvarn.cache.errors import CacheUsageError, UnsupportedModelError
from kvarn.cache.layer import KVarNLayer
from kvarn.integrations.sampling import SamplingConfig, SamplingOptions, sample_next
from kvarn.integrations.transformers import enable

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

# How often (in steps) the host looks at the device for rows that produced the stop token: each
# look waits for the GPU, so it is rare enough not to starve the launch queue.
EOS_CHECK_EVERY = 16


@dataclass
class GraphDecodeStats:
    """What the last ``generate`` did: eager forward calls (prefill included), graph recordings
    and replays."""

    eager_steps: int = 0
    recordings: int = 0
    replays: int = 0


class GraphDecoder:
    """Generation over ``cache`` with decode steps replayed from a CUDA graph: greedy, or sampled
    (``do_sample=True`` with ``temperature``, ``top_k``, ``top_p``, ``min_p`` and a ``generator``,
    given to :meth:`start`, :meth:`resume` or :meth:`generate`; the draw is part of the graph).

    ``capture`` (default: on for CUDA tensors) records the step as a CUDA graph; ``False`` runs
    the identical device step eagerly (CPU, debugging). Every layer of ``cache`` must be a KVarN
    layer (sliding-window layers keep a growing 16-bit cache, which a graph cannot replay).

    Example::

        model = kvarn.enable(model)
        cache = kvarn.KVarNCache(config=model.config)
        tokens = GraphDecoder(model, cache).generate(input_ids, attention_mask, max_new_tokens=512)
        # sampled: generate(..., do_sample=True, temperature=0.6, top_p=0.95, top_k=20,
        #                   generator=torch.Generator(device="cuda").manual_seed(0))
    """

    def __init__(self, model, cache: KVarNCache, *, capture: bool | None = None) -> None:
        if not isinstance(cache, KVarNCache):
            raise TypeError(f"GraphDecoder needs a KVarNCache, got {type(cache).__name__}")
        others = [type(layer).__name__ for layer in cache.layers if not isinstance(layer, KVarNLayer)]
        if others:
            raise UnsupportedModelError(
                f"CUDA-graph decoding needs every layer to be a KVarN layer; this cache has {len(others)} "
                f"{others[0]} layer(s) (sliding-window layers grow a 16-bit cache that a graph cannot replay)"
            )
        self.model = enable(model)
        self.cache = cache
        self.capture = capture
        self.stats = GraphDecodeStats()
        self._graph = None
        self._graph_buffers = None
        self._logits = self._next = None
        self._ids = None
        self._capture = False
        self._sampling = SamplingConfig()
        self._generator: torch.Generator | None = None

    # ---- the device step ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _graph_steps(self) -> Iterator[None]:
        layers = self.cache.kvarn_layers
        for layer in layers:
            layer.graph_steps = True
        try:
            yield
        finally:
            for layer in layers:
                layer.graph_steps = False

    def _device_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step touching only device state: forward of the static token at the static
        positions, the next token's choice (argmax or a draw), and the static inputs advanced for
        the next step."""
        with self._graph_steps():
            logits = self._forward()
        return logits, self._advance(logits)

    def _eager_step(self) -> torch.Tensor:
        """A decode step through the cache's general path (anything the graph cannot replay)."""
        chosen = self._advance(self._forward())
        self.stats.eager_steps += 1
        return chosen

    def _forward(self) -> torch.Tensor:
        """The last position's logits ``[B, V]`` of the static token at the static positions."""
        out = self.model(
            input_ids=self._ids,
            position_ids=self._pos,
            cache_position=self._cache_pos,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _advance(self, logits: torch.Tensor) -> torch.Tensor:
        """Choose the next token from ``logits`` and move the static inputs on to it (on the
        device: a recorded step needs no host copy before the next replay)."""
        chosen = self._choose(logits)
        self._ids.copy_(chosen.unsqueeze(1))
        self._pos.add_(1)
        self._cache_pos.add_(1)
        return chosen

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        return sample_next(logits, self._sampling, self._generator)

    def _not_replayable(self) -> str | None:
        for layer in self.cache.kvarn_layers:
            reason = layer.graph_step_ready(1)
            if reason is not None:
                return f"layer {layer.layer_idx}: {reason}"
        return None

    def _buffers(self) -> tuple:
        return tuple(layer.graph_buffers() for layer in self.cache.kvarn_layers)

    def _graph_step(self, capture: bool) -> torch.Tensor:
        """A replayable decode step: recorded first when needed (CUDA), replayed, host caught up."""
        if not capture:
            _, chosen = self._device_step()
            self.stats.replays += 1
        elif self._graph_buffers is None:
            # First replayable step: run it eagerly once (compiles the kernels, fills the rotation
            # and launcher caches, creates the cuBLAS workspace), on a side stream as CUDA-graph
            # warm-ups should be, so that the recording allocates and compiles nothing outside
            # the graph's memory pool.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), graph_step_copies():
                _, chosen = self._device_step()
            torch.cuda.current_stream().wait_stream(stream)
            self._graph_buffers = self._buffers()
            self.stats.eager_steps += 1
        else:
            if self._graph is None or self._graph_buffers != self._buffers():
                self._graph = torch.cuda.CUDAGraph()
                self._register_generator(self._graph)
                # graph_step_copies: the recorded decode kernels copy tiles by TMA on Hopper
                # (host cost paid once here, not per replay; the warm-up above compiled them)
                with torch.cuda.graph(self._graph), graph_step_copies():
                    self._logits, self._next = self._device_step()
                self._graph_buffers = self._buffers()
                self.stats.recordings += 1
            self._graph.replay()
            chosen = self._next
            self.stats.replays += 1
        chosen = chosen.clone()  # the graph's output buffer is overwritten by the next replay
        self._after_step()
        return chosen

    def _register_generator(self, graph) -> None:
        """Fresh random numbers at every replay. A recording freezes kernel arguments, so a
        sampling kernel does not get the generator's (seed, offset) by value: while capturing it
        reads them from two device tensors of the generator's per-graph state, plus an offset
        within the graph. Before each replay, ``CUDAGraph.replay`` writes the generator's current
        seed and offset into those tensors and then advances the generator's offset by what the
        whole graph consumes, so consecutive replays (and eager steps between them, which use the
        same generator) draw consecutive, different numbers, the same ones the eager step would
        draw. ``capture_begin`` does this for the device's default generator on its own; a
        caller's generator must be registered with the graph before the capture begins."""
        if self._sampling.greedy or self._generator is None:
            return
        if not hasattr(graph, "register_generator_state"):
            raise UnsupportedModelError(
                f"sampling with a generator inside a CUDA graph needs CUDAGraph.register_generator_state, "
                f"which torch {torch.__version__} lacks; pass generator=None to use the default CUDA "
                "generator (seed it with torch.cuda.manual_seed)"
            )
        graph.register_generator_state(self._generator)

    def _after_step(self) -> None:
        for layer in self.cache.kvarn_layers:
            layer.after_graph_step(1)

    # ---- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        **sampling: Unpack[SamplingOptions],
    ) -> torch.Tensor:
        """Prefill an empty cache with the prompt; returns each row's first new token ``[B]``.

        Tile storage is reserved for ``prompt + max_new_tokens`` tokens per row, so that the
        buffers a recording refers to never move while :meth:`step` runs that far.

        The sampling options (see :meth:`generate`) hold for the first token and every
        :meth:`step` after it, until the next ``start`` or :meth:`resume`.
        """
        ids, mask = self._check_inputs(input_ids, attention_mask, max_new_tokens)
        config, generator = self._sampling_config(ids.device, **sampling)
        if any(layer.is_initialized for layer in self.cache.kvarn_layers):
            raise CacheUsageError(
                "GraphDecoder.start needs an empty cache (a fresh KVarNCache or cache.reset())"
            )
        self._resolve_capture(ids.device)  # refuse before the prefill's work
        self.cache.reserve(ids.shape[1] + max_new_tokens)
        # Positions counted over real tokens, as generate does for left-padded rows.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._sampling, self._generator = config, generator
        chosen = self._choose(out.logits[:, -1])
        self._take_over(chosen)
        self.stats.eager_steps += 1
        return chosen

    def resume(self, next_tokens: torch.Tensor, **sampling: Unpack[SamplingOptions]) -> None:
        """Take over a cache filled by earlier forward calls (through the "kvarn" attention);
        ``next_tokens`` (``[B]`` or ``[B, 1]``) are the tokens the next :meth:`step` feeds in.
        The sampling options (see :meth:`generate`) hold for the steps that follow."""
        config, generator = self._sampling_config(next_tokens.device, **sampling)
        self._take_over(next_tokens)
        self._sampling, self._generator = config, generator

    def _take_over(self, next_tokens: torch.Tensor) -> None:
        layers = self.cache.kvarn_layers
        if not layers[0].is_initialized:
            raise CacheUsageError("GraphDecoder.resume needs a cache that holds the prompt (prefill first)")
        tokens = next_tokens.reshape(-1, 1)
        if tokens.shape[0] != layers[0].batch or tokens.dtype != torch.long:
            raise ValueError(
                f"next_tokens must be {layers[0].batch} int64 tokens (one per cached row), got "
                f"{tokens.dtype} {tuple(next_tokens.shape)}"
            )
        device = tokens.device
        self._capture = self._resolve_capture(device)
        self.stats = GraphDecodeStats()
        self._graph = self._graph_buffers = None
        self._ids = tokens.clone()
        # The next token's position: the real tokens a row holds (padding is never stored).
        self._pos = torch.tensor(layers[0].stored_lengths(), dtype=torch.long, device=device).unsqueeze(1)
        self._cache_pos = torch.full((1,), layers[0].columns, dtype=torch.long, device=device)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One more token per row ``[B]`` (greedy or drawn, as :meth:`start` / :meth:`resume` set
        it): a graph replay when the cache allows it (sinks full, no deferred tiles), else an
        eager forward call."""
        if self._ids is None:
            raise CacheUsageError("GraphDecoder.step before start() or resume()")
        if self._not_replayable() is None:
            return self._graph_step(self._capture)
        return self._eager_step()

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> torch.Tensor:
        """Prompt + continuation, ``[B, T + n]`` (n <= ``max_new_tokens``), as ``model.generate``
        returns it. Left padding in ``attention_mask`` is honoured; rows that produced
        ``eos_token_id`` continue with ``pad_token_id`` (default: the first stop token), and
        generation ends once every row has stopped.

        Greedy by default (``model.generate(do_sample=False)``'s tokens). ``do_sample=True`` draws
        each token from the distribution ``model.generate(do_sample=True, ...)`` samples from:
        float32 logits / ``temperature``, then ``top_k`` (keep the k largest, ties at the k-th
        kept), ``top_p`` (the fewest most probable tokens whose probability reaches ``top_p``,
        at least one) and ``min_p`` (drop tokens below ``min_p`` x the top
        probability); ``None`` switches a filter off (``model.generate`` defaults ``top_k`` to 50
        unless the model's generation config says otherwise; here pass it). The draw happens on
        the device, inside the recorded step, with random numbers from ``generator`` (a
        ``torch.Generator`` on the inputs' device; ``None``: torch's default one): the same seed
        gives the same tokens. ``top_k=1`` is exactly greedy.
        """
        stops = (
            []
            if eos_token_id is None
            else [eos_token_id]
            if isinstance(eos_token_id, int)
            else list(eos_token_id)
        )
        pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
        chosen = self.start(input_ids, attention_mask, max_new_tokens, **sampling)
        new = [chosen]
        stop_ids = torch.tensor(stops, device=chosen.device) if stops else None
        done = torch.isin(chosen, stop_ids) if stops else None
        for step in range(1, max_new_tokens):
            if stops and step % EOS_CHECK_EVERY == 0 and bool(done.all()):
                break
            chosen = self.step()
            if stops:
                chosen = chosen.masked_fill(done, pad)
                done = done | torch.isin(chosen, stop_ids)
            new.append(chosen)
        tokens = torch.stack(new, dim=1)
        if stops:  # trim steps after every row stopped (the host looked only every few steps)
            finished = torch.isin(tokens, stop_ids).cummax(dim=1).values.all(dim=0)
            if bool(finished.any()):
                tokens = tokens[:, : int(finished.nonzero()[0]) + 1]
        return torch.cat([input_ids, tokens], dim=1)

    @staticmethod
    def _sampling_config(
        device: torch.device, generator: torch.Generator | None = None, **options
    ) -> tuple[SamplingConfig, torch.Generator | None]:
        config = SamplingConfig(**options)  # validates; an unknown option is a TypeError
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(
                    f"generator must be a torch.Generator or None, got {type(generator).__name__}"
                )
            where = torch.device(generator.device)
            if where.type != device.type or (
                where.index is not None and device.index is not None and where.index != device.index
            ):
                raise ValueError(
                    f"generator is on {where}, the inputs on {device}: create it there, e.g. "
                    f"torch.Generator(device={str(device)!r}).manual_seed(seed)"
                )
        return config, generator

    def _check_inputs(self, input_ids, attention_mask, max_new_tokens) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a [batch, tokens] int64 tensor, got "
                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}"
            )
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids holds no prompt tokens")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if attention_mask is None:
            return input_ids, torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("attention_mask: every row's last prompt token must be real (pad on the left)")
        return input_ids, attention_mask.to(torch.long)

    def _resolve_capture(self, device: torch.device) -> bool:
        capture = self.capture if self.capture is not None else device.type == "cuda"
        if capture:
            if device.type != "cuda":
                raise ValueError(
                    "capture=True records CUDA graphs: the model and inputs must be on a CUDA device"
                )
            self._check_kernels(device)
        return capture

    def _check_kernels(self, device: torch.device) -> None:
        reason = kernel_unsupported_reason(self.model, self.cache, device)
        if reason is not None:
            raise UnsupportedModelError(reason)


def kernel_unsupported_reason(model, cache: KVarNCache, device: torch.device) -> str | None:
    """None when a recorded step over ``cache`` would be right on ``device``, else why not: the
    decode attention must be a shape-only launch (the Triton kernels); the PyTorch path sizes its
    work from host lengths."""
    layer = cache.kvarn_layers[0]
    dtype = next(model.parameters()).dtype
    reason = dispatch.decode_unsupported_reason(
        device, layer.head_dim, layer.tile_size, layer.quant.key_bits, layer.quant.value_bits, 1, dtype
    )
    return None if reason is None else f"CUDA-graph decoding needs the Triton decode kernel here: {reason}"


def graph_generate(
    model, input_ids, attention_mask=None, *, quant="k4v2", max_new_tokens: int = 32, **kwargs
):
    """One call: a fresh KVarNCache for ``model`` and :meth:`GraphDecoder.generate` over it
    (``kwargs``: its stop and sampling options)."""
    cache = KVarNCache(config=enable(model).config, quant=quant)
    return GraphDecoder(model, cache).generate(
        input_ids, attention_mask, max_new_tokens=max_new_tokens, **kwargs
    )
