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

Hand-off (`hand_off=True`, for every column of a stack but its last). The official protocol keeps the
outputs of *every* column until that column's backward, so memory still grows with the number of
columns. Reconstructing each column from the next one instead (keeping only the last column's
outputs) costs no memory but drifts in float32 (fixture README section 6: 9.2e-3 relative after three
columns), because every inversion's rounding error is divided by alpha again in the next one. A
hand-off column therefore gives its outputs up once the next column has run: that column stores, per
level, the rounding error of its own inversion, `s_k(i) - (s_k(i+1) - Level_k(...)) / alpha_k`, in
bfloat16 (half the bytes of float32, a quarter of float64), and adds it back in backward. That error
is usually a few ulps of `s_k(i)`, which bfloat16's 8-bit mantissa holds exactly, so the state comes
back bit-identical when the recomputed level output equals the forward one (deterministic kernels);
where `s_k(i)` is much smaller than `s_k(i+1)` bfloat16 rounds it, leaving 2^-9 of the plain
reconstruction's error. Measured in float32 (8 columns, alpha 0.5): 99.98 % of the recovered values
bit-identical, the rest within 5 ulp; gradients within 1.6e-6 of float64 plain autograd (float32 plain
autograd: 1.3e-6; the official protocol, which feeds one-step reconstructions to the recomputation
and the alpha gradients: 1.0e-5).
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


class _HandOff:
    """Where a hand-off column's states live: exact (from its forward until the next column's forward
    claims them), then nowhere (the next column keeps residuals), then recovered (from the next
    column's backward until this column's backward has used them). Holds detached aliases: a Function
    must not hold its own outputs (reference cycle through `grad_fn`)."""

    def __init__(self):
        self.states: list[torch.Tensor] | None = None
        self.versions: list[int] = []
        self.claimed = False

    def hold(self, states: Sequence[torch.Tensor]) -> None:
        self.states = [state.detach() for state in states]
        self.versions = [state._version for state in states]

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        """True if `tensors` are this column's unmodified outputs, not yet claimed by another column."""
        return (
            not self.claimed
            and self.states is not None
            and len(tensors) == len(self.states)
            and all(
                t.data_ptr() == s.data_ptr() and t.shape == s.shape and t.stride() == s.stride() and t._version == v
                for t, s, v in zip(tensors, self.states, self.versions)
            )
        )


class ColumnStates(list):
    """A column's states (a list), carrying the column's `_HandOff` when it was run with `hand_off=True`:
    pass it unchanged as the next column's `prev_states` for that column to claim it."""

    hand_off: _HandOff | None = None


def _residual_dtype(dtype: torch.dtype) -> torch.dtype:
    """bfloat16 has float32's exponent range (a residual of a few ulps never underflows) and half the bytes."""
    return torch.bfloat16 if dtype in (torch.float32, torch.float64) else dtype


