"""Multi-level reversible column engine (RevCol v1's `ReverseFunction`, generalised).

Model-zone file (torch + standard library only): copied flat next to every RevColV2 checkpoint.

A column has L levels, run in a fixed *processing order* k = 0 .. L-1 (bottom-up columns: level k;
top-down columns: level L-1-k). With `s_k(i)` the k-th state of column i and `x` the column input:

    s_k(i) = Level_k(i)( s_{k-1}(i), s_{k+1}(i-1) ) + alpha_k(i) * s_k(i-1)        (s_{-1}(i) = x)

The last level has no `s_{k+1}(i-1)` input, and a column without a previous column (the first
column of a network) has neither that input nor the shortcut. The inverse, used in backward, is

    s_k(i-1) = ( s_k(i) - Level_k(i)( s_{k-1}(i), s_{k+1}(i-1) ) ) / alpha_k(i)

run k = L-1 .. 0, so the `s_{k+1}(i-1)` level k needs was reconstructed one step earlier.

`run_column(..., reversible=True)` runs one column as a `torch.autograd.Function` that keeps only the
column's own outputs (plus `x`), and in backward recomputes each level with the RNG state (CPU and
CUDA) and autocast state of the forward, back-propagates through it, and reconstructs the previous
column's states for the next recomputation and for the alpha gradients: the protocol of the official
RevCol code. Unlike the official Function, the level parameters are *inputs* of the Function, so
autograd sees them: `torch.autograd.grad` and DDP's unused-parameter detection work, and the column
input needs no `requires_grad`. `reversible=False` runs the same equations with ordinary autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LevelFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def clamp_alpha(alpha: torch.Tensor, min_abs: float) -> torch.Tensor:
    """sign(alpha) * max(|alpha|, min_abs), with sign(0) taken as +1; gradient passed straight through.

    Equals the official in-place `_clamp_abs` on every value except an exact 0 (official: stays 0, and
    the reversible backward then divides by zero; here +min_abs). As in the official code the gradient
    is the one at the clamped value, applied to the stored parameter unmasked.
    """
    magnitude = alpha.detach().abs().clamp_min(min_abs)
    clamped = torch.where(alpha.detach() < 0, -magnitude, magnitude)
    return alpha + (clamped - alpha.detach())


def _plain_column(
    levels: Sequence[LevelFn],
    x: torch.Tensor,
    prev_states: Sequence[torch.Tensor] | None,
    alphas: Sequence[torch.Tensor] | None,
) -> list[torch.Tensor]:
    num_levels = len(levels)
    states: list[torch.Tensor] = []
    down = x
    for k, level in enumerate(levels):
        up = prev_states[k + 1] if prev_states is not None and k + 1 < num_levels else None
        out = level(down, up)
        if prev_states is not None:
            out = out + prev_states[k] * alphas[k]
        states.append(out)
        down = out
    return states


class _AutocastState:
    """The autocast settings of the forward pass, re-entered for the recomputation in backward."""

    DEVICES = ("cuda", "cpu")

    def __init__(self):
        self.settings = {
            device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in self.DEVICES
        }
        self.cache_enabled = torch.is_autocast_cache_enabled()

    def contexts(self) -> list:
        contexts = []
        for device, (enabled, dtype) in self.settings.items():
            if device == "cuda" and not torch.cuda.is_available():
                continue
            contexts.append(torch.autocast(device_type=device, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled))
        return contexts


def _rng_devices(tensors: Sequence[torch.Tensor]) -> list[int]:
    return sorted({t.get_device() for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda})


def _rng_snapshot(devices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cuda_states = []
    for device in devices:
        with torch.cuda.device(device):
            cuda_states.append(torch.cuda.get_rng_state())
    return torch.get_rng_state(), cuda_states


def _rng_restore(snapshot: tuple[torch.Tensor, list[torch.Tensor]], devices: list[int]) -> None:
    cpu_state, cuda_states = snapshot
    torch.set_rng_state(cpu_state)
    for device, state in zip(devices, cuda_states):
        with torch.cuda.device(device):
            torch.cuda.set_rng_state(state)


class _ColumnSpec:
    """Non-tensor description of one column call (passed through `Function.apply`)."""

    def __init__(self, levels: Sequence[LevelFn], level_param_indices: list[list[int]], has_prev: bool):
        self.levels = list(levels)
        self.level_param_indices = level_param_indices
        self.has_prev = has_prev


class ReversibleColumnFunction(torch.autograd.Function):
    """One column; tensor inputs are (x, *prev_states, *alphas, *params) (prev/alphas only with a previous column)."""

    @staticmethod
    def forward(ctx, spec: _ColumnSpec, x: torch.Tensor, *tensors: torch.Tensor):
        num_levels = len(spec.levels)
        if spec.has_prev:
            prev_states = tensors[:num_levels]
            alphas = tensors[num_levels : 2 * num_levels]
            params = tensors[2 * num_levels :]
        else:
            prev_states, alphas, params = None, None, tensors
        devices = _rng_devices([x, *(prev_states or ())])
        rng_snapshots = []
        ctx.autocast = _AutocastState()
        with torch.no_grad():
            states: list[torch.Tensor] = []
            down = x
            for k, level in enumerate(spec.levels):
                rng_snapshots.append(_rng_snapshot(devices))
                up = prev_states[k + 1] if prev_states is not None and k + 1 < num_levels else None
                out = level(down, up)
                if prev_states is not None:
                    out = out + prev_states[k] * alphas[k]
                states.append(out)
                down = out
        ctx.spec = spec
        ctx.devices = devices
        ctx.rng_snapshots = rng_snapshots
        ctx.num_params = len(params)
        ctx.params = params
        ctx.save_for_backward(x, *states, *(alphas or ()))
        return tuple(states)

    @staticmethod
    def backward(ctx, *grad_states: torch.Tensor):
        spec: _ColumnSpec = ctx.spec
        num_levels = len(spec.levels)
        saved = ctx.saved_tensors
        x, states = saved[0], saved[1 : 1 + num_levels]
        alphas = saved[1 + num_levels :] if spec.has_prev else None
        params = ctx.params
        needs = ctx.needs_input_grad  # (spec, x, *tensors)
        param_offset = 2 + (2 * num_levels if spec.has_prev else 0)

        grad_x = None
        grad_prev: list[torch.Tensor | None] = [None] * num_levels
        grad_alphas: list[torch.Tensor | None] = [None] * num_levels
        grad_params: list[torch.Tensor | None] = [None] * ctx.num_params
        # gradient that reached s_{k}(i) as the c_down input of level k+1's recomputation
        carry_down: torch.Tensor | None = None
        # reconstructed s_{k+1}(i-1), a leaf of the recomputation of level k
        reconstructed_up: torch.Tensor | None = None

        with torch.random.fork_rng(devices=ctx.devices, enabled=True), torch.enable_grad():
            autocast_contexts = ctx.autocast.contexts()
            for k in range(num_levels - 1, -1, -1):
                grad_k = grad_states[k]
                if grad_k is None:
                    grad_k = torch.zeros_like(states[k])
                if carry_down is not None:
                    grad_k = grad_k + carry_down
                _rng_restore(ctx.rng_snapshots[k], ctx.devices)
                down_in = (x if k == 0 else states[k - 1]).detach().requires_grad_(True)
                up_in = reconstructed_up
                trainable_indices = [j for j in spec.level_param_indices[k] if params[j].requires_grad]
                trainable = [params[j] for j in trainable_indices]
                for context in autocast_contexts:
                    context.__enter__()
                try:
                    out = spec.levels[k](down_in, up_in)
                finally:
                    for context in reversed(autocast_contexts):
                        context.__exit__(None, None, None)
                inputs = [down_in] + ([up_in] if up_in is not None else []) + trainable
                grads = torch.autograd.grad(out, inputs, grad_k.to(out.dtype), allow_unused=True)
                grad_down = grads[0]
                grad_up = grads[1] if up_in is not None else None
                for index, grad in zip(trainable_indices, grads[len(inputs) - len(trainable) :]):
                    if grad is not None:
                        grad_params[index] = grad if grad_params[index] is None else grad_params[index] + grad
                if k == 0:
                    grad_x = grad_down
                else:
                    carry_down = grad_down
                if grad_up is not None:  # up_in is s_{k+1}(i-1): add to that state's gradient
                    grad_prev[k + 1] = grad_up if grad_prev[k + 1] is None else grad_prev[k + 1] + grad_up
                if spec.has_prev:
                    alpha = alphas[k]
                    with torch.no_grad():
                        prev_k = (states[k] - out.detach().to(states[k].dtype)) / alpha
                        reduce_dims = [d for d in range(grad_k.ndim) if alpha.shape[d] == 1 and grad_k.shape[d] != 1]
                        grad_alphas[k] = (grad_k * prev_k).sum(dim=reduce_dims, keepdim=True).reshape(alpha.shape)
                        g = grad_k * alpha
                        grad_prev[k] = g if grad_prev[k] is None else grad_prev[k] + g
                    reconstructed_up = prev_k.detach().requires_grad_(True)
                else:
                    reconstructed_up = None
        result: list[torch.Tensor | None] = [None, grad_x if needs[1] else None]
        if spec.has_prev:
            result += [g if needs[2 + k] else None for k, g in enumerate(grad_prev)]
            result += [g if needs[2 + num_levels + k] else None for k, g in enumerate(grad_alphas)]
        result += [g if needs[param_offset + j] else None for j, g in enumerate(grad_params)]
        return tuple(result)


def run_column(
    levels: Sequence[LevelFn],
    x: torch.Tensor,
    prev_states: Sequence[torch.Tensor] | None = None,
    alphas: Sequence[torch.Tensor] | None = None,
    level_params: Sequence[Sequence[torch.Tensor]] | None = None,
    reversible: bool = True,
) -> list[torch.Tensor]:
    """Run one column; returns its L states in processing order.

    levels: L callables `level(c_down, c_up_or_None)`; `c_up` is None for the last level and without
        a previous column.
    prev_states: the previous column's L states (processing order), or None for a first column.
    alphas: L effective (already clamped) shortcut scales broadcastable to a state; needed with
        `prev_states`.
    level_params: the parameters each level uses (for the reversible Function; default none, which
        trains nothing inside the levels).
    reversible: use the memory-saving Function when a gradient is needed; the plain path otherwise.
    """
    has_prev = prev_states is not None
    if has_prev and (alphas is None or len(alphas) != len(levels) or len(prev_states) != len(levels)):
        raise ValueError("a column with a previous column needs one previous state and one alpha per level")
    level_params = level_params or [[] for _ in levels]
    if len(level_params) != len(levels):
        raise ValueError("level_params must list the parameters of every level")
    tensors_in = [x, *(prev_states or ()), *(alphas or ())]
    flat: list[torch.Tensor] = []
    seen: dict[int, int] = {}
    indices: list[list[int]] = []
    for params in level_params:
        level_indices = []
        for param in params:
            if id(param) not in seen:
                seen[id(param)] = len(flat)
                flat.append(param)
            level_indices.append(seen[id(param)])
        indices.append(level_indices)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [*tensors_in, *flat])
    if not (reversible and needs_grad):
        return _plain_column(levels, x, prev_states, alphas)
    spec = _ColumnSpec(levels, indices, has_prev)
    return list(ReversibleColumnFunction.apply(spec, *tensors_in, *flat))


__all__ = ["ReversibleColumnFunction", "clamp_alpha", "run_column"]