class _ColumnSpec:
    """Non-tensor description of one column call (passed through `Function.apply`)."""

    def __init__(
        self,
        levels: Sequence[LevelFn],
        level_param_indices: list[list[int]],
        has_prev: bool,
        hand_off: _HandOff | None = None,
        prev_hand_off: _HandOff | None = None,
    ):
        self.levels = list(levels)
        self.level_param_indices = level_param_indices
        self.has_prev = has_prev
        self.hand_off = hand_off  # holds this column's states instead of `save_for_backward`
        self.prev_hand_off = prev_hand_off  # the previous column's states, claimed by this column


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
        residuals: list[torch.Tensor] = []
        ctx.autocast = _AutocastState()
        with torch.no_grad():
            states: list[torch.Tensor] = []
            down = x
            for k, level in enumerate(spec.levels):
                rng_snapshots.append(_rng_snapshot(devices))
                up = prev_states[k + 1] if prev_states is not None and k + 1 < num_levels else None
                out = level(down, up)
                if prev_states is not None:
                    state = out + prev_states[k] * alphas[k]
                    if spec.prev_hand_off is not None:
                        # the rounding error of the inversion backward will run (same expression)
                        inverted = (state - out.to(state.dtype)) / alphas[k]
                        residuals.append((prev_states[k] - inverted).to(_residual_dtype(prev_states[k].dtype)))
                    out = state
                states.append(out)
                down = out
        if spec.prev_hand_off is not None:  # the previous column's states: from now on only the residuals
            spec.prev_hand_off.states, spec.prev_hand_off.claimed = None, True
        if spec.hand_off is not None:
            spec.hand_off.hold(states)
        ctx.spec = spec
        ctx.devices = devices
        ctx.rng_snapshots = rng_snapshots
        ctx.num_params = len(params)
        ctx.params = params
        ctx.num_residuals = len(residuals)
        ctx.save_for_backward(x, *(alphas or ()), *residuals, *(states if spec.hand_off is None else ()))
        return tuple(states)

    @staticmethod
    def _own_states(ctx, saved: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """This column's outputs: saved, or (hand-off) recovered by the next column's backward."""
        hand_off: _HandOff | None = ctx.spec.hand_off
        if hand_off is None:
            return saved
        if hand_off.states is None:
            raise RuntimeError(
                "a reversible column gave its states up to the next column (hand_off=True), but that column "
                "took no part in this backward: its outputs must reach the loss"
            )
        if not hand_off.claimed and any(s._version != v for s, v in zip(hand_off.states, hand_off.versions)):
            raise RuntimeError("an output of a reversible column was modified in place before its backward")
        return hand_off.states

    @staticmethod
    def backward(ctx, *grad_states: torch.Tensor):
        spec: _ColumnSpec = ctx.spec
        num_levels = len(spec.levels)
        saved = ctx.saved_tensors
        num_alphas = num_levels if spec.has_prev else 0
        x = saved[0]
        alphas = saved[1 : 1 + num_alphas] if spec.has_prev else None
        residuals = saved[1 + num_alphas : 1 + num_alphas + ctx.num_residuals]
        states = ReversibleColumnFunction._own_states(ctx, saved[1 + num_alphas + ctx.num_residuals :])
        params = ctx.params
        needs = ctx.needs_input_grad  # (spec, x, *tensors)
        param_offset = 2 + (2 * num_levels if spec.has_prev else 0)

        grad_x = None
        grad_prev: list[torch.Tensor | None] = [None] * num_levels
        grad_alphas: list[torch.Tensor | None] = [None] * num_levels
        grad_params: list[torch.Tensor | None] = [None] * ctx.num_params
        recovered: list[torch.Tensor | None] = [None] * num_levels  # the previous column's exact states
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
                        if residuals:
                            prev_k = prev_k + residuals[k].to(prev_k.dtype)
                            recovered[k] = prev_k
                        reduce_dims = [d for d in range(grad_k.ndim) if alpha.shape[d] == 1 and grad_k.shape[d] != 1]
                        grad_alphas[k] = (grad_k * prev_k).sum(dim=reduce_dims, keepdim=True).reshape(alpha.shape)
                        g = grad_k * alpha
                        grad_prev[k] = g if grad_prev[k] is None else grad_prev[k] + g
                    reconstructed_up = prev_k.detach().requires_grad_(True)
                else:
                    reconstructed_up = None
        if residuals:  # for the previous column's backward, which runs next
            spec.prev_hand_off.states = recovered
        if spec.hand_off is not None and spec.hand_off.claimed:
            spec.hand_off.states = None  # used; a retained graph's next backward recovers them again
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
    hand_off: bool = False,
) -> ColumnStates:
    """Run one column; returns its L states in processing order.

    levels: L callables `level(c_down, c_up_or_None)`; `c_up` is None for the last level and without
        a previous column.
    prev_states: the previous column's L states (processing order), or None for a first column.
    alphas: L effective (already clamped) shortcut scales broadcastable to a state; needed with
        `prev_states`.
    level_params: the parameters each level uses (for the reversible Function; default none, which
        trains nothing inside the levels).
    reversible: use the memory-saving Function when a gradient is needed; the plain path otherwise.
    hand_off: (reversible) the returned states will be the next reversible column's `prev_states`:
        that column then keeps a bfloat16 residual instead of them (module docstring). Set it for every
        column of a stack but the last. Without a next column that claims them, the states are simply
        kept, as without `hand_off`.
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
        return ColumnStates(_plain_column(levels, x, prev_states, alphas))
    prev_hand_off = getattr(prev_states, "hand_off", None)
    if prev_hand_off is not None and not prev_hand_off.matches(prev_states):
        prev_hand_off = None  # not the previous column's own outputs, or already claimed
    spec = _ColumnSpec(levels, indices, has_prev, _HandOff() if hand_off else None, prev_hand_off)
    states = ColumnStates(ReversibleColumnFunction.apply(spec, *tensors_in, *flat))
    states.hand_off = spec.hand_off
    return states


__all__ = ["ColumnStates", "ReversibleColumnFunction", "clamp_alpha", "run_column"]
